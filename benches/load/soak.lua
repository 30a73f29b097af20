-- wrk script for benches/load/soak.sh: the well-behaved clients of a soak, a mix of every kind
-- of request a backend sends through wxgate.
--
--   wrk ... -s soak.lua <url> -- <prefix> <rush_every_s> <rush_for_s> <ttl_s>
--
-- Out of every 100 requests (calm seconds):
--   20 code exchanges with a code never sent before            (upstream: success)
--   10 replays of a code this thread sent a few requests ago   (coalesced or remembered)
--    5 replays of a code sent 1 to 2 code-cache lifetimes ago  (forgotten: upstream 40163)
--   10 codes from a set of 50 shared by every thread           (remembered, 40163 after a TTL)
--    4 codes WeChat calls invalid ("invalid…")                 (upstream 40029, remembered)
--    2 codes WeChat never issues (a "." in them)               (wxgate's own 40029)
--    2 exchanges with a wrong secret                           (upstream 40125)
--    3 third-party platform exchanges (component/jscode2session), fresh codes
--    1 exchange without its js_code                            (wxgate's own 41008)
--    5 token fetches of the app, X-Wxgate-Max-Wait-Ms: 100     (its quota bites: local 45011)
--    3 token fetches for appids never seen before              (upstream 40013; quota keys churn)
--    5 stable_token POSTs with a JSON body
--   30 other WeChat APIs, passed through (18 GET with a query, 12 POST with a JSON body)
-- During the first <rush_for_s> seconds of every <rush_every_s> (a login rush), 9 requests in
-- 10 are fresh code exchanges, so that the code-exchange quota bites in rushes only.
--
-- The faults come from upstream (the stand-in), not from here.
--
-- done() prints machine-readable lines, read by soak.sh:
--   RESULT <sent> <responses> <connect> <read> <write> <timeout> <non_2xx> <p50_us> <p99_us> <max_us>
--   ANSWER <status> <errcode or "ok"> <count>     one line per kind of answer
--   CACHE <x-wxgate-cache value or "-"> <count>
-- <sent> counts every request written (request() is called once per request wrk writes,
-- again after a reconnect), <responses> every complete response. wrk does not count a
-- connection closed under a request as an error (it reconnects and sends the next one), so
-- <sent> - <responses> is what shows a request left unanswered: at most one per connection
-- may be in flight when wrk stops at its deadline.

local prefix = "soak"
local rush_every = 60
local rush_for = 10
local ttl = 60

-- Per thread (each wrk thread has its own Lua state): what it sent and what came back.
sent = 0
answers = {}
caches = {}
-- A global, so that setup() can set it in each thread's own Lua state.
thread_id = 0

local threads = {}
function setup(thread)
   thread:set("thread_id", #threads)
   table.insert(threads, thread)
end

local appid = "wx00000000000000a1"
local secret = "stand-in-secret-a1"
local component_appid = "wx00000000000000c1"
local component_token = "stand-in-component-token-c1"
local exchange = "/sns/jscode2session?appid=" .. appid .. "&secret=" .. secret
   .. "&grant_type=authorization_code&js_code="
local wrong_secret = "/sns/jscode2session?appid=" .. appid .. "&secret=not-the-secret"
   .. "&grant_type=authorization_code&js_code="
local component = "/sns/component/jscode2session?appid=" .. appid
   .. "&grant_type=authorization_code&component_appid=" .. component_appid
   .. "&component_access_token=" .. component_token .. "&js_code="
local token = "/cgi-bin/token?grant_type=client_credential&appid=" .. appid .. "&secret=" .. secret
local json = { ["Content-Type"] = "application/json" }
local short_wait = { ["X-Wxgate-Max-Wait-Ms"] = "100" }

function init(args)
   prefix = args[1] or prefix
   rush_every = tonumber(args[2] or rush_every)
   rush_for = tonumber(args[3] or rush_for)
   ttl = tonumber(args[4] or ttl)
end

local counter = 0
-- The fresh codes this thread sent: a ring of the last 256 for quick replays, and one code
-- per second for replays after the code cache forgot them.
local recent = {}
local by_second = {}
local oldest_second = nil

local function fresh_code()
   local code = prefix .. thread_id .. "x" .. counter
   recent[counter % 256] = code
   local now = os.time()
   if by_second[now] == nil then
      by_second[now] = code
      oldest_second = oldest_second or now
   end
   -- Forget what is older than two lifetimes.
   while oldest_second ~= nil and oldest_second < now - 2 * ttl do
      by_second[oldest_second] = nil
      oldest_second = oldest_second + 1
   end
   return code
end

local function recent_code()
   -- Sent 1 to 40 requests ago: often still in flight on another connection.
   return recent[(counter - 1 - counter % 40) % 256] or fresh_code()
end

local function forgotten_code()
   -- Sent between one and two lifetimes ago, if any: no longer remembered.
   local now = os.time()
   for age = ttl + 1 + counter % ttl, 2 * ttl do
      local code = by_second[now - age]
      if code ~= nil then
         return code
      end
   end
   return fresh_code()
end

local function get(path, headers)
   return wrk.format("GET", path, headers)
end

function request()
   counter = counter + 1
   sent = sent + 1
   local slot = counter % 100
   if os.time() % rush_every < rush_for and counter % 10 ~= 0 then
      return get(exchange .. fresh_code())
   end
   if slot < 20 then
      return get(exchange .. fresh_code())
   elseif slot < 30 then
      return get(exchange .. recent_code())
   elseif slot < 35 then
      return get(exchange .. forgotten_code())
   elseif slot < 45 then
      return get(exchange .. "dup" .. (counter % 50))
   elseif slot < 49 then
      return get(exchange .. "invalid" .. prefix .. thread_id .. "x" .. counter)
   elseif slot < 51 then
      return get(exchange .. "not.a.code" .. counter)
   elseif slot < 53 then
      return get(wrong_secret .. prefix .. "w" .. thread_id .. "x" .. counter)
   elseif slot < 56 then
      return get(component .. prefix .. "c" .. thread_id .. "x" .. counter)
   elseif slot < 57 then
      return get("/sns/jscode2session?appid=" .. appid .. "&secret=" .. secret
         .. "&grant_type=authorization_code")
   elseif slot < 62 then
      return get(token, short_wait)
   elseif slot < 65 then
      -- 16 hex digits, never the same twice in a run: a new quota key each time.
      return get(string.format("/cgi-bin/token?grant_type=client_credential&appid=wx%04x%012x"
         .. "&secret=x", thread_id, counter))
   elseif slot < 70 then
      return wrk.format("POST", "/cgi-bin/stable_token", json,
         '{"grant_type":"client_credential","appid":"' .. appid .. '","secret":"' .. secret .. '"}')
   elseif slot < 88 then
      return get("/cgi-bin/user/info?access_token=soak-token&openid=o" .. counter .. "&lang=zh_CN")
   else
      return wrk.format("POST", "/wxa/msg_sec_check?access_token=soak-token", json,
         '{"content":"hello from the soak ' .. counter .. '"}')
   end
end

function response(status, headers, body)
   local errcode = string.match(body, '"errcode"%s*:%s*(%-?%d+)') or "ok"
   local kind = status .. " " .. errcode
   answers[kind] = (answers[kind] or 0) + 1
   local cache = headers["X-Wxgate-Cache"] or headers["x-wxgate-cache"] or "-"
   caches[cache] = (caches[cache] or 0) + 1
end

function done(summary, latency, requests)
   -- wrk calls request() once on the first thread before the run, to check the script
   -- (script_verify_request): that request is never sent.
   local total_sent = -1
   local total_answers = {}
   local total_caches = {}
   for _, thread in ipairs(threads) do
      total_sent = total_sent + thread:get("sent")
      for kind, n in pairs(thread:get("answers")) do
         total_answers[kind] = (total_answers[kind] or 0) + n
      end
      for kind, n in pairs(thread:get("caches")) do
         total_caches[kind] = (total_caches[kind] or 0) + n
      end
   end
   local e = summary.errors
   io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d %d\n",
      total_sent, summary.requests, e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(99), latency.max))
   for kind, n in pairs(total_answers) do
      io.write(string.format("ANSWER %s %d\n", kind, n))
   end
   for kind, n in pairs(total_caches) do
      io.write(string.format("CACHE %s %d\n", kind, n))
   end
end
