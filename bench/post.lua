-- wrk script: POST signed Metriport-shaped bodies from a pool file, each messageId once.
--
--   wrk -t2 -c32 -d10s -s bench/post.lua URL -- POOL THREADS [cycle|once] [KEY]
--
-- POOL is written by bench/payloads.py: one request per line, "<hex signature>\t<body>".
-- wrk gives every thread its own Lua state with the same random seed, so ids cannot come from
-- math.random: setup() numbers the threads and thread i takes the rows i, i+T, i+2T, ... of
-- the pool, so no two threads ever send the same row. Each thread walks its rows in order;
-- in "once" mode running past the end is counted as a wrap (ids then repeat: the report says
-- so), in "cycle" mode (floor, peer: they do not deduplicate) wrapping is expected.
-- Every request carries x-metriport-signature (HMAC-SHA256 of the body); with KEY it also
-- carries x-webhook-key (the peer checks that header; the router is configured to accept
-- signatures only, so it ignores it).
-- done() prints one line "BENCH_JSON {...}" with the summary for bench/run.py.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local file = args[1]
   local nthreads = tonumber(args[2])
   mode = args[3] or "once"
   local key = args[4]
   local path = wrk.path
   reqs = {}
   local i = 0
   for line in io.lines(file) do
      if i % nthreads == tid then
         local tab = line:find("\t", 1, true)
         local headers = {
            ["Content-Type"] = "application/json",
            ["User-Agent"] = "Metriport API",
            ["x-metriport-signature"] = line:sub(1, tab - 1),
         }
         if key and key ~= "" then
            headers["x-webhook-key"] = key
         end
         reqs[#reqs + 1] = wrk.format("POST", path, headers, line:sub(tab + 1))
      end
      i = i + 1
   end
   if #reqs == 0 then
      error("no requests for thread " .. tid .. " in " .. file)
   end
   sent = 0
   pos = 0
   wraps = 0
   rows = #reqs
end

function request()
   pos = pos + 1
   if pos > rows then
      pos = 1
      wraps = wraps + 1
   end
   sent = sent + 1
   return reqs[pos]
end

function done(summary, latency, requests)
   local sent_total, wraps_total, rows_total = 0, 0, 0
   for _, thread in ipairs(threads) do
      sent_total = sent_total + thread:get("sent")
      wraps_total = wraps_total + thread:get("wraps")
      rows_total = rows_total + thread:get("rows")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d},'
         .. '"sent":%d,"wraps":%d,"rows":%d,"threads":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), sent_total, wraps_total, rows_total, #threads))
end
