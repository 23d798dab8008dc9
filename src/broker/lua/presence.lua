-- Records a user's connections in a room on one node, and tells the nodes following the room.
-- KEYS[1]: the room's presence hash: "<node>\31<user>" -> entry (JSON), "#<node>" -> the node's
--          last change number; KEYS[2]: the room's members hash (see lib.lua's count_members);
--          KEYS[3]: the rooms index; KEYS[4]: the era hash (see era.lua); KEYS[5]: the room's
--          meta hash; KEYS[6]: the node's rooms (see lib.lua's count_members).
-- ARGV: node, user, entry (JSON), connections, change number, channel, TTL (s), room, the
--       node's generation, TTL once the room has no member (s, see lib.lua's room_lifetime), the
--       highest era clock the node saw.
-- Returns the era's clock, then the changes of who is in the room (see lib.lua's note_change:
-- the room's first connection before the user's, its last after); an ERA_CHANGED error (nothing
-- written) under another generation.
if not era_is(KEYS[4], ARGV[9], ARGV[11]) then
  return redis.error_reply(ERA_CHANGED)
end
-- Counted first: nothing below can fail once the clock is known to be a count.
local clock = era_tick(KEYS[4])
as_kind(KEYS[1], "hash")
local field = ARGV[1] .. "\31" .. ARGV[2]
local before = redis.call("hget", KEYS[1], field)
as_kind(KEYS[2], "hash")
local user_before = user_conns(KEYS[1], redis.call("hkeys", KEYS[2]), ARGV[2])
local room_before = room_conns(KEYS[2])
if tonumber(ARGV[4]) > 0 then
  redis.call("hset", KEYS[1], field, ARGV[3])
else
  redis.call("hdel", KEYS[1], field)
end
redis.call("hset", KEYS[1], "#" .. ARGV[1], ARGV[5])
local delta = tonumber(ARGV[4]) - entry_conns(before)
count_members(KEYS[2], KEYS[3], ARGV[8], ARGV[1], delta, nil, ARGV[7], KEYS[6])
room_lifetime(KEYS[5], KEYS[1], KEYS[2], ARGV[7], ARGV[10])
redis.call("publish", ARGV[6], "u" .. ARGV[1] .. " " .. ARGV[5] .. "\n" .. ARGV[3])
local changes = {clock}
local room_after = room_conns(KEYS[2])
if room_before == 0 then
  note_change(changes, ARGV[8], false, room_before, room_after)
end
-- A user who left is named by the entry it had.
local user_after = user_conns(KEYS[1], redis.call("hkeys", KEYS[2]), ARGV[2])
note_change(changes, ARGV[8], before or ARGV[3], user_before, user_after)
if room_before > 0 then
  note_change(changes, ARGV[8], false, room_before, room_after)
end
return changes
