-- Reads where a room's stream is (offset, epoch; an epoch is made for a room that has none) and
-- its history: from an offset on, or the most recent messages.
-- KEYS[1]: the room's meta hash; KEYS[2]: its history stream.
-- ARGV: an epoch for a room that has none, meta TTL (s), first offset wanted (0: the most
--       recent), most messages returned.
local epoch = redis.call("hget", KEYS[1], "epoch")
if not epoch then
  epoch = ARGV[1]
  redis.call("hset", KEYS[1], "epoch", epoch)
  redis.call("del", KEYS[2])
end
redis.call("expire", KEYS[1], ARGV[2])
local top = tonumber(redis.call("hget", KEYS[1], "offset") or "0")
local entries
if tonumber(ARGV[3]) > 0 then
  entries = redis.call("xrange", KEYS[2], ARGV[3] .. "-0", "+", "count", ARGV[4])
else
  entries = redis.call("xrevrange", KEYS[2], "+", "-", "count", ARGV[4])
end
return {top, epoch, entries}
