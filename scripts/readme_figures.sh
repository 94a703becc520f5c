#!/usr/bin/env bash
# Rerun every figure quoted in README.md ("Measured on ...") with the release build;
# run from the repository root with ../shared beside it: cargo build --release first.
set -u
G=target/release/gradleak
F=../shared/fixtures/pytorch
T=$(mktemp -d)
run() { echo "## $*"; /usr/bin/time -f "   wall %e s" "$@" 2>&1 | grep -v "^\s*$" | tail -${TAIL:-14}; }
run $G demo --out $T/demo
run $G attack --model $F/digits-tanh-ce/model.safetensors --gradient $F/digits-tanh-ce/gradient.safetensors --activation tanh --loss ce --out $T/r1.npy
run $G attack --model $F/diabetes-sigmoid-mse/model.safetensors --gradient $F/diabetes-sigmoid-mse/gradient.safetensors --activation sigmoid --loss mse --out $T/r2.npy
run $G simulate --data images:../shared/data/images:32 --batch 16 --width 8192 --activation tanh --tol 1e-6
run $G simulate --data gaussian:64 --batch 8 --width 100000 --activation tanh --method tensor --seed 1
run() { echo "## $*"; /usr/bin/time -f "   wall %e s, CPU %U + %S s" "$@" 2>&1 | grep -v "^\s*$" | tail -${TAIL:-14}; }
for m in auto dlg; do
    run $G simulate --init torch-default --data digits --batch 8 --width 4096 --dtype f64 --defense noise-rel:0.001 --tol 0.05 --method $m
done
run $G simulate --init torch-default --data digits --batch 8 --width 4096 --dtype f64 --defense local-steps:5:0.1 --tol 1e-6
run $G simulate --init torch-default --data digits --batch 8 --width 4096 --dtype f64 --defense prune:0.5 --tol 1e-6
run $G simulate --init torch-default --data images:../shared/data/images:32 --batch 8 --width 4096 --dtype f64 --seed 1 --activation tanh --loss ce --defense prune:0.9 --tol 1e-6
run $G simulate --init torch-default --data images:../shared/data/images:32 --batch 32 --width 8192 --dtype f64 --seed 1 --defense noise-rel:1e-3 --tol 0.05
rm -rf $T
