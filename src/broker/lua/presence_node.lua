-- Replaces everything a room's presence hash holds of one node (after the node reconnected: what
-- changed while Redis was away was not recorded), and tells the nodes following the room.
-- KEYS[1]: the room's presence hash (see presence.lua); KEYS[2]: its members hash; KEYS[3]: the
-- rooms index; KEYS[4]: the era hash (see era.lua); KEYS[5]: the room's meta hash; KEYS[6]: the
-- node's rooms (see lib.lua's count_members).
-- ARGV: node, change number, channel, TTL (s), room, the node's generation, TTL once the room
-- has no member (s, see lib.lua's room_lifetime), the highest era clock the node saw, then the
-- node's entries: user, entry (JSON), ...
-- Returns the era's clock, then the changes of who is in the room (see lib.lua's note_change);
-- an ERA_CHANGED error (nothing written) under another generation.
if not era_is(KEYS[4], ARGV[6], ARGV[8]) then
  return redis.error_reply(ERA_CHANGED)
end
-- Counted first: nothing below can fail once the clock is known to be a count.
local clock = era_tick(KEYS[4])
as_kind(KEYS[1], "hash")
as_kind(KEYS[2], "hash")
local prefix = ARGV[1] .. "\31"
-- The users the rewrite may change, with their entries and connections before.
local users = {}
local nodes = redis.call("hkeys", KEYS[2])
local function note_user(user, entry)
  if not users[user] then
    users[user] = {entry, user_conns(KEYS[1], nodes, user)}
  end
end
local room_before = room_conns(KEYS[2])
local old = {}
for _, field in ipairs(redis.call("hkeys", KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then
    old[#old + 1] = field
    note_user(string.sub(field, #prefix + 1), redis.call("hget", KEYS[1], field))
  end
end
for i = 9, #ARGV, 2 do
  note_user(ARGV[i], ARGV[i + 1])
end
for _, field in ipairs(old) do
  redis.call("hdel", KEYS[1], field)
end
local entries = {}
local conns = 0
for i = 9, #ARGV, 2 do
  redis.call("hset", KEYS[1], prefix .. ARGV[i], ARGV[i + 1])
  table.insert(entries, ARGV[i + 1])
  conns = conns + entry_conns(ARGV[i + 1])
end
redis.call("hset", KEYS[1], "#" .. ARGV[1], ARGV[2])
count_members(KEYS[2], KEYS[3], ARGV[5], ARGV[1], nil, conns, ARGV[4], KEYS[6])
room_lifetime(KEYS[5], KEYS[1], KEYS[2], ARGV[4], ARGV[7])
redis.call("publish", ARGV[3], "U" .. ARGV[1] .. " " .. ARGV[2] .. "\n[" .. table.concat(entries, ",") .. "]")
local changes = {clock}
local room_after = room_conns(KEYS[2])
if room_before == 0 then
  note_change(changes, ARGV[5], false, room_before, room_after)
end
nodes = redis.call("hkeys", KEYS[2])
for user, seen in pairs(users) do
  note_change(changes, ARGV[5], seen[1], seen[2], user_conns(KEYS[1], nodes, user))
end
if room_before > 0 then
  note_change(changes, ARGV[5], false, room_before, room_after)
end
return changes
