"""Each example in examples/python runs and prints what it claims."""

import subprocess
import sys

from conftest import EXAMPLES


def run(name):
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_pytorch_attack():
    out = run("pytorch_attack.py")
    assert "recovered 8/8 within 1e-3, labels correct 100%" in out, out


def test_opacus_dpsgd():
    out = run("opacus_dpsgd.py")
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].replace(".", "").replace("e-", "").isdigit()]
    assert [r[0] for r in rows] == ["0", "0.001", "0.01", "0.1", "1"], out
    # no noise: every sample back exactly (clipping only rescales per-sample gradients)
    assert rows[0][1] == "inf" and rows[0][2] == "8/8", out
    # epsilon falls as the noise grows, and the recovered count never rises
    eps = [float(r[1]) for r in rows[1:]]
    assert eps == sorted(eps, reverse=True), out
    rec = [int(r[2].split("/")[0]) for r in rows]
    assert rec == sorted(rec, reverse=True), out


def test_flower_audit():
    out = run("flower_audit.py")
    lines = [line.split() for line in out.splitlines()]
    rounds = [l for l in lines if len(l) >= 8 and l[0] in ("1", "2") and l[2] in ("update", "gradient")]
    assert len(rounds) == 6, out  # 3 clients x 2 rounds
    for l in rounds:
        assert l[4] == "8/8", out
    assert any(l[2] == "gradient" for l in rounds) and any(l[2] == "update" for l in rounds)
    legacy = [l for l in out.splitlines() if l.startswith("legacy aggregate_fit")]
    assert legacy and all("recovered 8/8" in l for l in legacy), out
