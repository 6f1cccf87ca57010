"""The Lua scripts of the Redis job queue: every state change of a job is one script, which
Redis runs atomically, so two workers never lease the same entry and two completions never
both win (no WATCH/MULTI retry loops, no lock keys that outlive a crashed worker).

Keys, under the prefix P (`twinserve:jobs:`):
```
P job:<id>                  hash: record (the Job's JSON at submit, without body), body, endpoint,
                            seq, entry (its current stream entry), status, attempts, max_attempts,
                            start_deadline_ms, receipt, worker, and the optional progress fields
P stream:<endpoint>         stream of {id} entries; consumer group `workers`; the pending list
                            (PEL) holds the entries of running jobs
P all:<endpoint>            zset of ids by seq (submission order), for listing and purge
P status:<endpoint>:<st>    zset of ids by seq, one per status: list, counts and depth
P cursor:<endpoint>         where the last XAUTOCLAIM scan stopped
P seq                       counter of submissions
```
Lease timing is the Redis server's clock: the pending entry's idle time. A lease for V seconds
sets the entry's idle time to HORIZON - V (XCLAIM … IDLE), so `XAUTOCLAIM … HORIZON` finds
exactly the entries whose lease ran out, whatever timeout each worker asked for; a heartbeat
sets it again. Workers on several hosts thus agree on expiry without synchronised clocks.
Scripts stop at no error midway (Redis would keep their earlier writes): every branch that
could fail is checked first.
"""

from __future__ import annotations

GROUP = "workers"

# Shared by every script: status moves keep the per-status zsets in step with the hash.
_PRELUDE = (
    """
local P = ARGV[1]
local GROUP = '"""
    + GROUP
    + """'
local FINAL = {succeeded = true, failed = true, expired = true}

local function move(job, id, new)
  local ep = redis.call('HGET', job, 'endpoint')
  local old = redis.call('HGET', job, 'status')
  local seq = redis.call('HGET', job, 'seq')
  redis.call('ZREM', P .. 'status:' .. ep .. ':' .. old, id)
  redis.call('ZADD', P .. 'status:' .. ep .. ':' .. new, seq, id)
  redis.call('HSET', job, 'status', new)
end

local function settle(job)
  -- the job's entry leaves the pending list and the stream: its state lives in the hash
  local stream = P .. 'stream:' .. redis.call('HGET', job, 'endpoint')
  local entry = redis.call('HGET', job, 'entry')
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
end

local function finish(job, id, status, now_iso, reason)
  settle(job)
  move(job, id, status)
  redis.call('HSET', job, 'finished_at', now_iso)
  if reason then redis.call('HSET', job, 'failure_reason', reason) end
  redis.call('HDEL', job, 'receipt', 'worker')
end

local function ensure_group(stream)
  -- fails with BUSYGROUP when it exists, which is the usual case
  redis.pcall('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
end
"""
)

# ARGV: P, id, endpoint, record, has_body, body, start_deadline_ms, max_attempts, ttl_s
SUBMIT = (
    _PRELUDE
    + """
local id, ep = ARGV[2], ARGV[3]
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 1 then return 0 end
local seq = redis.call('INCR', P .. 'seq')
local stream = P .. 'stream:' .. ep
ensure_group(stream)
local entry = redis.call('XADD', stream, '*', 'id', id)
redis.call('HSET', job, 'record', ARGV[4], 'endpoint', ep, 'seq', seq, 'entry', entry,
  'status', 'queued', 'attempts', 0, 'start_deadline_ms', ARGV[7], 'max_attempts', ARGV[8],
  'ttl_s', ARGV[9])
if ARGV[5] == '1' then redis.call('HSET', job, 'body', ARGV[6]) end
redis.call('ZADD', P .. 'all:' .. ep, seq, id)
redis.call('ZADD', P .. 'status:' .. ep .. ':queued', seq, id)
return 1
"""
)

