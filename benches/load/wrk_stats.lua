-- wrk hook: print one machine-readable line at the end (latencies in microseconds).
-- Parsed by parse.py:parse_wrk.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "TERNSTATS requests=%d duration_us=%d errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format(" p%s=%d", tostring(p):gsub("%.0$", ""), latency:percentile(p)))
  end
  io.write("\n")
end
