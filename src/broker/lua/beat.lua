-- A node says it is alive until now + TTL, keeps its sessions as long, forgets nodes silent for
-- long, and reads the nodes and until when each is alive (with Redis's clock, the same for all).
-- KEYS[1]: the nodes hash: node -> alive until (ms); KEYS[2]: the node's sessions hash.
-- ARGV: node, TTL (ms), how long after its end a node is forgotten (ms).
local now = now_ms()
redis.call("hset", KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
redis.call("pexpire", KEYS[2], ARGV[2])
local nodes = redis.call("hgetall", KEYS[1])
local kept = {}
for i = 1, #nodes, 2 do
  local until_ms = tonumber(nodes[i + 1]) or 0
  if until_ms + tonumber(ARGV[3]) < now then
    redis.call("hdel", KEYS[1], nodes[i])
  else
    table.insert(kept, nodes[i])
    table.insert(kept, until_ms)
  end
end
return {now, kept}
