#!/usr/bin/env bash
# A profile-guided build of the simulator: `limitlab` and the simulate bench, each
# compiled once with instrumentation, run on the bench scenario and every shipped
# scenario, and compiled again with what those runs measured. Then the bench runs
# for DURATION (default 24h) of simulated time.
#
#     benches/scripts/pgo.sh [DURATION]
#
# Needs `llvm-profdata` from the LLVM that rustc is built on (`rustc -vV` names
# it): `apt install llvm-22` or `rustup component add llvm-tools`. Takes about half
# an hour from scratch on 2 cores (four release builds with fat LTO). Writes everything under
# `target/pgo/`; the build for use is `target/pgo/use/release/limitlab`.
#
# Why: the simulator's hot path is long and branchy, and on a 2-core VM like CI's
# it spends much of its time waiting for instructions. With a measured profile,
# the compiler lays the hot code out together and inlines along the paths
# actually taken.
#
# Each binary is trained on itself, since a profile is keyed by symbol names and
# those differ between the bench and `limitlab`. `limitlab` is trained on `simulate` only:
# code a profile never saw running (the proxy's) is compiled as cold, so build
# `limitlab` the usual way (`cargo build --release`) to run the proxy.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration="${1:-24h}"

llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=""
sysroot_tool="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
for tool in "llvm-profdata-$llvm" llvm-profdata "$sysroot_tool"; do
  if command -v "$tool" > /dev/null 2>&1 && "$tool" --version 2>&1 | grep -q "LLVM version $llvm\."; then
    profdata="$tool"
    break
  fi
done
if [ -z "$profdata" ]; then
  echo "pgo.sh: needs llvm-profdata from LLVM $llvm, rustc's own: apt install llvm-$llvm, or rustup component add llvm-tools" >&2
  exit 2
fi

root="$PWD/target/pgo"
rm -rf "$root/profiles" "$root/train"
mkdir -p "$root/profiles/bench" "$root/profiles/limitlab" "$root/train"
scenarios=(benches/throughput.toml scenarios/*.toml)

# Builds the simulate bench with RUSTFLAGS $1 and prints its binary's path.
bench_binary() {
  local path
  path=$(RUSTFLAGS="$1" cargo bench --locked -q -p limitlab-benches --bench simulate --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*simulate-[^"]*\)".*/\1/p' | tail -n 1)
  [ -x "$path" ] || { echo "pgo.sh: the simulate bench did not build" >&2; exit 1; }
  echo "$path"
}

echo "== 1/4: instrumented builds"
export CARGO_TARGET_DIR="$root/gen"
bench=$(bench_binary "-Cprofile-generate=$root/profiles/bench")
RUSTFLAGS="-Cprofile-generate=$root/profiles/limitlab" cargo build --locked -q --release -p limitlab

echo "== 2/4: training runs"
# Build scripts and proc macros wrote profiles too while compiling; only the
# training runs' profiles count.
rm -f "$root"/profiles/bench/*.profraw "$root"/profiles/limitlab/*.profraw
for scenario in "${scenarios[@]}"; do
  "$bench" 1h "$scenario" > /dev/null
  "$root/gen/release/limitlab" simulate "$scenario" --out "$root/train/$(basename "$scenario" .toml)" > /dev/null
done
"$profdata" merge -o "$root/profiles/bench.profdata" "$root"/profiles/bench/*.profraw
"$profdata" merge -o "$root/profiles/limitlab.profdata" "$root"/profiles/limitlab/*.profraw

echo "== 3/4: optimised builds"
export CARGO_TARGET_DIR="$root/use"
bench=$(bench_binary "-Cprofile-use=$root/profiles/bench.profdata")
RUSTFLAGS="-Cprofile-use=$root/profiles/limitlab.profdata" cargo build --locked -q --release -p limitlab
echo "limitlab: $root/use/release/limitlab"
echo "simulate bench: $bench"

echo "== 4/4: the simulate bench, $duration"
"$bench" "$duration"
