#!/usr/bin/env bash
# Side by side, in one run on this machine: a fixed-response backend (nginx
# `return 200`) called directly, through nginx as a plain reverse proxy, and
# through `aigw proxy` with the seed policy. Open loop at 2,000 requests/s
# (latency), then closed loop (throughput). Installs nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx > /dev/null; }
cargo build --release -q -p aigw
cargo bench -q -p aigw-benches --bench load --no-run 2> /dev/null
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)
tmp=$(mktemp -d)
cat > "$tmp/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:18081; keepalive 128; }
  server {
    listen 127.0.0.1:18081;
    location / {
      default_type application/json;
      return 200 '{"id":"x","object":"chat.completion","created":0,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":20,"total_tokens":28}}';
    }
  }
  server {
    listen 127.0.0.1:18082;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$tmp/nginx.conf" &
nginx_pid=$!
# Request logs off, as nginx runs with access_log off.
AIGW_LOG=warn target/release/aigw proxy --config benches/proxy-bench.toml > "$tmp/aigw.out" 2> /dev/null &
aigw_pid=$!
trap 'kill $nginx_pid $aigw_pid 2> /dev/null; wait 2> /dev/null; rm -rf "$tmp"' EXIT
sleep 1
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
seconds=${SECONDS_PER_RUN:-10}
for rate in 2000 0; do
  "$load" "http://127.0.0.1:18081$path" $rate "$seconds" 64 "api-key:bench-key" | sed 's/^/direct: /'
  "$load" "http://127.0.0.1:18082$path" $rate "$seconds" 64 "api-key:bench-key" | sed 's/^/nginx:  /'
  "$load" "http://127.0.0.1:18080$path" $rate "$seconds" 64 "api-key:bench-key" | sed 's/^/aigw:   /'
done
