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

-- The connections a presence entry (JSON, or nil) counts; 0 for one that is not wsgate's.
local function entry_conns(entry)
  if not entry then
    return 0
  end
  local ok, decoded = pcall(cjson.decode, entry)
  if not ok or type(decoded) ~= "table" then
    return 0
  end
  local n = tonumber(decoded["conns"]) or 0
  if n ~= n or n < 0 then
    return 0
  end
  return math.floor(n)
end

-- A room's members hash (node -> its connections in the room) changed for `node`: by `delta`, or
-- set to `total`. `node_rooms` (a set per node) lists the rooms where the node has members, so
-- that a node that dies is swept out of them (forget_node.lua) and its members do not keep a
-- room (and its keys) alive. The room is in the rooms index (a sorted set, all scores 0, read in name
-- order) while any node has connections in it, and the hash lives `ttl` seconds past its last
-- change, as the presence hash does. Counting here lets the server API count a room's members
-- per node instead of reading every user's entry.
local function count_members(members, index, room, node, delta, total, ttl, node_rooms)
  as_kind(members, "hash")
  as_kind(index, "zset")
  local conns = total
  if not conns then
    conns = (tonumber(redis.call("hget", members, node)) or 0) + delta
  end
  as_kind(node_rooms, "set")
  if conns > 0 then
    redis.call("hset", members, node, conns)
    redis.call("sadd", node_rooms, room)
    redis.call("expire", node_rooms, ttl)
    redis.call("zadd", index, 0, room)
    -- Rooms leave the index with their last member; one whose counts expired (no change for
    -- as long) is taken out as a page passes it, and the index itself goes when nothing changed.
    redis.call("expire", index, ttl)
  else
    redis.call("hdel", members, node)
    redis.call("srem", node_rooms, room)
  end
  -- It lives as long as the presence hash, whose every change refreshes both.
  if redis.call("hlen", members) > 0 then
    redis.call("expire", members, ttl)
  else
    redis.call("zrem", index, room)
  end
end

-- A room's keys live while it has members (`with_members` seconds past each change), then
-- `empty` seconds (its history's time-to-live): a room nobody is in goes with its history,
-- whatever its name, and its presence hash with its last member. Members are those the members
-- hash counts (see count_members).
local function room_lifetime(meta, presence, members, with_members, empty)
  if redis.call("exists", members) == 1 then
    redis.call("expire", presence, with_members)
    redis.call("expire", meta, with_members)
  else
    redis.call("del", presence)
    redis.call("expire", meta, empty)
  end
end

-- The node a presence field is of ("#<node>" or "<node>\31<user>"); nil for a field that is not
-- wsgate's.
local function field_node(field)
  if string.sub(field, 1, 1) == "#" then
    return string.sub(field, 2)
  end
  return string.match(field, "^([^\31]*)\31")
end

-- Which nodes are alive (node -> true), from the nodes hash (see beat.lua); and, second, which
-- are listed there at all, alive or not. A listed node that is not alive is swept out of its
-- rooms by forget_node.lua, which reports who left with it; one no longer listed (forgotten
-- after a long silence) was swept before, and what is left of it may be deleted as found.
local function alive_nodes(nodes_key)
  as_kind(nodes_key, "hash")
  local now = now_ms()
  local alive = {}
  local listed = {}
  local nodes = redis.call("hgetall", nodes_key)
  for i = 1, #nodes, 2 do
    listed[nodes[i]] = true
    if ms(nodes[i + 1]) >= now then
      alive[nodes[i]] = true
    end
  end
  return alive, listed
end

-- Who is in a room across the cluster, for webhooks: the nodes counted are those of the room's
-- members hash, dead ones not yet swept included (their members count until forget_node.lua
-- takes them out), so that a user's or the room's first and last connection are each seen by
-- one script run (Redis runs one at a time), whose node reports it.

-- A user's connections in a room: its presence hash's entries of `nodes` (the room's members
-- hash's keys, read once per script and state: HKEYS).
local function user_conns(presence, nodes, user)
  local n = 0
  for _, node in ipairs(nodes) do
    n = n + entry_conns(redis.call("hget", presence, node .. "\31" .. user))
  end
  return n
end

-- A room's connections (its members hash).
local function room_conns(members)
  local n = 0
  for _, count in ipairs(redis.call("hvals", members)) do
    n = n + (tonumber(count) or 0)
  end
  return n
end

-- Appends to `changes` a change of a user's (`entry`: its presence entry, JSON) or the room's
-- (`entry`: false) connections from `before` to `after`, when it is a first or a last: four
-- values, the room, the entry, before, after.
local function note_change(changes, room, entry, before, after)
  if (before == 0) ~= (after == 0) then
    for _, value in ipairs({room, entry, before, after}) do
      changes[#changes + 1] = value
    end
  end
end

-- The era's clock as wsgate writes it, a count (digits only, far below 2^53 so that HINCRBY and
-- Lua's numbers both hold it), or nil for anything else.
local function era_clock(value)
  if type(value) ~= "string" or #value > 15 or not string.match(value, "^%d+$") then
    return nil
  end
  return tonumber(value)
end

-- A generation's sequence number, from its name as wsgate writes it ("<seq>-<hex>"), or nil.
local function era_seq(gen)
  local seq = type(gen) == "string" and string.match(gen, "^(%d+)%-%x+$")
  if not seq or #seq > 15 then
    return nil
  end
  return tonumber(seq)
end

-- Whether `gen` is the cluster's generation (see era.lua), and (given `seen`, the highest clock
-- the writing node saw) whether Redis has all the writes the node saw: every script that writes
-- a room's keys checks it first, so that no node writes under a generation Redis no longer has,
-- nor hands out offsets again after Redis went back in time (the node reconnects and reads the
-- generation anew).
local function era_is(era, gen, seen)
  -- One read; a key that is not a hash, or a clock that is not a count, is no generation
  -- (era.lua starts one over it).
  local read = redis.pcall("hmget", era, "gen", "clock")
  if read["err"] or read[1] ~= gen then
    return false
  end
  local clock = era_clock(read[2])
  return clock ~= nil and (not seen or clock >= tonumber(seen))
end

-- Counts one write of the generation; returns the count (the era's clock). Each node remembers
-- the highest clock its writes got: a Redis whose clock is lower has lost writes.
local function era_tick(era)
  return redis.call("hincrby", era, "clock", 1)
end

local ERA_CHANGED = "WSGATE_ERA the cluster's generation changed: reconnect"
