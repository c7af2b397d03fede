-- wrk script for benchmarks/serve.py --client wrk: POST the prepared bodies in turn
-- (WRK_BODIES: one JSON body per line) and print one JSON line of results at the end.
local bodies = {}
for line in io.lines(os.getenv("WRK_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
local headers = { ["Content-Type"] = "application/json" }

request = function()
  i = i + 1
  return wrk.format("POST", "/v1/embeddings", headers, bodies[(i % #bodies) + 1])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "errors": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, e.status + e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
