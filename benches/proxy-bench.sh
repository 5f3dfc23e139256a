#!/usr/bin/env bash
# Side by side, in one run on this machine: a fixed-response backend (nginx
# `return 200`) called directly, through nginx as a plain reverse proxy, and
# through `limitlab proxy` with the seed policy. Open loop at 2,000 requests/s
# (latency), then closed loop (throughput), ROUNDS times interleaved so that
# drifts of a shared VM hit all three alike; the summary gives medians, over
# all rounds and over the quiet ones (little CPU stolen by the hypervisor).
#
# The backend and each proxy are separate processes, and each proxy gets one
# worker: nginx `worker_processes 1`, limitlab `--threads 1` (THREADS to change it).
# Everything shares this machine's cores with the load generator.
#
# Each line also says what the run cost and what disturbed it: the CPU time per
# request of the process that served it (the backend nginx for `direct`, else
# the proxy) in user and system mode, its involuntary context switches (times
# it was preempted while it had work), and the share of the machine's CPU time
# the hypervisor stole during the run. On a shared VM a p99 measured while
# steal was high says more about the host than about the proxy.
# Installs nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx > /dev/null; }
cargo build --release -q -p limitlab
cargo bench -q -p limitlab-benches --bench load --no-run 2> /dev/null
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
  # first. limitlab keeps its connections, and so does this nginx.
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
LIMITLAB_LOG=warn target/release/limitlab proxy --config benches/proxy-bench.toml --threads "${THREADS:-1}" > "$tmp/limitlab.out" 2> /dev/null &
limitlab_pid=$!
trap 'kill $backend_pid $proxy_pid $limitlab_pid 2> /dev/null; wait 2> /dev/null; rm -rf "$tmp"' EXIT
sleep 1
# The process that serves each target: nginx's worker (a child of its master), or limitlab.
declare -A serving=([direct]=$(pgrep -P $backend_pid) [nginx]=$(pgrep -P $proxy_pid) [limitlab]=$limitlab_pid)
# CPU ticks of a process (user, system), its involuntary switches (all threads),
# and the machine's (busy, steal) ticks.
sample() {
  awk '{printf "%s %s ", $14, $15}' "/proc/$1/stat"
  cat /proc/"$1"/task/*/status | awk '/^nonvoluntary_ctxt_switches/ {s += $2} END {printf "%d ", s}'
  awk '/^cpu / {printf "%d %d\n", $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat
}
# "user U sys S us/req, invol I/req, steal X%" between two samples over N requests.
cost() { # BEFORE AFTER REQUESTS
  echo "$1 $2" | awk -v n="$3" -v hz="$(getconf CLK_TCK)" '{
    printf "cpu/req user %.0f us sys %.0f us, invol %.2f/req, steal %.1f%%",
      ($6-$1)*1e6/hz/n, ($7-$2)*1e6/hz/n, ($8-$3)/n, 100*($10-$5)/(($9-$4)>0 ? ($9-$4) : 1) }'
}
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
seconds=${SECONDS_PER_RUN:-10}
rounds=${ROUNDS:-3}
declare -A ports=([direct]=18081 [nginx]=18082 [limitlab]=18080)
for round in $(seq "$rounds"); do
  for rate in 2000 0; do
    for target in direct nginx limitlab; do
      if [ $target = limitlab ] && [ $rate = 2000 ]; then before=$(curl -s http://127.0.0.1:19090/metrics); fi
      s0=$(sample "${serving[$target]}")
      line=$("$load" "http://127.0.0.1:${ports[$target]}$path" $rate "$seconds" 64 "api-key:bench-key")
      s1=$(sample "${serving[$target]}")
      ok=$(echo "$line" | sed -n 's/.*: \([0-9]*\) ok.*/\1/p')
      if [ $target = limitlab ] && [ $rate = 2000 ]; then
        # limitlab's own view: time it added (total minus backend), from its histogram.
        added() { echo "$1" | awk -F'[{} ]' '/^limitlab_gateway_added_seconds_bucket/ && $2=="le=\"0.0005\"" {a=$4} /^limitlab_gateway_added_seconds_bucket/ && $2=="le=\"0.001\"" {b=$4} /^limitlab_gateway_added_seconds_count/ {c=$2} END {print a+0, b+0, c+0}'; }
        read -r a0 b0 c0 <<< "$(added "$before")"
        read -r a1 b1 c1 <<< "$(added "$(curl -s http://127.0.0.1:19090/metrics)")"
        awk -v a=$((a1-a0)) -v b=$((b1-b0)) -v c=$((c1-c0)) 'BEGIN {printf "round '"$round"' limitlab: own histogram: %.2f%% of requests added at most 0.5 ms, %.2f%% at most 1 ms\n", 100*a/c, 100*b/c}'
      fi
      spent=$(cost "$s0" "$s1" "${ok:-1}")
      echo "round $round $target: ${line#* }; $spent"
      echo "$round $rate $target $line steal_pct $(echo "$spent" | sed 's/.*steal \([0-9.]*\)%.*/\1/')" >> "$tmp/results"
    done
  done
done
# Medians over the rounds: throughput from the closed loop, latency at 2,000/s.
median() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
field() { # RATE TARGET FIELD
  awk -v r="$1" -v t="$2" -v f="$3" '$2==r && $3==t {for (i=1;i<=NF;i++) if ($i==f) print $(i+1); else if ($i ~ /req\/s,$/ && f=="rps") print $(i-1)}' "$tmp/results" | tr -d ',' | median
}
echo "medians of $rounds rounds ($seconds s each):"
for target in direct nginx limitlab; do
  printf '  %-6s  closed loop %6.0f req/s   at 2000/s: latency_ms_p50 %.3f  latency_ms_p99 %.3f\n' "$target" \
    "$(field 0 $target rps)" "$(field 2000 $target latency_ms_p50)" "$(field 2000 $target latency_ms_p99)"
done
awk -v a="$(field 0 limitlab rps)" -v n="$(field 0 nginx rps)" 'BEGIN {printf "  limitlab throughput / nginx throughput: %.0f%% (goal: at least 80%%)\n", 100*a/n}'
# Added latency: each round's proxy figure minus the same round's direct one
# (they ran seconds apart), then the median over rounds.
added_in() { # ROUND TARGET PERCENTILE
  awk -v r="$1" -v t="$2" -v f="latency_ms_p$3" '$1==r && $2==2000 && ($3==t || $3=="direct") {
    for (i=1;i<=NF;i++) if ($i==f) v[$3]=$(i+1) } END {print v[t]-v["direct"]}' "$tmp/results"
}
added() { # TARGET PERCENTILE [ROUNDS...]
  local target=$1 p=$2
  shift 2
  if [ $# -eq 0 ]; then set -- $(seq "$rounds"); fi
  for round in "$@"; do added_in "$round" "$target" "$p"; done | median
}
for p in 50 99; do
  printf '  added latency at p%s over direct (median of per-round differences): limitlab %.3f ms, nginx %.3f ms\n' \
    $p "$(added limitlab $p)" "$(added nginx $p)"
done
# The same figures from the quiet rounds only: those where the hypervisor stole
# less than QUIET_STEAL percent of the machine in each of the round's three runs
# at that rate. Steal stalls every process at random, and one stall of a few
# milliseconds moves a p99 by as much; a quiet round shows the proxy's own share.
quiet_steal=${QUIET_STEAL:-1}
quiet() { # RATE: the rounds whose runs at RATE all had steal under the bound
  awk -v r="$1" -v q="$quiet_steal" '$2==r {n[$1]++; if ($NF+0 >= q) bad[$1]=1}
    END {for (k in n) if (!bad[k]) print k}' "$tmp/results" | sort -n | tr '\n' ' '
}
per_round() { # TARGET PERCENTILE ROUNDS...: each round's added latency
  local target=$1 p=$2
  shift 2
  for round in "$@"; do printf '%.3f ' "$(added_in "$round" "$target" "$p")"; done
}
read -r -a calm <<< "$(quiet 2000)"
echo "quiet rounds at 2000/s (steal under ${quiet_steal}% in all three runs): ${calm[*]:-none} of $rounds"
if [ ${#calm[@]} -gt 0 ]; then
  for p in 50 99; do
    printf '  added latency at p%s over direct in quiet rounds: limitlab %.3f ms (per round: %s), nginx %.3f ms (per round: %s)\n' \
      $p "$(added limitlab $p "${calm[@]}")" "$(per_round limitlab $p "${calm[@]}")" \
      "$(added nginx $p "${calm[@]}")" "$(per_round nginx $p "${calm[@]}")"
  done
fi
read -r -a calm <<< "$(quiet 0)"
echo "quiet rounds in the closed loop: ${calm[*]:-none} of $rounds"
for round in "${calm[@]}"; do
  awk -v r="$round" '$1==r && $2==0 {for (i=1;i<=NF;i++) if ($i ~ /req\/s,$/) v[$3]=$(i-1)}
    END {printf "  round %s: limitlab %.0f req/s, nginx %.0f req/s: %.0f%%\n", r, v["limitlab"], v["nginx"], 100*v["limitlab"]/v["nginx"]}' "$tmp/results"
done
