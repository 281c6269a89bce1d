package.path = "bench/?.lua;" .. package.path
local c = require("common")
setup = c.setup
done = c.done
