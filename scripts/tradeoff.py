#!/usr/bin/env python3
"""The trade-off table of docs/EXPERIMENTS.md: for each defence CSV, the weakest
tested strength at which no method recovers any seed's sample (digits: relative error
<= 0.1; photos: min PSNR >= 20 dB; a failed run counts as not recovered), and the
gradient's relative change there. Usage: tradeoff.py NAME=CSV:STRENGTH_INDEX[:desc] ..."""
import csv, re, sys

def strength(spelling, index):
    return float(re.findall(r"[-+0-9.eE]+", spelling.split("+")[-1].split(":", 1)[1])[index])

def recovered(row, photos):
    if row["error"]:
        return False
    if photos:
        return row["min_psnr"] != "" and float(row["min_psnr"]) >= 20.0
    return float(row["max_rel_error"]) <= 0.1

print("| defence | data | stops every method at | gradient relative change there | last level some method still recovers |")
print("|---|---|---|---|---|")
for arg in sys.argv[1:]:
    name, rest = arg.split("=", 1)
    path, idx, *desc = rest.split(":")
    idx, desc = int(idx), bool(desc) and desc[0] == "desc"
    photos = "photos" in path
    rows = list(csv.DictReader(open(path)))
    levels = sorted({r["defense"] for r in rows}, key=lambda s: strength(s, idx), reverse=desc)
    stop, last = None, None
    for lv in levels:
        rs = [r for r in rows if r["defense"] == lv]
        if any(recovered(r, photos) for r in rs):
            last, stop = lv, None
        elif stop is None:
            stop = lv
    change = "-"
    if stop:
        ch = [float(r["gradient_relative_change"]) for r in rows if r["defense"] == stop and r["gradient_relative_change"]]
        change = f"{sorted(ch)[len(ch)//2]:.3g}" if ch else "(runs failed; see text)"
    print(f"| {name} | {'photos' if photos else 'digits'} | {stop or 'none tested'} | {change} | {last or '-'} |")
