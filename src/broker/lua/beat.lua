-- A node says it is alive until now + TTL, keeps its sessions as long, forgets nodes silent for
-- long, and reads the nodes and until when each is alive (with Redis's clock, the same for all).
-- Also returns until when this node was alive before this beat (0: not listed): a node that
-- finds it had lapsed rewrites its presence and sessions.
-- Also reads the era (see era.lua): whether the node's generation is still the cluster's, and
-- the era's clock (lower than what the node saw: Redis went back in time).
-- Also records what the node says of itself (its status, for the server API's list of nodes).
-- KEYS[1]: the nodes hash: node -> alive until (ms); KEYS[2]: the node's sessions hash;
-- KEYS[3]: the era hash; KEYS[4]: the nodes' status hash: node -> JSON.
-- ARGV: node, TTL (ms), how long after its end a node is forgotten (ms), the node's generation,
-- its status.
as_kind(KEYS[1], "hash")
as_kind(KEYS[2], "hash")
as_kind(KEYS[4], "hash")
local now = now_ms()
local before = ms(redis.call("hget", KEYS[1], ARGV[1]))
redis.call("hset", KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
redis.call("hset", KEYS[4], ARGV[1], ARGV[5])
redis.call("pexpire", KEYS[2], ARGV[2])
local nodes = redis.call("hgetall", KEYS[1])
local kept = {}
for i = 1, #nodes, 2 do
  local until_ms = ms(nodes[i + 1])
  if until_ms + tonumber(ARGV[3]) < now then
    redis.call("hdel", KEYS[1], nodes[i])
  else
    table.insert(kept, nodes[i])
    table.insert(kept, until_ms)
  end
end
-- Statuses of nodes no longer listed go too: those just forgotten, and any a version that did
-- not remove them left.
local statuses = redis.call("hkeys", KEYS[4])
local listed = {}
for i = 1, #kept, 2 do
  listed[kept[i]] = true
end
for _, node in ipairs(statuses) do
  if not listed[node] then
    redis.call("hdel", KEYS[4], node)
  end
end
local same_era = 0
if era_is(KEYS[3], ARGV[4]) then
  same_era = 1
end
local clock = tonumber(redis.call("hget", KEYS[3], "clock") or "0") or 0
return {now, before, kept, same_era, clock}
