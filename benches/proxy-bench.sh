#!/usr/bin/env bash
# Side by side, in one run on this machine: a fixed-response backend (nginx
# `return 200`) called directly, through nginx as a plain reverse proxy, and
# through `aigw proxy` with the seed policy. Open loop at 2,000 requests/s
# (latency), then closed loop (throughput), ROUNDS times interleaved so that
# drifts of a shared VM hit all three alike; the summary gives medians.
#
# The backend and each proxy are separate processes, and each proxy gets one
# worker: nginx `worker_processes 1`, aigw `--threads 1` (THREADS to change it).
# Everything shares this machine's cores with the load generator.
# Installs nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx > /dev/null; }
cargo build --release -q -p aigw
cargo bench -q -p aigw-benches --bench load --no-run 2> /dev/null
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)
tmp=$(mktemp -d)
nginx_conf() { # NAME SERVER-BLOCK
  cat > "$tmp/$1.conf" <<CONF
worker_processes 1;
daemon off;
pid $tmp/$1.pid;
error_log $tmp/$1.log;
events { worker_connections 4096; }
http {
  access_log off;
  # nginx closes a keep-alive connection after 1,000 requests by default; the
  # reconnections (and their TIME_WAIT sockets) would slow every run after the
  # first. aigw keeps its connections, and so does this nginx.
  keepalive_requests 1000000000;
  upstream backend { server 127.0.0.1:18081; keepalive 128; keepalive_requests 1000000000; }
  $2
}
CONF
}
nginx_conf backend 'server {
    listen 127.0.0.1:18081;
    location / {
      default_type application/json;
      return 200 '"'"'{"id":"x","object":"chat.completion","created":0,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":20,"total_tokens":28}}'"'"';
    }
  }'
nginx_conf proxy 'server {
    listen 127.0.0.1:18082;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }'
nginx -c "$tmp/backend.conf" &
backend_pid=$!
nginx -c "$tmp/proxy.conf" &
proxy_pid=$!
# Request logs off, as nginx runs with access_log off.
AIGW_LOG=warn target/release/aigw proxy --config benches/proxy-bench.toml --threads "${THREADS:-1}" > "$tmp/aigw.out" 2> /dev/null &
aigw_pid=$!
trap 'kill $backend_pid $proxy_pid $aigw_pid 2> /dev/null; wait 2> /dev/null; rm -rf "$tmp"' EXIT
sleep 1
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
seconds=${SECONDS_PER_RUN:-10}
rounds=${ROUNDS:-3}
declare -A ports=([direct]=18081 [nginx]=18082 [aigw]=18080)
for round in $(seq "$rounds"); do
  for rate in 2000 0; do
    for target in direct nginx aigw; do
      if [ $target = aigw ] && [ $rate = 2000 ]; then before=$(curl -s http://127.0.0.1:19090/metrics); fi
      line=$("$load" "http://127.0.0.1:${ports[$target]}$path" $rate "$seconds" 64 "api-key:bench-key")
      if [ $target = aigw ] && [ $rate = 2000 ]; then
        # aigw's own view: time it added (total minus backend), from its histogram.
        added() { echo "$1" | awk -F'[{} ]' '/^aigw_gateway_added_seconds_bucket/ && $2=="le=\"0.0005\"" {a=$4} /^aigw_gateway_added_seconds_bucket/ && $2=="le=\"0.001\"" {b=$4} /^aigw_gateway_added_seconds_count/ {c=$2} END {print a+0, b+0, c+0}'; }
        read -r a0 b0 c0 <<< "$(added "$before")"
        read -r a1 b1 c1 <<< "$(added "$(curl -s http://127.0.0.1:19090/metrics)")"
        awk -v a=$((a1-a0)) -v b=$((b1-b0)) -v c=$((c1-c0)) 'BEGIN {printf "round '"$round"' aigw: own histogram: %.2f%% of requests added at most 0.5 ms, %.2f%% at most 1 ms\n", 100*a/c, 100*b/c}'
      fi
      echo "round $round $target: ${line#* }"
      echo "$rate $target $line" >> "$tmp/results"
    done
  done
done
# Medians over the rounds: throughput from the closed loop, latency at 2,000/s.
median() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
field() { # RATE TARGET FIELD
  awk -v r="$1" -v t="$2" -v f="$3" '$1==r && $2==t {for (i=1;i<=NF;i++) if ($i==f) print $(i+1); else if ($i ~ /req\/s,$/ && f=="rps") print $(i-1)}' "$tmp/results" | tr -d ',' | median
}
echo "medians of $rounds rounds ($seconds s each):"
for target in direct nginx aigw; do
  printf '  %-6s  closed loop %6.0f req/s   at 2000/s: latency_ms_p50 %.3f  latency_ms_p99 %.3f\n' "$target" \
    "$(field 0 $target rps)" "$(field 2000 $target latency_ms_p50)" "$(field 2000 $target latency_ms_p99)"
done
awk -v a="$(field 0 aigw rps)" -v n="$(field 0 nginx rps)" 'BEGIN {printf "  aigw throughput / nginx throughput: %.0f%% (goal: at least 80%%)\n", 100*a/n}'
for p in 50 99; do
  awk -v a="$(field 2000 aigw latency_ms_p$p)" -v n="$(field 2000 nginx latency_ms_p$p)" -v d="$(field 2000 direct latency_ms_p$p)" -v p=$p \
    'BEGIN {printf "  added latency at p%s over direct: aigw %.3f ms, nginx %.3f ms\n", p, a-d, n-d}'
done
