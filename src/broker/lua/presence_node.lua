-- Replaces everything a room's presence hash holds of one node (after the node reconnected: what
-- changed while Redis was away was not recorded), and tells the nodes following the room.
-- KEYS[1]: the room's presence hash (see presence.lua).
-- ARGV: node, change number, channel, TTL (s), then the node's entries: user, entry (JSON), ...
as_kind(KEYS[1], "hash")
local prefix = ARGV[1] .. "\31"
for _, field in ipairs(redis.call("hkeys", KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then
    redis.call("hdel", KEYS[1], field)
  end
end
local entries = {}
for i = 5, #ARGV, 2 do
  redis.call("hset", KEYS[1], prefix .. ARGV[i], ARGV[i + 1])
  table.insert(entries, ARGV[i + 1])
end
redis.call("hset", KEYS[1], "#" .. ARGV[1], ARGV[2])
redis.call("expire", KEYS[1], ARGV[4])
redis.call("publish", ARGV[3], "U" .. ARGV[1] .. " " .. ARGV[2] .. "\n[" .. table.concat(entries, ",") .. "]")
return 1
