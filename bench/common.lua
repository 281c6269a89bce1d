-- Shared by the wrk scripts: the service key header, and a done() that prints one
-- JSON line the runner parses (wrk's own summary is printed too).
local M = {}

M.key = os.getenv("BENCH_KEY") or ""
M.run = os.getenv("BENCH_RUN") or tostring(os.time())
M.first = tonumber(os.getenv("BENCH_USER_FIRST") or "1")
M.last = tonumber(os.getenv("BENCH_USER_LAST") or "1")

local threads = {}
function M.setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function M.done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local status = summary.errors.status + summary.errors.connect + summary.errors.read
                 + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    'WRK_JSON {"requests": %d, "seconds": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, ' ..
    '"p99_ms": %.3f, "max_ms": %.3f, "errors": %d, "non2xx": %d}\n',
    summary.requests, secs, summary.requests / secs, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000, status,
    summary.errors.status))
end

return M
