-- wrk script for benches/load/compare.sh: `GET /sns/jscode2session` code exchanges.
--
--   wrk ... -s workload.lua <url> -- <unique|duplicate|mixed> <prefix> <set_size> [<delay_ms>]
--
-- unique:    every request a js_code never sent before (<prefix><thread>x<n>), so every
--            request must go upstream;
-- duplicate: js_codes from a set of <set_size> (dup0 .. dup<set_size-1>), round robin, so
--            after the first round a proxy answers from its cache (or coalesces);
-- mixed:     every fifth request from the set, the other four unique (80 % / 20 %).
--
-- The codes are deterministic, not random, so every contender gets the same sequence. Give
-- each wrk run its own <prefix>: a warm-up and the measurement after it must not share codes.
-- With <delay_ms>, each connection waits that long before each request: compare.sh's pacing
-- of the open loop when oha is missing (an approximate rate; wrk does not correct the
-- latencies for requests that were due earlier).
-- done() prints one machine-readable line, read by compare.sh:
--   RESULT <requests> <duration_us> <non_2xx> <socket_errors> <p50_us> <p99_us> <p99.9_us>

local counter = 0
local dup_counter = 0
local mode = "unique"
local prefix = "run"
local set_size = 100
-- A global, so that setup() can set it in each thread's own Lua state.
thread_id = 0

-- The stand-in's default app; the proxies under test do not check credentials, the
-- upstream answers every code with success.
local head = "/sns/jscode2session?appid=wx00000000000000a1&secret=stand-in-secret-a1"
    .. "&grant_type=authorization_code&js_code="

local threads = 0
function setup(thread)
   thread:set("thread_id", threads)
   threads = threads + 1
end

function init(args)
   mode = args[1] or mode
   prefix = args[2] or prefix
   set_size = tonumber(args[3] or set_size)
   if args[4] then
      local pause = tonumber(args[4])
      -- wrk calls delay() before each request when the script defines it.
      delay = function() return pause end
   end
   if mode ~= "unique" and mode ~= "duplicate" and mode ~= "mixed" then
      error("workload must be unique, duplicate or mixed, not " .. tostring(mode))
   end
end

function request()
   counter = counter + 1
   local code
   if mode == "duplicate" or (mode == "mixed" and counter % 5 == 0) then
      code = "dup" .. (dup_counter % set_size)
      dup_counter = dup_counter + 1
   else
      code = prefix .. thread_id .. "x" .. counter
   end
   return wrk.format(nil, head .. code)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("RESULT %d %d %d %d %d %d %d\n",
      summary.requests, summary.duration, e.status,
      e.connect + e.read + e.write + e.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
