-- Shared by wsgate's scripts: loaded in front of each.

-- `key` as a `kind` ("hash", "stream"), deleted first when something else holds it there: a key
-- of wsgate's that is not what wsgate wrote is corrupt, and starting it over is the recovery.
local function as_kind(key, kind)
  local found = redis.call("type", key)["ok"]
  if found ~= "none" and found ~= kind then
    redis.call("del", key)
  end
end

-- The room's epoch: the one in its meta hash, or `new`, recorded, with the room's history started
-- afresh (a history left from an expired epoch would hold offsets the new one reuses). A meta hash
-- whose offset is not a count is started over the same way.
local function room_epoch(meta, history, new)
  as_kind(meta, "hash")
  as_kind(history, "stream")
  local epoch = redis.call("hget", meta, "epoch")
  local offset = redis.call("hget", meta, "offset")
  local count = tonumber(offset or "0")
  if not epoch or not count or count < 0 or count ~= math.floor(count) or count >= 2^53 then
    epoch = new
    redis.call("del", meta, history)
    redis.call("hset", meta, "epoch", epoch)
  end
  return epoch
end

-- Redis's clock in milliseconds: the same for every node.
local function now_ms()
  local t = redis.call("time")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A time in milliseconds read from the nodes hash: a number, or 0.
local function ms(value)
  local n = tonumber(value) or 0
  if n ~= n or n < 0 or n >= 2^53 then
    return 0
  end
  return math.floor(n)
end
