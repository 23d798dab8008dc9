-- A node stopping: it is no longer alive and its sessions are gone. (Its presence leaves each
-- room with presence_node.lua and no entries.)
-- KEYS[1]: the nodes hash; KEYS[2]: the node's sessions hash; KEYS[3]: the nodes' status hash.
-- ARGV: node.
as_kind(KEYS[1], "hash")
redis.call("hdel", KEYS[1], ARGV[1])
redis.call("hdel", KEYS[3], ARGV[1])
redis.call("del", KEYS[2])
return 1
