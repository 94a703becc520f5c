"""Inverting Gradients (Geiping et al. 2020, "Inverting Gradients - How easy is it to
break privacy in federated learning?") on a make_cnn_fixtures.py case: the baseline
the pixel stage is compared with (docs/EXPERIMENTS.md, "Pixels").

Cost: 1 - cos(grad(x'), grad_obs) over all parameters' gradients as one vector, plus
tv * TV(x') (anisotropic, mean absolute neighbour difference), minimised by Adam
(lr 0.1, x0.1 at 3/8, 5/8, 7/8 of the iterations) with signed gradients (the paper's
default) on x' boxed to [0, 1], labels given as the true ones (the paper's assumption),
x' started from a seeded N(0.5, 0.25^2)... clamp. One thread; CPU seconds from
time.process_time(). Prints one JSON line: PSNR (peak 1, matched one-to-one to the
truth by the Hungarian method), CPU seconds, the final cost.

Run: python scripts/ig_cnn.py CASE_DIR [--iters 2000] [--tv 1e-3] [--seed 0] [--out x.npy]
CASE_DIR holds model.json, model.safetensors, gradient.safetensors, batch.safetensors.
"""

import argparse
from collections import OrderedDict
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment

ACTS = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid, "GELU": nn.GELU, "Identity": nn.Identity}


def build(spec):
    """nn.Sequential from model.json (the layer kinds make_cnn_fixtures.py writes)."""
    mods = []
    for i, l in enumerate(spec["layers"]):
        t = l["type"]
        if t == "Conv2d":
            m = nn.Conv2d(l["in_channels"], l["out_channels"], tuple(l["kernel"]), stride=tuple(l["stride"]),
                          padding=tuple(l["padding"]), bias=l["bias"])
        elif t == "Linear":
            m = nn.Linear(l["in_features"], l["out_features"], bias=l["bias"])
        elif t == "MaxPool2d":
            m = nn.MaxPool2d(tuple(l["kernel"]), stride=tuple(l["stride"]), padding=tuple(l["padding"]))
        elif t == "AvgPool2d":
            m = nn.AvgPool2d(tuple(l["kernel"]), stride=tuple(l["stride"]), padding=tuple(l["padding"]))
        elif t == "LeakyReLU":
            m = nn.LeakyReLU(l["negative_slope"])
        elif t == "Flatten":
            m = nn.Flatten()
        elif t in ACTS:
            m = ACTS[t]()
        else:
            sys.exit(f"ig_cnn.py: layer type {t} not supported here")
        mods.append((l.get("name", str(i)), m))
    return nn.Sequential(OrderedDict(mods))


def tv(x):
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def psnr_matched(rec, truth):
    """Per-sample PSNR (peak 1) after matching rec to truth one-to-one (maximum total PSNR)."""
    b = truth.shape[0]
    p = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            mse = max(np.mean((rec[i] - truth[j]) ** 2), 1e-30)
            p[i, j] = 10 * np.log10(1.0 / mse)
    r, c = linear_sum_assignment(-p)
    return p[r, c]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--tv", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unsigned", action="store_true", help="plain Adam on the gradient, not its sign")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = json.load(open(os.path.join(a.case, "model.json")))
    net = build(spec)
    sd = load_file(os.path.join(a.case, "model.safetensors"))
    dtype = next(iter(sd.values())).dtype
    net = net.to(dtype)
    net.load_state_dict(sd)
    net.eval()
    obs = load_file(os.path.join(a.case, "gradient.safetensors"))
    names = [n for n, _ in net.named_parameters()]
    g_obs = [obs[n] for n in names]
    batch = load_file(os.path.join(a.case, "batch.safetensors"))
    shape = tuple(spec["input"])
    b = batch["x"].shape[0]
    truth = batch["x"].reshape(b, *shape).to(torch.float64).numpy()
    y = batch["y"]
    gen = torch.Generator().manual_seed(a.seed)
    x = (0.5 + 0.25 * torch.randn((b, *shape), generator=gen, dtype=dtype)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=a.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[a.iters * 3 // 8, a.iters * 5 // 8, a.iters * 7 // 8], gamma=0.1)
    params = list(net.parameters())
    norm_obs = torch.sqrt(sum((g * g).sum() for g in g_obs))
    t0 = time.process_time()
    cost = float("nan")
    for _ in range(a.iters):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((u * v).sum() for u, v in zip(g, g_obs))
        norm = torch.sqrt(sum((u * u).sum() for u in g))
        c = 1 - dot / (norm * norm_obs) + a.tv * tv(x)
        (gx,) = torch.autograd.grad(c, x)
        x.grad = gx if a.unsigned else gx.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        cost = c.item()
    cpu = time.process_time() - t0
    rec = x.detach().to(torch.float64).numpy()
    p = psnr_matched(rec, truth)
    if a.out:
        np.save(a.out, rec.reshape(b, -1))
    print(json.dumps({"case": os.path.basename(a.case.rstrip("/")), "batch": b, "iters": a.iters, "tv": a.tv,
                      "seed": a.seed, "signed": not a.unsigned, "psnr_mean": float(p.mean()),
                      "psnr_min": float(p.min()), "psnr_max": float(p.max()), "cost": cost, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
