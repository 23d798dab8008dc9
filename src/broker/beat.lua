-- A node says it is alive until now + TTL (Redis's clock, the same for every node), keeps its
-- sessions as long, and reads which nodes are alive.
-- KEYS[1]: the nodes hash: node -> alive until (ms); KEYS[2]: the node's sessions hash.
-- ARGV: node, TTL (ms).
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("hset", KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
redis.call("pexpire", KEYS[2], ARGV[2])
return {now, redis.call("hgetall", KEYS[1])}
