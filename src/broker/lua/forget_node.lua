-- Takes a dead node out of the rooms it had members in, a batch at a time: its presence entries
-- and member counts go (a room left without members then lives as lib.lua's room_lifetime says),
-- so a room nobody reads again is not kept by a node that is gone. Several nodes may sweep the
-- same dead node: each batch is taken from its set of rooms (SPOP). A node that beats again is
-- left alone (it writes its presence again itself).
-- KEYS[1]: the dead node's rooms (a set, see lib.lua's count_members); KEYS[2]: the nodes hash;
-- KEYS[3]: the rooms index.
-- ARGV: the dead node, the generation's key prefix, rooms per call, TTL while a room has
--       members (s), TTL once it has none (s).
-- Returns how many of its rooms are left to sweep, then the changes of who is in them (see
-- lib.lua's note_change): each room is swept by one node (SPOP), which reports them.
if alive_nodes(KEYS[2])[ARGV[1]] then
  return {0}
end
local changes = {}
as_kind(KEYS[1], "set")
as_kind(KEYS[3], "zset")
local prefix = ARGV[2]
local mine = ARGV[1] .. "\31"
for _, room in ipairs(redis.call("spop", KEYS[1], tonumber(ARGV[3]))) do
  local presence = prefix .. "presence:{" .. room .. "}"
  local members = prefix .. "members:{" .. room .. "}"
  local meta = prefix .. "meta:{" .. room .. "}"
  as_kind(presence, "hash")
  as_kind(members, "hash")
  local room_before = room_conns(members)
  local nodes = redis.call("hkeys", members)
  local gone = {}
  for _, field in ipairs(redis.call("hkeys", presence)) do
    if string.sub(field, 1, #mine) == mine then
      local user = string.sub(field, #mine + 1)
      gone[user] = {redis.call("hget", presence, field), user_conns(presence, nodes, user)}
      redis.call("hdel", presence, field)
    elseif field == "#" .. ARGV[1] then
      redis.call("hdel", presence, field)
    end
  end
  redis.call("hdel", members, ARGV[1])
  nodes = redis.call("hkeys", members)
  for user, seen in pairs(gone) do
    note_change(changes, room, seen[1], seen[2], user_conns(presence, nodes, user))
  end
  note_change(changes, room, false, room_before, room_conns(members))
  if redis.call("exists", members) == 0 then
    redis.call("zrem", KEYS[3], room)
  end
  room_lifetime(meta, presence, members, ARGV[4], ARGV[5])
end
local result = {redis.call("scard", KEYS[1])}
for _, value in ipairs(changes) do
  result[#result + 1] = value
end
return result
