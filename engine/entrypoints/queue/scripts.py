"""The worker's Lua scripts: each result is written, and its job acked, in
one atomic step."""

# KEYS: results stream, jobs stream, then one result key per job. ARGV: group,
# results stream maxlen (0: untrimmed), result ttl in seconds (0: kept), "1" to
# delete answered entries from the jobs stream, then (entry id, job id, result
# JSON) per job. SET NX makes the first result of a job id the only one; the
# stream gets it only if it won. Returns 1 per job written, 0 where the job id
# already had a result (only acked).
COMMIT = """
local written = {}
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local j = 0
for i = 5, #ARGV, 3 do
  j = j + 1
  local won
  if ttl > 0 then
    won = redis.call('SET', KEYS[2 + j], ARGV[i + 2], 'NX', 'EX', ttl)
  else
    won = redis.call('SET', KEYS[2 + j], ARGV[i + 2], 'NX')
  end
  if won then
    if maxlen > 0 then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'id', ARGV[i + 1],
                 'result', ARGV[i + 2])
    else
      redis.call('XADD', KEYS[1], '*', 'id', ARGV[i + 1], 'result', ARGV[i + 2])
    end
  end
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[i])
  if ARGV[4] == '1' then
    redis.call('XDEL', KEYS[2], ARGV[i])
  end
  written[j] = won and 1 or 0
end
return written
"""

# KEYS: jobs stream, dead-letter stream. ARGV: group, entry id, dead-letter
# maxlen (0: untrimmed), "1" to delete the entry from the jobs stream, then
# field, value pairs. The dead letter is added only by the consumer whose XACK
# took the entry out of the pending list, so two workers never both add it.
BURY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local maxlen = tonumber(ARGV[3])
  if maxlen > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 5))
  else
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  end
  if ARGV[4] == '1' then
    redis.call('XDEL', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
"""