# ARGV: P, endpoint, worker, now_ms, now_iso, horizon_ms, idle_ms, limit, receipt 1..limit
# Returns a flat list: for each leased job, its receipt then its hash as HGETALL returns it.
LEASE = (
    _PRELUDE
    + """
local ep, worker, now_ms, now_iso = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local horizon, idle, limit = ARGV[6], ARGV[7], tonumber(ARGV[8])
local stream = P .. 'stream:' .. ep
local out, n = {}, 0
ensure_group(stream)

local function start(job, id, entry)
  n = n + 1
  local receipt = ARGV[8 + n]
  move(job, id, 'running')
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'receipt', receipt, 'worker', worker, 'started_at', now_iso)
  redis.call('XCLAIM', stream, GROUP, worker, 0, entry, 'IDLE', idle, 'JUSTID')
  table.insert(out, receipt)
  table.insert(out, redis.call('HGETALL', job))
end

local function stale(job, entry, want)
  -- an entry left behind by a retry (re-added) or a purge: drop it
  if redis.call('HGET', job, 'status') == want and redis.call('HGET', job, 'entry') == entry then
    return false
  end
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
  return true
end

-- 1) redeliver running jobs whose lease ran out (entries idle for the whole horizon)
local cursor = redis.call('GET', P .. 'cursor:' .. ep) or '0-0'
local claimed = redis.call('XAUTOCLAIM', stream, GROUP, worker, horizon, cursor, 'COUNT', limit)
redis.call('SET', P .. 'cursor:' .. ep, claimed[1])
for _, e in ipairs(claimed[2]) do
  -- (an entry deleted meanwhile comes without fields; XAUTOCLAIM drops it from the PEL itself)
  local entry, id = e[1], e[2] and e[2][2]
  local job = P .. 'job:' .. tostring(id)
  if id and not stale(job, entry, 'running') then
    local attempts = tonumber(redis.call('HGET', job, 'attempts'))
    local max = tonumber(redis.call('HGET', job, 'max_attempts'))
    if attempts >= max then
      finish(job, id, 'failed', now_iso,
        'lease expired on attempt ' .. attempts .. ' of ' .. max .. ' (worker lost)')
    else
      start(job, id, entry)
    end
  end
end

-- 2) new entries, oldest first; a job never started within its TTL expires instead
while n < limit do
  local got = redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', limit - n, 'STREAMS', stream, '>')
  if not got or #got[1][2] == 0 then break end
  for _, e in ipairs(got[1][2]) do
    local entry, id = e[1], e[2][2]
    local job = P .. 'job:' .. id
    if not stale(job, entry, 'queued') then
      local attempts = tonumber(redis.call('HGET', job, 'attempts'))
      if attempts == 0 and tonumber(redis.call('HGET', job, 'start_deadline_ms')) <= now_ms then
        local ttl = redis.call('HGET', job, 'ttl_s')
        finish(job, id, 'expired', now_iso, 'not started within its TTL of ' .. ttl .. ' s')
      else
        start(job, id, entry)
      end
    end
  end
end
return out
"""
)

# ARGV: P, id, receipt, worker, idle_ms. Returns the hash, or false if the lease is lost.
HEARTBEAT = (
    _PRELUDE
    + """
local job = P .. 'job:' .. ARGV[2]
if redis.call('HGET', job, 'status') ~= 'running' or redis.call('HGET', job, 'receipt') ~= ARGV[3] then
  return false
end
local stream = P .. 'stream:' .. redis.call('HGET', job, 'endpoint')
redis.call('XCLAIM', stream, GROUP, ARGV[4], 0, redis.call('HGET', job, 'entry'), 'IDLE', ARGV[5], 'JUSTID')
return redis.call('HGETALL', job)
"""
)

# ARGV: P, id, output_location, now_iso. Returns 1 if this completion won, else 0.
COMPLETE = (
    _PRELUDE
    + """
local id = ARGV[2]
local job = P .. 'job:' .. id
local status = redis.call('HGET', job, 'status')
if not status or FINAL[status] then return 0 end
finish(job, id, 'succeeded', ARGV[4], false)
redis.call('HSET', job, 'output_location', ARGV[3])
redis.call('HDEL', job, 'failure_reason')
return 1
"""
)

# ARGV: P, id, receipt, reason, retry ('1'/'0'), failure_location ('' = none), now_iso.
# Returns {'ok' | 'final' | 'lost', hash}.
FAIL = (
    _PRELUDE
    + """
local id = ARGV[2]
local job = P .. 'job:' .. id
local status = redis.call('HGET', job, 'status')
if not status then return {'lost', {}} end
if FINAL[status] then return {'final', redis.call('HGETALL', job)} end
if status ~= 'running' or redis.call('HGET', job, 'receipt') ~= ARGV[3] then
  return {'lost', redis.call('HGETALL', job)}
end
local attempts = tonumber(redis.call('HGET', job, 'attempts'))
local max = tonumber(redis.call('HGET', job, 'max_attempts'))
if ARGV[5] == '1' and attempts < max then
  settle(job)
  local stream = P .. 'stream:' .. redis.call('HGET', job, 'endpoint')
  local entry = redis.call('XADD', stream, '*', 'id', id)
  move(job, id, 'queued')
  redis.call('HSET', job, 'entry', entry, 'failure_reason', ARGV[4])
  redis.call('HDEL', job, 'receipt', 'worker')
else
  finish(job, id, 'failed', ARGV[7], ARGV[4])
  if ARGV[6] ~= '' then redis.call('HSET', job, 'failure_location', ARGV[6]) end
end
return {'ok', redis.call('HGETALL', job)}
"""
)
