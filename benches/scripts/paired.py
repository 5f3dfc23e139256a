#!/usr/bin/env python3
"""Compares two builds of the simulate bench side by side, one on each core.

A shared VM's speed drifts by a third within the hour, so back-to-back runs of
two builds mostly measure the drift. Run side by side, both builds see the same
host at the same moment; each pair is run in both orders, and the median of the
ratios is the figure to trust.

    cargo bench -p limitlab-benches --bench simulate --no-run   # note the binary's path
    cp target/release/deps/simulate-HASH /tmp/old           # before the change
    # ... make the change, build again, then:
    benches/scripts/paired.py /tmp/old target/release/deps/simulate-HASH --rounds 10 --duration 30m

Prints each pair's rates and, at the end, the median of new/old with its quartiles.
"""

import argparse
import re
import statistics
import subprocess
import sys


def rate(process: subprocess.Popen) -> int:
    out, _ = process.communicate()
    found = re.search(r"(\d+) simulated requests/s", out)
    if process.returncode != 0 or not found:
        sys.exit(f"a bench run failed (exit {process.returncode}):\n{out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the simulate bench binary before the change")
    parser.add_argument("new", help="the simulate bench binary after the change")
    parser.add_argument("--rounds", type=int, default=10, help="pairs in each order (default 10)")
    parser.add_argument("--duration", default="30m", help="simulated time per run (default 30m)")
    parser.add_argument("--scenario", help="a scenario file instead of benches/throughput.toml")
    args = parser.parse_args()
    ratios = []
    for _ in range(args.rounds):
        for first, second in ((args.old, args.new), (args.new, args.old)):
            extra = [args.scenario] if args.scenario else []
            a = subprocess.Popen([first, args.duration, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            b = subprocess.Popen([second, args.duration, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            rate_a, rate_b = rate(a), rate(b)
            old, new = (rate_a, rate_b) if first == args.old else (rate_b, rate_a)
            ratios.append(new / old)
            print(f"old {old:>9,}/s  new {new:>9,}/s  new/old {new / old:.3f}", flush=True)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    print(f"new/old: median {median:.3f}, quartiles {q1:.3f} to {q3:.3f}, {len(ratios)} pairs")


if __name__ == "__main__":
    main()
