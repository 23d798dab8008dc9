-- The cluster's generation: every room's keys are named under it ("wsgate:<gen>:..."), and a new
-- one starts every room over (new epochs: clients are told to resync, never given a history that
-- diverges from what they saw). Run by each node as it connects.
-- A new generation starts when Redis has none (new, flushed, restarted without its data), when it
-- has the node's but with fewer writes than the node saw (Redis went back in time: restarted
-- from an older snapshot, failed over to a lagging replica), or when the node found a room that
-- went back and asks for one (`force`, only against the generation it knows).
-- KEYS[1]: the era hash (gen, clock).
-- ARGV: the node's generation ("": none yet), the highest clock the node saw in it, a new
--       generation to start, "1" to force one.
-- Returns {generation, clock, the generation it replaced ("": none, or not replaced)}.
as_kind(KEYS[1], "hash")
local gen = redis.call("hget", KEYS[1], "gen")
local clock = tonumber(redis.call("hget", KEYS[1], "clock") or "0") or 0
local known = gen and gen == ARGV[1]
local behind = known and clock < tonumber(ARGV[2])
local forced = known and ARGV[4] == "1"
if not gen or behind or forced then
  redis.call("del", KEYS[1])
  redis.call("hset", KEYS[1], "gen", ARGV[3], "clock", 0)
  return {ARGV[3], 0, gen or ""}
end
return {gen, clock, ""}
