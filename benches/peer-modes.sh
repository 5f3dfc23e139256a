#!/usr/bin/env bash
# The shared peer bench (`../shared/bench/peer-bench/run.sh`) run against the
# proxy with its counters local, lagged and exact (`[counters]` on a
# `redis-server` on loopback), the modes in turn, ROUNDS times, so that a shared
# VM's drift hits every mode alike.
#
#   benches/peer-modes.sh       (ROUNDS=3 MODES="local lagged exact" DURATION=15
#                                RATES=5000 to change; RATES=" " runs the closed
#                                loop only; the mode `control` is local again, to
#                                see how far two identical runs differ)
#
# The proxy's config is the bench's own `conf/aigw-proxy.toml` (the seed policy
# with limits raised so nothing is refused) with a `[counters]` table added for
# lagged and exact mode, each round on keys of its own. Prints every run's
# throughput, p50 and p99, gateway CPU and machine busy share, and the ratio of
# each mode's closed-loop throughput to local's in the same round.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench=${PEER_BENCH_SRC:-$root/../shared/bench/peer-bench}
work=${PEER_BENCH_DIR:-/tmp/peer-bench}
export PROXY_BIN=${PROXY_BIN:-$root/target/release/limitlab} PROJECT_ROOT=$root PEER_BENCH_DIR=$work
export DURATION=${DURATION:-15} RATES=${RATES:-5000}
command -v redis-server > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server > /dev/null; }
cargo build --release -q -p limitlab
# The bench copies itself to $work; its `run.sh` there is run directly so that
# the config written below is the one it uses.
mkdir -p "$work" && cp -r "$bench/conf" "$bench/cpu.py" "$bench/report.py" "$bench/run.sh" "$work/"
[ -x "$work/tools/bin/oha" ] || "$work/run.sh" setup
cd "$work"
base=$(mktemp)
cp conf/aigw-proxy.toml "$base"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --save '' --appendonly no --daemonize yes --logfile "$work/logs/redis.log"
finish() {
  redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || true
  ./run.sh stop aigw > /dev/null || true
  ./run.sh stop mock > /dev/null || true
  cp "$base" conf/aigw-proxy.toml
}
trap finish EXIT
sleep 0.5
: > results/summary.jsonl
./run.sh start mock > /dev/null
./run.sh bench direct > /dev/null
: > results/modes.txt
for round in $(seq 1 "${ROUNDS:-3}"); do
  for mode in ${MODES:-local lagged exact}; do
    cp "$base" conf/aigw-proxy.toml
    if [ "$mode" = lagged ] || [ "$mode" = exact ]; then
      printf '\n[counters]\nstore = "redis://127.0.0.1:%s/0"\nmode = "%s"\nkey_prefix = "modes-%s-%s-%s"\n' \
        "$port" "$mode" "$mode" "$round" "$$" >> conf/aigw-proxy.toml
    fi
    lines=$(wc -l < results/summary.jsonl)
    ./run.sh start aigw > /dev/null
    ./run.sh bench aigw > /dev/null
    ./run.sh stop aigw > /dev/null
    tail -n +"$((lines + 1))" results/summary.jsonl | sed "s/^/$round $mode /" >> results/modes.txt
    sleep 2
  done
done
python3 - "$work/results/summary.jsonl" "$work/results/modes.txt" <<'PY'
import json, statistics, sys
direct = [json.loads(l) for l in open(sys.argv[1]) if json.loads(l)["target"] == "direct"]
rows = []
for line in open(sys.argv[2]):
    round_, mode, text = line.split(" ", 2)
    rows.append((int(round_), mode, json.loads(text)))
print("| round | mode | run | req/s | p50 ms | p99 ms | gateway cores | machine busy |")
print("|---|---|---|---|---|---|---|---|")
for r in direct:
    print(f"| | direct | {r['run']} | {r['rps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | | {r['machine_busy']:.0%} |")
for round_, mode, r in rows:
    print(f"| {round_} | {mode} | {r['run']} | {r['rps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['gw_cores']} | {r['machine_busy']:.0%} |")
closed = {(rd, m): r["rps"] for rd, m, r in rows if r["run"] == "c32"}
for mode in sorted({m for _, m in closed} - {"local"}):
    ratios = [closed[(rd, mode)] / closed[(rd, "local")] for rd, m in closed if m == mode and (rd, "local") in closed]
    if ratios:
        shown = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"\n{mode} / local, closed loop, round by round: {shown}; median {statistics.median(ratios):.3f}")
PY
