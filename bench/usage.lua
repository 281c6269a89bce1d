-- GET /api/tokens/usage?userId=BENCH_USER_FIRST
package.path = "bench/?.lua;" .. package.path
local c = require("common")
setup = c.setup
done = c.done

function init(args)
  wrk.path = "/api/tokens/usage?userId=" .. c.first
  wrk.headers["Authorization"] = "Api-Key " .. c.key
end
