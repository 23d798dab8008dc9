-- Reads where a room's stream is (offset, epoch; an epoch is made for a room that has none), its
-- history (from an offset on, or the most recent messages) and who is in it on live nodes.
-- KEYS[1]: the room's meta hash; KEYS[2]: its history stream; KEYS[3]: its presence hash (see
-- presence.lua); KEYS[4]: the nodes hash (see beat.lua).
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
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = {}
local nodes = redis.call("hgetall", KEYS[4])
for i = 1, #nodes, 2 do
  if tonumber(nodes[i + 1]) >= now then
    alive[nodes[i]] = true
  end
end
local presence = {}
local fields = redis.call("hgetall", KEYS[3])
for i = 1, #fields, 2 do
  local field = fields[i]
  local node
  if string.sub(field, 1, 1) == "#" then
    node = string.sub(field, 2)
  else
    node = string.match(field, "^([^\31]*)\31")
  end
  if node and alive[node] then
    table.insert(presence, field)
    table.insert(presence, fields[i + 1])
  end
end
return {top, epoch, entries, presence}
