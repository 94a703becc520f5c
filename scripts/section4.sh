#!/bin/sh
# docs/EXPERIMENTS.md section 4, "Every method at B = 8 and B = 32": digits, m = 1024, tanh, CE,
# f64, torch-default init, seed 1, methods auto, tensor, dlg, ig, one CSV per batch size
# (resumable: rows already in a CSV are skipped). Usage: scripts/section4.sh [8 32]
set -e
BIN=${BIN:-target/release/gradleak}
OUT=${OUT:-docs/data/section4}
mkdir -p "$OUT" docs/img
DEFENSES="none,noise-rel:0.001,noise-rel:0.01,clip:1+noise:0.01,prune:0.5,prune:0.9,quantize:8,quantize:4,local-steps:5:0.1"
for b in ${@:-8 32}; do
    $BIN sweep --data digits --batch "$b" --width 1024 --init torch-default --tol 0.05 \
        --grid "defense=$DEFENSES" --grid method=auto,tensor,dlg,ig --grid seed=1 \
        --csv "$OUT/b$b.csv" --plot "docs/img/section4-b$b.png" --x defense --y leaked_fraction \
        --series method --title "digits B=$b m=1024: share leaked (rel. error <= 0.1)"
done
