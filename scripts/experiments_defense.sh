#!/usr/bin/env bash
# Every figure of docs/EXPERIMENTS.md. Resumable: rerunning skips rows already
# in a CSV. Usage: scripts/experiments_defense.sh [release binary]
set -u
G=${1:-./target/release/gradleak}
E=docs/exp
I=docs/img
mkdir -p $E $I
IMG=images:/work/shared/data/images

# 1. Headline: digits B = 8, m = 4096, tanh, noise-rel:1e-3, every method on main.
$G sweep --init torch-default --data digits --batch 8 --width 4096 --defense noise-rel:0.001 --tol 0.05 \
  --grid method=dlg,ig --grid seed=1 --csv $E/headline_noise_b8.csv

# 2. Defence curves: digits B = 1, m = 1024, attack told B = 1, seeds 1-2, tol 0.1.
curve() { # name, grid of defences, methods, title, extra plot flags
  $G sweep --init torch-default --data digits --batch 1 --width 1024 --tol 0.1 --grid attack-batch=1 \
    --grid "defense=$2" --grid "method=$3" --grid seed=1,2 --csv $E/curve_$1.csv \
    --plot $I/curve_$1.png --x defense --y median_rel_error --series method --log-y --title "$4" ${5:-}
}
curve noise_rel "noise-rel:0.00001,noise-rel:0.0001,noise-rel:0.001,noise-rel:0.01,noise-rel:0.1,noise-rel:0.3,noise-rel:1,noise-rel:3,noise-rel:10" \
  analytic,dlg,ig "digits B=1 m=1024: relative noise S" --log-x
curve prune "prune:0.5,prune:0.9,prune:0.95,prune:0.99,prune:0.999" analytic,dlg,ig "digits B=1 m=1024: pruned fraction P"
curve dp "clip:1+noise:0.000001,clip:1+noise:0.00001,clip:1+noise:0.0001,clip:1+noise:0.001,clip:1+noise:0.003,clip:1+noise:0.01,clip:1+noise:0.03,clip:1+noise:0.1" \
  analytic,dlg "digits B=1 m=1024: DP-SGD clip 1, noise multiplier SIGMA" --log-x
curve quantize "quantize:16,quantize:8,quantize:4,quantize:2" analytic,dlg "digits B=1 m=1024: quantisation bits"
curve local "local-steps:1:0.1,local-steps:2:0.1,local-steps:5:0.1,local-steps:10:0.1" analytic,dlg \
  "digits B=1 m=1024: local steps (lr 0.1)"

# 3. Method comparison without defence: digits m = 4096, B in {1, 4, 16}.
$G sweep --init torch-default --data digits --width 4096 --grid batch=1,4,16 --grid method=analytic,dlg,ig --grid seed=1,2 \
  --csv $E/compare_digits.csv --plot $I/compare_digits.png --x batch --y median_rel_error \
  --series method --log-y --title "digits m=4096, no defence"
# photos (32x32x3): m = 1024, B in {1, 4}
$G sweep --init torch-default --data $IMG --width 1024 --grid batch=1,4 --grid method=analytic,dlg,ig --grid seed=1 \
  --csv $E/compare_photos.csv --plot $I/compare_photos.png --x batch --y mean_psnr \
  --series method --title "photos 32x32x3 m=1024, no defence"

# 4. Photos under defences: B = 1, m = 1024, attack told B = 1, PSNR (recovered: >= 20 dB).
pcurve() { # name, grid of defences, title, extra plot flags
  $G sweep --init torch-default --data $IMG --batch 1 --width 1024 --grid attack-batch=1 --grid "defense=$2" \
    --grid method=analytic,dlg --grid seed=1,2 --csv $E/photos_$1.csv \
    --plot $I/photos_$1.png --x defense --y mean_psnr --series method --title "$3" ${4:-}
}
pcurve noise_rel "noise-rel:0.001,noise-rel:0.01,noise-rel:0.1,noise-rel:1" "photos B=1 m=1024: relative noise S" --log-x
pcurve prune "prune:0.5,prune:0.9,prune:0.99,prune:0.999" "photos B=1 m=1024: pruned fraction P"
