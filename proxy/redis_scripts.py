"""The Lua scripts the Redis store runs: each change is one atomic script, so that the
state, the event list and the change message never disagree (see redis_store.py)."""

# KEYS: state, events. ARGV: expected generation, new state, event, max events, channel,
# the change message (state and event, for the other instances' listeners).
# Returns {1, new} on success, {0, current} on a generation mismatch, {-1} when empty.
CAS = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {-1} end
if tonumber(cjson.decode(cur)['generation']) ~= tonumber(ARGV[1]) then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, ARGV[2]}
"""

# KEYS: state. ARGV: candidate state, its generation, channel.
# SET NX generalised to "newest wins": store the candidate when the key is missing or
# holds an older generation. Returns {1, candidate} when stored, else {0, current}.
SEED = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cjson.decode(cur)['generation']) >= tonumber(ARGV[2]) then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, ARGV[1]}
"""

# KEYS: lease. ARGV: owner, ttl ms. Take the lease when free, renew it when ours.
LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
