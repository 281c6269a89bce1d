-- POST /api/tokens/consume/batch (or BENCH_PATH: bench/floor.py's batch-ledger) with
-- BENCH_BATCH (default 1000) fresh operations per request, spread over the load users.
package.path = "bench/?.lua;" .. package.path
local c = require("common")
setup = c.setup
done = c.done

local size = tonumber(os.getenv("BENCH_BATCH") or "1000")
local span = c.last - c.first + 1
local ops = {"consensus", "analysis", "summary", "comparison"}
local n = 0

function request()
  n = n + 1
  local items = {}
  for i = 1, size do
    local user = c.first + ((n * size + i + tid * 977) % span)
    items[i] = string.format(
      '{"userId": %d, "operationId": "bb-%s-%d-%d-%d", "tokens": %d, "operationType": "%s", "provider": "openai"}',
      user, c.run, tid, n, i, 1 + (i % 500), ops[(i % 4) + 1])
  end
  local body = '{"operations": [' .. table.concat(items, ",") .. ']}'
  return wrk.format("POST", os.getenv("BENCH_PATH") or "/api/tokens/consume/batch", {
    ["Authorization"] = "Api-Key " .. c.key, ["Content-Type"] = "application/json"}, body)
end
