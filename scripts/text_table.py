#!/usr/bin/env python3
"""The text attack on measurement cases (scripts/make_text_fixtures.py large), one
markdown row per case: B, block 0 rank / distinct (token, position) pairs, the attention
output's rank, sequences recovered token for token (LM head: without the last token where the report
says it is missing),
certified, CPU seconds of `gradleak text attack`.

    python scripts/text_table.py /tmp/text/gpt2-cls-b8-s1 /tmp/text/gpt2-cls-b32-s*
    GRADLEAK_BIN=target/release/gradleak (default)
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = os.environ.get("GRADLEAK_BIN", str(Path(__file__).resolve().parents[1] / "target" / "release" / "gradleak"))


def run(case):
    case = Path(case)
    truth = json.loads((case / "truth.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "out.jsonl", Path(tmp) / "rep.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run([BIN, "text", "attack", "--model", str(case), "--gradient", str(case / "gradient.safetensors"),
                            "--out", str(out), "--report", str(rep)], capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if p.returncode != 0:
            return f"| {case.name} | error: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode} |"
        r = json.loads(rep.read_text())
        got = {tuple(json.loads(line)["ids"]) for line in out.read_text().splitlines() if line.strip()}
    lm = r["head"] == "language_model" and r.get("last_token_missing", True)
    seqs = [[t for t, m in zip(s, ms) if m] for s, ms in zip(truth["ids"], truth["mask"])]
    want = {tuple(s[:-1] if lm else s) for s in seqs}
    layers = {l["layer"]: l for l in r.get("layers", [])}
    l0 = layers.get("block 0 input projection", {})
    l1 = layers.get("block 0 attention output", {})
    return (f"| {case.name} | {truth['batch']} | {l0.get('rank', '-')} / {truth['distinct_token_positions']} | "
            f"{l1.get('rank', '-')} | {len(got & want)} / {len(want)} | {'yes' if r['certified'] else 'no'} | {cpu:.1f} |")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| case | B | block 0 rank / pairs | attention output rank | sequences token for token | certified | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for c in sys.argv[1:]:
        print(run(c), flush=True)


if __name__ == "__main__":
    main()
