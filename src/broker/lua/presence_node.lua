-- Replaces everything a room's presence hash holds of one node (after the node reconnected: what
-- changed while Redis was away was not recorded), and tells the nodes following the room.
-- KEYS[1]: the room's presence hash (see presence.lua); KEYS[2]: its members hash; KEYS[3]: the
-- rooms index.
-- ARGV: node, change number, channel, TTL (s), room, then the node's entries: user, entry
-- (JSON), ...
as_kind(KEYS[1], "hash")
local prefix = ARGV[1] .. "\31"
for _, field in ipairs(redis.call("hkeys", KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then
    redis.call("hdel", KEYS[1], field)
  end
end
local entries = {}
local conns = 0
for i = 6, #ARGV, 2 do
  redis.call("hset", KEYS[1], prefix .. ARGV[i], ARGV[i + 1])
  table.insert(entries, ARGV[i + 1])
  conns = conns + entry_conns(ARGV[i + 1])
end
redis.call("hset", KEYS[1], "#" .. ARGV[1], ARGV[2])
redis.call("expire", KEYS[1], ARGV[4])
count_members(KEYS[2], KEYS[3], ARGV[5], ARGV[1], nil, conns, ARGV[4])
redis.call("publish", ARGV[3], "U" .. ARGV[1] .. " " .. ARGV[2] .. "\n[" .. table.concat(entries, ",") .. "]")
return 1
