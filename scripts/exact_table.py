#!/usr/bin/env python3
"""Markdown table of `gradleak sweep` CSVs: share of samples recovered exactly
(relative error <= tol) and attack seconds, rows (data, activation, B), columns m."""
import csv, sys

rows = []
for path in sys.argv[1:]:
    with open(path) as f:
        rows += list(csv.DictReader(f))
widths = sorted({int(r["width"]) for r in rows})
keys = sorted({(r["data"], r["activation"], int(r["batch"])) for r in rows})
print("| data | act | B | " + " | ".join(f"m = {m}" for m in widths) + " |")
print("|---|---|---|" + "---|" * len(widths))
for data, act, b in keys:
    cells = []
    for m in widths:
        hit = [r for r in rows if (r["data"], r["activation"], int(r["batch"]), int(r["width"])) == (data, act, b, m)]
        if not hit:
            cells.append("not run")
            continue
        r = hit[-1]
        if r.get("error"):
            cells.append("error")
            continue
        frac = float(r["exact_fraction"] or 0)
        note = "" if int(r["batch_estimated"]) == b else f", rank {r['batch_estimated']}"
        cells.append(f"{round(frac * b)}/{b} ({float(r['seconds_attack']):.1f} s{note})")
    name = data.split("/")[-1] if "/" in data else data
    print(f"| {name} | {act} | {b} | " + " | ".join(cells) + " |")
