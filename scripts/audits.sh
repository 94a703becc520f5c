#!/bin/sh
# The audit table of docs/EXPERIMENTS.md section 4: one `gradleak audit` per defence,
# digits B = 8, m = 1024, tanh, CE, torch-default init, seed 1, methods auto, tensor, dlg.
# Resumable: each audit's CSV keeps its probes. Usage: [GRID=5 BISECT=3] scripts/audits.sh [FAMILY...]
# (the prune, quantize and local-steps rows of the table: GRID=4 BISECT=2; local-steps
# also RANGE=1:8)
set -e
BIN=${BIN:-target/release/gradleak}
OUT=${OUT:-docs/data/audit}
mkdir -p "$OUT" docs/img
for fam in ${@:-noise-rel dp:1 prune quantize local-steps:0.1}; do
    name=$(echo "$fam" | tr ':' '-')
    $BIN audit --data digits --batch 8 --width 1024 --init torch-default --seed 1 \
        --audit-defense "$fam" ${RANGE:+--range $RANGE} --methods auto,tensor,dlg --grid-points ${GRID:-5} --bisections ${BISECT:-3} \
        --csv "$OUT/$name.csv" --report "$OUT/$name.json" --plot "docs/img/audit-$name.png" \
        > "$OUT/$name.txt"
done
