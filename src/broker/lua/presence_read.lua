-- Reads who is in a room on live nodes, for the server API (sync.lua is the read of a node that
-- follows the room, and cleans up on the way; this one leaves the room's keys as they are).
-- KEYS[1]: the room's presence hash (see presence.lua); KEYS[2]: the nodes hash.
-- Returns the presence hash's fields of live nodes, flat: field, value, ...
local alive = alive_nodes(KEYS[2])
if redis.call("type", KEYS[1])["ok"] ~= "hash" then
  return {}
end
local kept = {}
local fields = redis.call("hgetall", KEYS[1])
for i = 1, #fields, 2 do
  local field = fields[i]
  local node = field_node(field)
  if node and alive[node] then
    table.insert(kept, field)
    table.insert(kept, fields[i + 1])
  end
end
return kept
