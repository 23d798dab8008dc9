-- Shared by wsgate's scripts: loaded in front of each.

-- The room's epoch: the one in its meta hash, or `new`, recorded, with the room's history started
-- afresh (a history left from an expired epoch would hold offsets the new one reuses).
local function room_epoch(meta, history, new)
  local epoch = redis.call("hget", meta, "epoch")
  if not epoch then
    epoch = new
    redis.call("hset", meta, "epoch", epoch)
    redis.call("del", history)
  end
  return epoch
end

-- Redis's clock in milliseconds: the same for every node.
local function now_ms()
  local t = redis.call("time")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
