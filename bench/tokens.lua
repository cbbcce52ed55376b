-- wrk script: GET jwt-test with a bearer token taken in turn from the file named by the first
-- script argument; `delay_ms` (second argument, optional) paces each connection; the third
-- (optional) is another path to GET with the same headers (`/healthz`: the HTTP floor); the
-- fourth (optional) is where in the file to begin, counted from 0 and taken modulo its length
-- (bench/lib.sh `drive` goes on where its last run stopped).
-- At the end it prints one machine-readable RESULT line for bench/load.sh.
local tokens = {}
local next_index = 0
local delay_ms = 0
local path = "/functions/v1/jwt-test"

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      tokens[#tokens + 1] = "Bearer " .. line
    end
  end
  if #tokens == 0 then
    error("no tokens in " .. args[1])
  end
  delay_ms = tonumber(args[2] or "0")
  path = args[3] or path
  if delay_ms > 0 then
    -- Defined only when pacing, since wrk times every request when a script has `delay`.
    delay = function() return delay_ms end
  end
  if args[4] then
    next_index = tonumber(args[4]) % #tokens
  else
    -- Threads start at different places so they do not send the same token at once.
    next_index = math.random(#tokens) - 1
  end
end

function request()
  next_index = next_index % #tokens + 1
  return wrk.format("GET", path, { ["Authorization"] = tokens[next_index] })
end

function done(summary, latency, requests)
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
