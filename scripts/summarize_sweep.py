#!/usr/bin/env python3
"""Markdown table of a sweep CSV: one row per (setting without seed), metrics as
median [min, max] over seeds. Usage: summarize_sweep.py CSV KEY... -- METRIC..."""
import csv, sys
from collections import OrderedDict

args = sys.argv[1:]
path, rest = args[0], args[1:]
sep = rest.index("--") if "--" in rest else len(rest)
keys, metrics = rest[:sep], rest[sep + 1:]
groups = OrderedDict()
for row in csv.DictReader(open(path)):
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)

def fmt(vals):
    v = sorted(float(x) for x in vals if x not in ("", None))
    if not v:
        return "-"
    med = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    g = lambda x: f"{x:.3g}"
    return g(med) if len(v) == 1 or v[0] == v[-1] else f"{g(med)} [{g(v[0])}, {g(v[-1])}]"

print("| " + " | ".join(keys + metrics + ["runs", "errors"]) + " |")
print("|" + "---|" * (len(keys) + len(metrics) + 2))
for k, rows in groups.items():
    errs = sum(1 for r in rows if r["error"])
    print("| " + " | ".join(list(k) + [fmt(r[m] for r in rows) for m in metrics] + [str(len(rows)), str(errs)]) + " |")
