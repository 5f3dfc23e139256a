#!/usr/bin/env python3
"""Checks that two builds give the same results for every shipped scenario.

    same-results.py OLD_DIR NEW_DIR [--renamed OLD=NEW ...]

Each DIR holds, per scenario NAME, `NAME/report.json` and `NAME.jsonl` (the
decision log), as written by `limitlab simulate SCENARIO --out DIR/NAME
--decisions DIR/NAME.jsonl`. Byte-identical files pass at once. Otherwise the
two are compared as data, where the only difference allowed is a reason's
spelling given by --renamed (one old name may become several new ones, e.g.
`timeout=transport-failure` when a reason was split): every other field of every
decision line, and every figure of the report with the new reasons counted under
their old names, must be equal.
"""

import argparse
import json
import pathlib
import sys


def old_name(renamed: dict, reason: str) -> str:
    for old, news in renamed.items():
        if reason in news:
            return old
    return reason


def fold(value, renamed: dict):
    """The report with every reason spelled the old way (counts of split reasons summed)."""
    if isinstance(value, dict):
        folded = {}
        for key, inner in value.items():
            key = old_name(renamed, key)
            inner = fold(inner, renamed)
            if key in folded and isinstance(inner, int):
                folded[key] += inner
            else:
                folded[key] = inner
        return folded
    if isinstance(value, list):
        return [fold(v, renamed) for v in value]
    return value


def same_decisions(old: pathlib.Path, new: pathlib.Path, renamed: dict) -> str:
    old_lines, new_lines = old.read_text().splitlines(), new.read_text().splitlines()
    if len(old_lines) != len(new_lines):
        return f"{len(old_lines)} lines before, {len(new_lines)} after"
    changed = 0
    for n, (a, b) in enumerate(zip(old_lines, new_lines), 1):
        a, b = json.loads(a), json.loads(b)
        if old_name(renamed, b["reason"]) != a["reason"]:
            return f"line {n}: reason {a['reason']} became {b['reason']}"
        changed += a["reason"] != b["reason"]
        a.pop("reason"), b.pop("reason")
        if a != b:
            return f"line {n}: {a} became {b}"
    return f"same but {changed} reasons respelled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--renamed", action="append", default=[], help="OLD=NEW: a reason's new spelling")
    args = parser.parse_args()
    renamed: dict = {}
    for pair in args.renamed:
        old, new = pair.split("=", 1)
        renamed.setdefault(old, set()).add(new)
    failed = False
    for report in sorted(pathlib.Path(args.old).glob("*/report.json")):
        name = report.parent.name
        new_report = pathlib.Path(args.new) / name / "report.json"
        old_log, new_log = report.parent.with_suffix(".jsonl"), new_report.parent.with_suffix(".jsonl")
        if report.read_bytes() == new_report.read_bytes() and old_log.read_bytes() == new_log.read_bytes():
            print(f"{name}: byte-identical")
            continue
        verdict = same_decisions(old_log, new_log, renamed)
        a, b = json.loads(report.read_text()), fold(json.loads(new_report.read_text()), renamed)
        if a != b:
            verdict = f"report.json differs beyond the renamed reasons ({verdict})"
        ok = verdict.startswith("same")
        failed |= not ok
        print(f"{name}: {verdict}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
