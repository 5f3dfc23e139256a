#!/usr/bin/env bash
# The peer bench's streaming lane: chunked SSE responses (64 events, each its own
# HTTP chunk) called directly, through nginx as a reverse proxy, and through
# `limitlab proxy` with the seed policy, side by side in one run on this machine.
#
#   benches/peer-stream.sh            (ROUNDS=3 SECONDS_PER_RUN=10 RATE=200 to change)
#
# Backend: `limitlab mock --config benches/stream-mock.toml`, which answers at once.
# nginx: 2 workers, keep-alive to the backend, `proxy_buffering off` (what an SSE
# proxy is configured with: each event is passed on when it comes). limitlab: one
# worker thread per core (2 here), `benches/proxy-bench.toml` (rate limit, quota
# and token limit by IP, retry with failover; limits raised so nothing is refused),
# which counts each stream's tokens from its usage chunk.
#
# Runs, ROUNDS times interleaved so that a shared VM's drift hits all targets alike:
#   closed loop, 32 connections   -> streams/s (and events/s)
#   open loop, RATE streams/s     -> time to first byte (the first event) and to the
#                                    stream's end, p50 and p99
# Each run also reports the CPU the serving process spent per stream, the machine's
# busy share (all cores, load generator included) and the share the hypervisor stole.
# Every stream is checked (status, 64 events, `data: [DONE]` last); a wrong one is
# an error, never a fast figure.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx > /dev/null; }
cargo build --release -q -p limitlab
cargo bench -q -p limitlab-benches --bench sse_load --no-run 2> /dev/null
load=$(ls -t target/release/deps/sse_load-* | grep -v '\.d$' | head -1)
tmp=$(mktemp -d)
cat > "$tmp/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000000;
  upstream backend { server 127.0.0.1:18091; keepalive 128; keepalive_requests 1000000000; }
  server {
    listen 127.0.0.1:18092 reuseport backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
CONF
target/release/limitlab mock --config benches/stream-mock.toml --listen 127.0.0.1:18091 > "$tmp/mock.out" 2>&1 &
mock_pid=$!
nginx -c "$tmp/nginx.conf" &
nginx_pid=$!
LIMITLAB_LOG=warn target/release/limitlab proxy --config benches/proxy-bench.toml --listen 127.0.0.1:18093 \
  --admin 127.0.0.1:19094 --backend primary=http://127.0.0.1:18091 --backend secondary=http://127.0.0.1:18091 \
  > "$tmp/limitlab.out" 2> /dev/null &
limitlab_pid=$!
trap 'kill $mock_pid $nginx_pid $limitlab_pid 2> /dev/null; wait 2> /dev/null; rm -rf "$tmp"' EXIT
for port in 18091 18092 18093; do
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
# CPU ticks (user + system) of the processes serving a target; the machine's
# (total, idle + iowait, steal) ticks.
declare -A serving=([direct]=$mock_pid [nginx]="$(pgrep -P $nginx_pid | tr '\n' ' ')" [limitlab]=$limitlab_pid)
sample() {
  local ticks=0 p
  for p in $1; do ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo -n "$ticks "
  awk '/^cpu / {printf "%d %d %d\n", $2+$3+$4+$5+$6+$7+$8+$9, $5+$6, $9}' /proc/stat
}
path="/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
declare -A ports=([direct]=18091 [nginx]=18092 [limitlab]=18093)
seconds=${SECONDS_PER_RUN:-10}
rounds=${ROUNDS:-3}
rate=${RATE:-200}
# Warm-up, not recorded: connection pools and caches.
for target in direct nginx limitlab; do
  "$load" "http://127.0.0.1:${ports[$target]}$path" 0 2 32 64 "api-key:bench-key" > /dev/null
done
for round in $(seq "$rounds"); do
  for run in "0 32" "$rate 64"; do
    read -r r c <<< "$run"
    for target in direct nginx limitlab; do
      s0=$(sample "${serving[$target]}")
      line=$("$load" "http://127.0.0.1:${ports[$target]}$path" "$r" "$seconds" "$c" 64 "api-key:bench-key")
      s1=$(sample "${serving[$target]}")
      echo "$round $target $r $s0 $s1 $line" >> "$tmp/results"
      echo "round $round $target rate $r: $line"
    done
  done
done
python3 - "$tmp/results" "$(getconf CLK_TCK)" "$rate" << 'PY'
import json, statistics, sys
hz, rate = int(sys.argv[2]), sys.argv[3]
runs = []
for row in open(sys.argv[1]):
    f = row.split(maxsplit=11)
    d = json.loads(f[11])
    c0, t0, i0, s0, c1, t1, i1, s1 = map(int, f[3:11])
    total = max(t1 - t0, 1)
    d.update(round=int(f[0]), target=f[1], closed=f[2] == "0",
             cpu_us_per_stream=(c1 - c0) * 1e6 / hz / max(d["streams_ok"], 1),
             machine_busy=1 - (i1 - i0) / total, steal=(s1 - s0) / total)
    runs.append(d)
def med(target, closed, key):
    return statistics.median(r[key] for r in runs if r["target"] == target and r["closed"] == closed)
def added(target, key):  # each round's figure minus the same round's direct one, then the median
    per = [r[key] - d[key] for r in runs for d in runs
           if r["target"] == target and d["target"] == "direct" and not r["closed"] and not d["closed"] and r["round"] == d["round"]]
    return statistics.median(per)
errors = sum(r["errors"] for r in runs)
print(f"\nmedians of {max(r['round'] for r in runs)} rounds; errors in all runs: {errors}")
print("| target | closed loop c32 streams/s | events/s | / nginx | CPU per stream (us) | machine busy | "
      f"TTFB p50 / p99 ms at {rate}/s | added TTFB p50 / p99 ms | end p50 / p99 ms | steal |")
print("|---|---|---|---|---|---|---|---|---|---|")
nginx_rate = med("nginx", True, "streams_per_s")
for t in ["direct", "nginx", "limitlab"]:
    rel = "-" if t == "direct" else f"{med(t, True, 'streams_per_s') / nginx_rate:.2f}x"
    add = "-" if t == "direct" else f"+{added(t, 'ttfb_ms_p50'):.3f} / +{added(t, 'ttfb_ms_p99'):.3f}"
    print(f"| {t} | {med(t, True, 'streams_per_s'):.0f} | {med(t, True, 'events_per_s'):.0f} | {rel} "
          f"| {med(t, True, 'cpu_us_per_stream'):.0f} | {100 * med(t, True, 'machine_busy'):.0f}% "
          f"| {med(t, False, 'ttfb_ms_p50'):.3f} / {med(t, False, 'ttfb_ms_p99'):.3f} | {add} "
          f"| {med(t, False, 'total_ms_p50'):.3f} / {med(t, False, 'total_ms_p99'):.3f} "
          f"| {100 * med(t, True, 'steal'):.1f}% |")
if errors:
    sys.exit("some streams were wrong: see first_error in the lines above")
PY
