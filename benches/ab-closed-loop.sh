#!/usr/bin/env bash
# Two proxy builds, A and B, in the peer bench's closed loop (its config, its
# nginx mock, oha with 32 connections), in alternating order ROUNDS times, so
# that a shared VM's drift hits both alike.
#
#   benches/ab-closed-loop.sh BUILD_A BUILD_B     (ROUNDS=6 SECONDS_PER_RUN=8
#                                                  LIMITLAB_LOG=warn to change)
#
# Each run prints requests/s, the proxy's CPU per request and context switches
# per request (`perf stat` on the proxy's process), and the busier worker
# thread's share of the proxy's CPU (from /proc). That last figure says how the
# kernel's accept race spread the connections: at 1.00 one worker holds them
# all, which costs less per request than a split (docs/performance.md,
# 2026-12-07 evening); compare runs of the same kind. BUILD is the path of a
# `limitlab` binary; extra proxy flags go in PROXY_FLAGS.
set -euo pipefail
[ $# -eq 2 ] || { sed -n 2,15p "$0"; exit 2; }
cd "$(dirname "$0")/.."
root=$PWD
bench=${PEER_BENCH_SRC:-$root/../shared/bench/peer-bench}
work=${PEER_BENCH_DIR:-/tmp/peer-bench}
export PROXY_BIN=$1 PROJECT_ROOT=$root PEER_BENCH_DIR=$work
rounds=${ROUNDS:-6} seconds=${SECONDS_PER_RUN:-8}
command -v perf > /dev/null || { echo "perf is needed (Debian: linux-perf)" >&2; exit 1; }
mkdir -p "$work" && cp -r "$bench/conf" "$bench/cpu.py" "$bench/report.py" "$bench/run.sh" "$work/"
[ -x "$work/tools/bin/oha" ] || "$work/run.sh" setup
cd "$work"
url="http://127.0.0.1:8083/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
oha=(tools/bin/oha -m POST -H "content-type: application/json" -H "api-key: dummy" -D conf/request.json --no-tui)
scratch=$(mktemp -d)
trap './run.sh stop mock > /dev/null || true; rm -rf "$scratch"' EXIT
./run.sh start mock > /dev/null

# The worker threads' CPU ticks so far, in thread order.
ticks() {
  for t in /proc/"$1"/task/*; do
    if grep -q worker "$t/comm"; then awk '{print $14 + $15}' "$t/stat"; fi
  done | paste -sd' '
}

# One run of build $1, labelled $2.
run() {
  # shellcheck disable=SC2086
  LIMITLAB_LOG=${LIMITLAB_LOG:-warn} "$1" proxy --config conf/aigw-proxy.toml ${PROXY_FLAGS:-} > /dev/null 2> "$scratch/log" &
  local pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:19093/healthz && break; sleep 0.1; done
  "${oha[@]}" -z 2s -c 32 "$url" > /dev/null
  local before; before=$(ticks "$pid")
  perf stat -e task-clock,context-switches -p "$pid" -o "$scratch/stat" -- sleep "$seconds" &
  local perf_pid=$!
  "${oha[@]}" --output-format json -z "${seconds}s" -c 32 "$url" > "$scratch/oha.json"
  wait "$perf_pid"
  local after; after=$(ticks "$pid")
  kill "$pid"; wait "$pid" 2> /dev/null || true
  python3 - "$2" "$seconds" "$before" "$after" "$scratch" <<'PY'
import json, re, sys
label, seconds, before, after, scratch = sys.argv[1:]
oha = json.load(open(f"{scratch}/oha.json"))
n = sum(oha["statusCodeDistribution"].values())
stat = open(f"{scratch}/stat").read()
def figure(name):
    return float(re.search(r"([\d,.]+)\s+(?:msec\s+)?" + name, stat).group(1).replace(",", ""))
ticks = [b - a for a, b in zip(map(int, before.split()), map(int, after.split()))]
share = max(ticks) / max(1, sum(ticks))
print(f"{label}  req/s {n / float(seconds):8.0f}  cpu_us/req {figure('task-clock') * 1000 / n:6.2f}  "
      f"ctxsw/req {figure('context-switches') / n:.3f}  busier worker {share:.2f}", flush=True)
PY
}

for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 1 ]; then run "$1" A; run "$2" B; else run "$2" B; run "$1" A; fi
done
