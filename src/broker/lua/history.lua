-- Reads a room's recent messages for the server API, writing nothing.
-- KEYS[1]: the room's meta hash; KEYS[2]: its history stream; KEYS[3]: the era hash (see era.lua).
-- ARGV: the node's generation, the first offset wanted, most messages, "newest" (from the
--       latest down to the first wanted) or "oldest" (from the first wanted up).
-- Returns {offset, epoch ("": a room Redis does not hold), entries}; an ERA_CHANGED error under
-- a generation that is not the cluster's. Keys that are not wsgate's read as no room.
if not era_is(KEYS[3], ARGV[1]) then
  return redis.error_reply(ERA_CHANGED)
end
local meta = redis.pcall("hmget", KEYS[1], "offset", "epoch")
if meta["err"] or not meta[2] then
  return {0, "", {}}
end
local top = tonumber(meta[1] or "0")
if not top or top < 0 or top ~= math.floor(top) or top >= 2^53 then
  return {0, "", {}}
end
local entries
if ARGV[4] == "newest" then
  entries = redis.pcall("xrevrange", KEYS[2], "+", ARGV[2] .. "-0", "count", ARGV[3])
else
  entries = redis.pcall("xrange", KEYS[2], ARGV[2] .. "-0", "+", "count", ARGV[3])
end
if entries["err"] then
  entries = {}
end
return {top, meta[2], entries}
