"""Diagnosis of pool 2's kept positions on LeNet (issue 21; docs/DESIGN.md "Max pooling's
kept positions below the head", docs/EXPERIMENTS.md "Pixels"). Given the true h and
dL/dh (what the head's exact route returns), conv2's equations in a_1 (the pool-1
output) are linear once pool 2's kept positions s are fixed:

    dL/dW2 = D(s) U(a_1)^T   (D: 16 x 100, delta_{o,w} at s_{o,w}; U = unfold(a_1, 5)),
    (W2 U(a_1))[o, s_{o,w}] + b_o = h_{o,w}   where h_{o,w} > 0.

Modes (all f64, one thread, seeded):
  --rank            the system at the true s: rank, entries fixed, error on them
  --basin F ...     the true s with a share F of the active windows moved to another
                    position (seeded), then the alternation s <- rule(z2(a_1)), a_1 <- LS(s),
                    rule = argmax (the pooling's own) or closest (|z2 - h| least)
  --relaxed N       s relaxed to the simplex per window, joint projected Levenberg-
                    Marquardt on (a_1, lambda) from the prior pushed forward, N steps, then
                    the argmax alternation from its a_1
Run: python scripts/cnn_kept_probe.py CASE_DIR PRIOR.npy --rank --basin 0.02 0.1 --relaxed 25
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ig_cnn import build  # noqa: E402

torch.set_default_dtype(torch.float64)


def setup(case):
    net = build(json.load(open(os.path.join(case, "model.json")))).double()
    net.load_state_dict({k: v.double() for k, v in load_file(os.path.join(case, "model.safetensors")).items()})
    g = {k: v.double() for k, v in load_file(os.path.join(case, "gradient.safetensors")).items()}
    b = load_file(os.path.join(case, "batch.safetensors"))
    x = b["x"].double().reshape(-1, 3, 32, 32)
    if x.shape[0] != 1:
        sys.exit("cnn_kept_probe.py: B = 1 cases only")
    return net, g, x, b["y"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("prior")
    ap.add_argument("--rank", action="store_true")
    ap.add_argument("--basin", type=float, nargs="*", default=[])
    ap.add_argument("--rule", default="argmax", choices=["argmax", "closest"])
    ap.add_argument("--relaxed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    net, g, x, y = setup(a.case)
    c1, c2 = net[0], net[3]
    a1t = net[2](torch.relu(c1(x))).detach()
    z2t = c2(a1t).detach()
    h, idx = nn.functional.max_pool2d(torch.relu(z2t), 2, return_indices=True)
    hh = h.detach().requires_grad_(True)
    nn.functional.cross_entropy(net[6:](hh), y).backward()
    act = (h > 0).reshape(16, 25)
    W2 = c2.weight.detach().reshape(16, 150)
    H = h.reshape(16, 25) - c2.bias.detach()[:, None]
    dl = hh.grad.reshape(16, 25) * act
    dW = g["3.weight"].reshape(16, 150)
    pos = torch.arange(100).reshape(10, 10)
    win = torch.stack([pos[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1) for i in range(5) for j in range(5)])
    n = a1t.numel()
    truth = a1t.reshape(-1)
    s_true = (win[None].expand(16, 25, 4) == idx.reshape(16, 25, 1)).double().argmax(2)

    def unf(v):
        return nn.functional.unfold(v.reshape(1, 6, 14, 14), 5)[0]

    def resid(v, lam):
        U = unf(v)
        D = torch.zeros(16, 100)
        D[:, win.reshape(-1)] = (dl[:, :, None] * lam).reshape(16, 100)
        gr = ((D @ U.T - dW) / dW.norm()).reshape(-1)
        zw = (W2 @ U)[:, win]
        fw = ((lam * zw).sum(2) - H)[act] / H[act].norm()
        return gr, fw, torch.relu(zw - H[:, :, None]).reshape(-1) / H[act].norm()

    def onehot(s):
        return nn.functional.one_hot(s, 4).double()

    def ls(s):
        f = lambda v: torch.cat(resid(v, onehot(s))[:2])  # noqa: E731
        J = torch.func.jacfwd(f)(torch.zeros(n))
        rhs = -f(torch.zeros(n))
        sol = torch.linalg.lstsq(J, rhs[:, None], driver="gelsd").solution[:, 0]
        return sol, ((J @ sol - rhs).norm() / rhs.norm()).item(), J

    def rule(v):
        zw = (W2 @ unf(v))[:, win]
        if a.rule == "argmax":
            return zw.argmax(2)
        return (zw - H[:, :, None]).abs().argmin(2)

    def ok(s):
        return int(((s == s_true) & act).sum())

    def alternate(s, tag):
        for r in range(a.rounds):
            v, res, _ = ls(s)
            err = ((v - truth).norm() / truth.norm()).item()
            print(f"{tag} round {r}: kept right {ok(s)}/{int(act.sum())}, residual {res:.2e}, a_1 error {err:.2e}")
            nxt = rule(v)
            if torch.equal(nxt[act], s[act]):
                break
            s = nxt
        return s

    t0 = time.process_time()
    if a.rank:
        v, res, J = ls(s_true)
        sv = torch.linalg.svdvals(J)
        r = int((sv > sv[0] * 1e-12).sum())
        fixed = J.abs().sum(0) > 0
        print(f"true s: {J.shape[0]} equations, rank {r} of {n}; entries in a kept active patch {int(fixed.sum())};"
              f" residual {res:.1e}; max error on them {(v - truth)[fixed].abs().max().item():.1e};"
              f" the others: {int((~fixed).sum())}, {int(((~fixed) & (truth == 0)).sum())} of them zero")
    gen = torch.Generator().manual_seed(a.seed)
    for f in a.basin:
        s = s_true.clone()
        flip = (torch.rand(16, 25, generator=gen) < f) & act
        s[flip] = (s[flip] + torch.randint(1, 4, (int(flip.sum()),), generator=gen)) % 4
        alternate(s, f"basin {f} ({int(flip.sum())} moved, rule {a.rule})")
    if a.relaxed:
        prior = torch.tensor(np.load(a.prior)).reshape(1, 3, 32, 32)
        v = net[2](torch.relu(c1(prior))).detach().reshape(-1)
        lam = torch.full((16, 25, 4), 0.25)
        print(f"prior pushed forward: kept right {ok(rule(v))}/{int(act.sum())}")

        def proj_simplex(u):
            srt, _ = torch.sort(u, dim=-1, descending=True)
            css = srt.cumsum(-1) - 1
            k = torch.arange(1, u.shape[-1] + 1)
            rho = (srt - css / k > 0).sum(-1, keepdim=True)
            return torch.relu(u - css.gather(-1, rho - 1) / rho)

        def f(w):
            return torch.cat(resid(w[:n], w[n:].reshape(16, 25, 4)))

        w = torch.cat([v, lam.reshape(-1)])
        r = f(w)
        damp = 1e-3
        for it in range(a.relaxed):
            J = torch.func.jacrev(f)(w)
            JTJ, gg = J.T @ J, J.T @ r
            while damp < 1e8:
                nw = w + torch.linalg.solve(JTJ + damp * torch.diag(JTJ.diag() + 1e-12), -gg)
                nw[:n] = torch.relu(nw[:n])
                nw[n:] = proj_simplex(nw[n:].reshape(16, 25, 4)).reshape(-1)
                nr = f(nw)
                if nr.norm() < r.norm():
                    w, r, damp = nw, nr, max(damp / 3, 1e-9)
                    break
                damp *= 4
            lam_s = w[n:].reshape(16, 25, 4).argmax(2)
            err = ((w[:n] - truth).norm() / truth.norm()).item()
            print(f"relaxed step {it}: cost {r.norm().item():.2e}, kept right (lambda) {ok(lam_s)}, "
                  f"(argmax) {ok(rule(w[:n]))}, a_1 error {err:.2e}")
        alternate(rule(w[:n]), "from the relaxed solution")
    print(f"cpu {time.process_time() - t0:.1f} s")


if __name__ == "__main__":
    main()
