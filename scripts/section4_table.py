#!/usr/bin/env python3
"""The compact table of docs/EXPERIMENTS.md section 4 ("Every method at B = 8 and
B = 32") from the sweep CSVs scripts/section4.sh writes: one row per defence and batch
size, one column per method, each cell "leaked share / median relative error / attack
seconds". Usage: section4_table.py CSV..."""
import csv
import sys

METHODS = ["auto", "tensor", "dlg", "ig"]


def cell(r):
    if r is None:
        return "not run"
    if r["error"]:
        return "error: " + r["error"].split(":")[0]
    leak = float(r["leaked_fraction"]) * 100
    med = float(r["median_rel_error"])
    return f"{leak:.0f} % / {med:.2g} / {float(r['seconds_attack']):.0f} s"


def main():
    print("| defence | B | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for f in sys.argv[1:]:
        rows = list(csv.DictReader(open(f)))
        defences = list(dict.fromkeys(r["defense"] for r in rows))
        for d in defences:
            by = {r["method"]: r for r in rows if r["defense"] == d}
            b = next(iter(by.values()))["batch"]
            print(f"| {d} | {b} | " + " | ".join(cell(by.get(m)) for m in METHODS) + " |")


if __name__ == "__main__":
    main()
