-- Reads where a room's stream is (offset, epoch), its history and who is in it on live nodes.
-- KEYS[1]: the room's meta hash; KEYS[2]: its history stream; KEYS[3]: its presence hash (see
-- presence.lua); KEYS[4]: the nodes hash (see beat.lua); KEYS[5]: the era hash (see era.lua);
-- KEYS[6]: its members hash; KEYS[7]: the rooms index.
-- ARGV: an epoch for a room that has none, meta TTL (s), first offset wanted (0: the most
--       recent messages), most messages returned, the epoch of that offset ("": none), whether
--       to read the presence ("1") or not ("0": an empty list is returned), the node's
--       generation (an ERA_CHANGED error, nothing read or written, when it is not the cluster's),
--       meta TTL when the room has no member (s), the room.
-- Presence fields of nodes that are not alive are left out; those of nodes no longer listed,
-- and fields that are not wsgate's, are deleted on the way (see lib.lua's alive_nodes: listed
-- dead nodes are forget_node.lua's to take out), and the reply says how many of the latter
-- there were.
if not era_is(KEYS[5], ARGV[7]) then
  return redis.error_reply(ERA_CHANGED)
end
local epoch = room_epoch(KEYS[1], KEYS[2], ARGV[1])
if redis.call("exists", KEYS[6]) == 1 then
  redis.call("expire", KEYS[1], ARGV[2])
else
  redis.call("expire", KEYS[1], ARGV[8])
end
local top = tonumber(redis.call("hget", KEYS[1], "offset") or "0")
local from = tonumber(ARGV[3]) or 0
if from > 0 and ARGV[5] ~= epoch then
  -- The stream started over: all of the new epoch is wanted.
  from = 1
end
local entries
if from > 0 then
  entries = redis.call("xrange", KEYS[2], from .. "-0", "+", "count", ARGV[4])
else
  entries = redis.call("xrevrange", KEYS[2], "+", "-", "count", ARGV[4])
end
local presence = {}
local malformed = 0
if ARGV[6] == "1" then
  as_kind(KEYS[3], "hash")
  local alive, listed = alive_nodes(KEYS[4])
  local fields = redis.call("hgetall", KEYS[3])
  for i = 1, #fields, 2 do
    local field = fields[i]
    local node = field_node(field)
    local entry_ok = string.sub(field, 1, 1) == "#" or pcall(cjson.decode, fields[i + 1])
    if not node or not entry_ok then
      malformed = malformed + 1
      redis.call("hdel", KEYS[3], field)
    elseif alive[node] then
      table.insert(presence, field)
      table.insert(presence, fields[i + 1])
    elseif not listed[node] then
      redis.call("hdel", KEYS[3], field)
    end
  end
  as_kind(KEYS[6], "hash")
  local counts = redis.call("hgetall", KEYS[6])
  for i = 1, #counts, 2 do
    if not listed[counts[i]] then
      redis.call("hdel", KEYS[6], counts[i])
    end
  end
  if redis.call("exists", KEYS[6]) == 0 then
    as_kind(KEYS[7], "zset")
    redis.call("zrem", KEYS[7], ARGV[9])
  end
  room_lifetime(KEYS[1], KEYS[3], KEYS[6], ARGV[2], ARGV[8])
end
return {top, epoch, entries, presence, malformed}
