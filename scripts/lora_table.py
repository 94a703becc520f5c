#!/usr/bin/env python3
"""LoRA rows of docs/EXPERIMENTS.md section 5: a GPT-2 classifier (random init from a
config with a seed, dropout 0) with peft's LoRA (rank r, alpha 2r, on every c_attn, no
dropout), B fortunes truncated to L GPT-2 tokens, the adapters' float32 gradient, then
`gradleak.text.attack`. One markdown row per (r, B, L).

    python scripts/lora_table.py [--preset gpt2] [--layers 12] RxBxL ...   # e.g. 64x1x32 16x1x32
"""
import argparse
import resource

import torch  # noqa: E402
import peft  # noqa: E402

from gradleak import text as gt  # noqa: E402
from gradleak import _textgen as tg  # noqa: E402


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(x.ru_utime + x.ru_stime for x in r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = tg.gpt2_tokenizer()
    cfg = tg.make_config("gpt2", "cls", preset=a.preset, layers=a.layers)
    print("| r | B | tokens | distinct inputs | adapter rank | sequences exact | certified | note | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in a.cases:
        r, b, n = map(int, case.split("x"))
        torch.manual_seed(a.seed)
        base = tg.model_class("gpt2", "cls")(cfg).eval()
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
            task_type="SEQ_CLS"))
        ids, _ = tg.pick_batch(tok, tg.read_texts(), b, n, a.seed)
        labels = [i % 2 for i in range(b)]
        grads = gt.gradient_of(model, ids, labels)
        c0 = cpu()
        rec = gt.attack(model, grads, tokenizer=tok)
        secs = cpu() - c0
        distinct = len({(p, t) for s in ids for p, t in enumerate(s)})
        layer = (rec.report.get("layers") or [{}])[0]
        exact = sum(1 for s, e in zip(rec.ids, rec.exact) if e and s in ids)
        note = "full: nothing claimed" if any("full rank" in x for x in rec.report["notes"]) else (
            f"pairs + bag ({len(rec.report.get('token_bag', []))} tokens)" if rec.report.get("token_bag") else "")
        print(f"| {r} | {b} | {sum(map(len, ids))} | {distinct} | {layer.get('rank', '-')} | {exact}/{b} | "
              f"{'yes' if rec.certified else 'no'} | {note} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
