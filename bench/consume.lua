-- POST /api/tokens/consume (or BENCH_PATH: the floor views of bench/floor.py) with a
-- fresh operation id every time, users spread over BENCH_USER_FIRST..BENCH_USER_LAST
-- (one user when both are the same).
package.path = "bench/?.lua;" .. package.path
local c = require("common")
setup = c.setup
done = c.done

local n = 0
local span = c.last - c.first + 1
local ops = {"consensus", "analysis", "summary", "comparison"}

function request()
  n = n + 1
  local user = c.first + ((n * 7 + tid * 131) % span)
  local body = string.format(
    '{"userId": %d, "operationId": "b-%s-%d-%d", "tokens": %d, "operationType": "%s", "provider": "openai", ' ..
    '"model": "gpt-4o", "estimatedTokens": %d}',
    user, c.run, tid, n, 100 + (n % 900), ops[(n % 4) + 1], 120 + (n % 800))
  return wrk.format("POST", os.getenv("BENCH_PATH") or "/api/tokens/consume", {
    ["Authorization"] = "Api-Key " .. c.key, ["Content-Type"] = "application/json"}, body)
end
