-- Publishes one room message: gives it the room's next offset, keeps it in the room's history and
-- publishes it to the room's channel, atomically, so every node sees the room's messages in one
-- order with gap-free offsets.
-- KEYS[1]: the room's meta hash (offset, epoch); KEYS[2]: its history stream; KEYS[3]: the era
--          hash (see era.lua); KEYS[4]: the room's members hash; KEYS[5], when the message has a
--          dedup key: what the key's message got (its offset), kept for the dedup window.
-- ARGV: message (a JSON object), history size, history TTL (s), meta TTL while the room has
--       members (s; without, the history's), channel, an epoch for a room that has none, the
--       node's generation, the highest era clock the node saw, the dedup window (s).
-- A message whose dedup key was published within the window is not published again: the answer
-- is the first one's offset.
-- Returns {offset, the era's clock, the room's epoch}; an ERA_CHANGED error (nothing written) under a generation
-- that is not the cluster's.
if not era_is(KEYS[3], ARGV[7], ARGV[8]) then
  return redis.error_reply(ERA_CHANGED)
end
-- Counted first: nothing below can fail once the clock is known to be a count.
local clock = era_tick(KEYS[3])
local epoch = room_epoch(KEYS[1], KEYS[2], ARGV[6])
if KEYS[5] then
  local first = redis.pcall("get", KEYS[5])
  if type(first) == "string" and tonumber(first) then
    return {tonumber(first), clock, epoch}
  end
end
local offset = redis.call("hincrby", KEYS[1], "offset", 1)
if redis.call("exists", KEYS[4]) == 1 then
  redis.call("expire", KEYS[1], ARGV[4])
else
  redis.call("expire", KEYS[1], ARGV[3])
end
if tonumber(ARGV[2]) > 0 then
  redis.call("xadd", KEYS[2], "maxlen", ARGV[2], offset .. "-0", "m", ARGV[1])
  redis.call("expire", KEYS[2], ARGV[3])
end
if KEYS[5] then
  redis.call("set", KEYS[5], offset, "ex", ARGV[9])
end
redis.call("publish", ARGV[5], "s" .. offset .. " " .. epoch .. "\n" .. ARGV[1])
return {offset, clock, epoch}
