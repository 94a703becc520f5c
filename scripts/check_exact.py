"""Check a `gradleak attack` run against the private truth of a fixture case.

Usage: python scripts/check_exact.py CASE_DIR OUT.npy REPORT.json
Prints found/exact/certified, the closure residual and, per recovered sample, its
relative error to the nearest true input, whether it is marked exact, and why.
Exit status 1 when a sample marked exact is farther than 1e-4 from every true input.
"""

import json
import sys

import numpy as np
from safetensors.numpy import load_file

TOL = 1e-4

case, out, rep = sys.argv[1:4]
x = load_file(f"{case}/batch.safetensors")["x"].astype(np.float64)
r = np.load(out)
report = json.load(open(rep))
cert = (report.get("attack") or {}).get("certificate") or {}
samples = report["samples"]
bad = 0
errs = []
for i, s in enumerate(samples):
    e = np.min(np.linalg.norm(x - r[i], axis=1) / np.linalg.norm(x, axis=1))
    errs.append(e)
    wrong = s["exact"] and e > TOL
    bad += wrong
    print(f"  sample {i}: rel.error {e:.2e} exact {s['exact']} residual {s['residual']}"
          f"{' WRONG' if wrong else ''} {s.get('why') or ''}")
print(f"{case.rstrip('/').split('/')[-1]}: found {len(samples)}/{x.shape[0]} exact {report['exact']} "
      f"certified {report.get('certified')} closure {report.get('closure_residual')} "
      f"wrong-exact {bad} max-err {max(errs) if errs else float('nan'):.2e} seconds {report['seconds']:.1f}")
sys.exit(1 if bad else 0)
