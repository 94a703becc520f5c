#!/usr/bin/env python3
"""Markdown rows of the audit table (docs/EXPERIMENTS.md section 4) from the JSON
reports `gradleak audit --report` wrote. Usage: audit_table.py DATA B M REPORT.json..."""
import json
import sys


def g(v):
    return "-" if v is None else f"{v:.3g}"


def main():
    data, b, m, *files = sys.argv[1:]
    for f in files:
        r = json.load(open(f))
        fam = r["audited"]
        by = {v["method"]: v for v in r["methods"]}

        def stop(name):
            v = by.get(name)
            if v is None:
                return "not run"
            if v["stops_at"] is None:
                return f"not stopped (leaks at {g(v['last_leak'])})"
            return f"{g(v['stops_at'])} ({g(v['last_leak'])})"

        best = r["stops_every_method"]
        hard = by.get(r["hardest_method"]) if r["hardest_method"] else None
        print(f"| {fam} ({r['parameter']}) | {data}, {b}, {m} | {stop('auto')} | {stop('tensor')} "
              f"| {stop('dlg')} | {g(best) if best is not None else 'none in range'} "
              f"| {g(hard['gradient_relative_change']) if hard else '-'} "
              f"| {g(hard['epsilon']) if hard else '-'} |")


if __name__ == "__main__":
    main()
