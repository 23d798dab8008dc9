-- The cluster's generation: every room's keys are named under it ("wsgate:<gen>:..."), and a new
-- one starts every room over (new epochs: clients are told to resync, never given a history that
-- diverges from what they saw). Run by each node as it connects. A generation is
-- "<seq>-<hex>", its sequence number one above the one it replaced.
-- A new generation starts when Redis has none (new, flushed, restarted without its data, or a
-- record that is not wsgate's); when it has the node's but with fewer writes than the node saw,
-- or one older than the node's (Redis went back in time: restarted from an older snapshot,
-- failed over to a lagging replica); or when the node found a room that went back and asks for
-- one (`force`, only against the generation it knows). A node that knows none (just started)
-- takes the one Redis has.
-- KEYS[1]: the era hash (gen, clock).
-- ARGV: the node's generation ("": none yet), the highest clock the node saw in it, a random
--       hex part for a new generation, "1" to force one.
-- Returns {generation, clock, 1 if it started a new one (else 0), 1 if the record it found was
-- not wsgate's (else 0)}.
local kind = redis.call("type", KEYS[1])["ok"]
local gen, clock
if kind == "hash" then
  gen = redis.call("hget", KEYS[1], "gen")
  clock = era_clock(redis.call("hget", KEYS[1], "clock"))
end
local malformed = kind ~= "none" and (kind ~= "hash" or not era_seq(gen) or not clock)
if malformed then
  gen = nil
end
local mine = ARGV[1]
local start
if not gen then
  start = true
elseif gen == mine then
  start = clock < tonumber(ARGV[2]) or ARGV[4] == "1"
else
  -- Another node started a newer one (take it), or Redis went back to one this node left.
  start = mine ~= "" and era_seq(gen) <= (era_seq(mine) or 0)
end
local flag = malformed and 1 or 0
if start then
  local new = (math.max(era_seq(gen) or 0, era_seq(mine) or 0) + 1) .. "-" .. ARGV[3]
  redis.call("del", KEYS[1])
  redis.call("hset", KEYS[1], "gen", new, "clock", 0)
  if kind == "none" then
    -- The rooms index of versions before generations, which had no time-to-live.
    redis.call("del", "wsgate:rooms")
  end
  return {new, 0, 1, flag}
end
return {gen, clock, 0, flag}
