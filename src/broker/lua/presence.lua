-- Records a user's connections in a room on one node, and tells the nodes following the room.
-- KEYS[1]: the room's presence hash: "<node>\31<user>" -> entry (JSON), "#<node>" -> the node's
--          last change number; KEYS[2]: the room's members hash (see lib.lua's count_members);
--          KEYS[3]: the rooms index.
-- ARGV: node, user, entry (JSON), connections, change number, channel, TTL (s), room.
as_kind(KEYS[1], "hash")
local field = ARGV[1] .. "\31" .. ARGV[2]
local before = redis.call("hget", KEYS[1], field)
if tonumber(ARGV[4]) > 0 then
  redis.call("hset", KEYS[1], field, ARGV[3])
else
  redis.call("hdel", KEYS[1], field)
end
redis.call("hset", KEYS[1], "#" .. ARGV[1], ARGV[5])
redis.call("expire", KEYS[1], ARGV[7])
count_members(KEYS[2], KEYS[3], ARGV[8], ARGV[1], tonumber(ARGV[4]) - entry_conns(before), nil, ARGV[7])
redis.call("publish", ARGV[6], "u" .. ARGV[1] .. " " .. ARGV[5] .. "\n" .. ARGV[3])
return 1
