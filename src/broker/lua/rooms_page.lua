-- One page of the rooms that have members on live nodes, in name order, with their members
-- (connections) counted from each room's members hash (see lib.lua's count_members), live nodes
-- only; counts of nodes no longer listed are deleted on the way (see lib.lua's alive_nodes), and
-- rooms with no member on a live node taken out of the index.
-- KEYS[1]: the nodes hash; KEYS[2]: the rooms index.
-- ARGV: the room to start after ("": from the first), most rooms returned, most rooms looked at
--       (bounds the work of one call), the generation's key prefix ("wsgate:<gen>:").
-- Returns {room, members, room, members, ...} and the room to continue after ("": none left).
-- A room's members hash is "<prefix>members:{<room>}" (keys.rs), named here from the index.
local alive, listed = alive_nodes(KEYS[1])
as_kind(KEYS[2], "zset")
local limit = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local start = "-"
if ARGV[1] ~= "" then
  start = "(" .. ARGV[1]
end
local page = {}
while true do
  local batch = redis.call("zrangebylex", KEYS[2], start, "+", "limit", 0, limit)
  if #batch == 0 then
    return {page, ""}
  end
  for _, room in ipairs(batch) do
    if #page == 2 * limit or budget == 0 then
      -- More may follow: the caller continues after the last room looked at.
      return {page, string.sub(start, 2)}
    end
    budget = budget - 1
    start = "(" .. room
    local key = ARGV[4] .. "members:{" .. room .. "}"
    as_kind(key, "hash")
    local counts = redis.call("hgetall", key)
    local members = 0
    for i = 1, #counts, 2 do
      if alive[counts[i]] then
        members = members + (tonumber(counts[i + 1]) or 0)
      elseif not listed[counts[i]] then
        redis.call("hdel", key, counts[i])
      end
    end
    if members > 0 then
      table.insert(page, room)
      table.insert(page, members)
    else
      redis.call("zrem", KEYS[2], room)
    end
  end
end
