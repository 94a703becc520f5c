"""Probe a rank-deficient batch (docs/DESIGN.md, "Rank-deficient inputs").

Usage: python scripts/deficient_probe.py DIR [--minima N [--save-minima FILE]] [--joint S NEURONS STEPS]
where DIR comes from `gradleak simulate ... --save DIR` (one hidden layer, tanh, f64).

Prints the inputs' zero coordinates and rank, the samples outside the span of the
others (l_i = 0), the span residual F at every true sample, and optionally
* --minima N: for every N-th sample, where LM on F (r free) goes from the truth
  (--save-minima FILE writes them, the other samples' truth, as a B x d .npy: the
  starts of `deficient_basin::from_seeds`);
* --joint S NEURONS STEPS: LM on every first-layer and output-layer equation of
  NEURONS random neurons, unknowns all x_i (non-zero coordinates) and r_i, from the
  truth displaced by S (relative, per sample), for STEPS steps.
Uses numpy/scipy and the truth: a measurement tool, not an attack.
"""

import sys

import numpy as np
from safetensors.numpy import load_file


def load(path):
    m = load_file(f"{path}/model.safetensors")
    g = load_file(f"{path}/gradient.safetensors")
    x = np.load(f"{path}/truth.npy")
    return m, g, x


def main():
    path = sys.argv[1]
    args = sys.argv[2:]
    m, g, x = load(path)
    b, d = x.shape
    w, bias, a = m["0.weight"], m["0.bias"], m["2.weight"]
    k = a.shape[0]
    gw, gb, ga, gc = g["0.weight"], g["0.bias"], g["2.weight"], g["2.bias"]
    xt = np.hstack([x, np.ones((b, 1))])
    zero = np.where(np.all(gw == 0, axis=0))[0]
    print("zero coordinates (zero gradient columns):", [int(c) for c in zero])
    print("rank of X~:", np.linalg.matrix_rank(xt), "of", d + 1 - len(zero), "allowed")
    u, s, vt = np.linalg.svd(xt.T)
    r = int(np.sum(s > 1e-10 * s[0]))
    null = vt[r:].T
    li = np.linalg.norm(null, axis=1)
    print("linear relations:", null.shape[1], "| samples with l_i = 0:", [int(i) for i in np.where(li < 1e-10)[0]])
    # true residuals from the output layer, signals, span residual
    h = np.tanh(x @ w.T + bias)
    hc = np.hstack([h, np.ones((b, 1))])
    res = np.linalg.lstsq(hc.T, np.hstack([ga, gc[:, None]]).T, rcond=None)[0]
    delta = (1 - h**2) * (res @ a)
    gt = np.hstack([gw, gb[:, None]])
    uq, sq, vq = np.linalg.svd(gt, full_matrices=False)
    q = uq[:, :r]
    perp = delta.T - q @ (q.T @ delta.T)
    f = np.linalg.norm(perp, axis=0) / np.linalg.norm(delta, axis=1)
    print("F at the truth: min %.3e median %.3e max %.3e" % (f.min(), np.median(f), f.max()))
    v = vq[:r].T
    vl = v[-1]
    c0 = vl / (vl @ vl)
    nb = np.linalg.qr(np.column_stack([vl / np.linalg.norm(vl), np.eye(r)]))[0][:, 1:r]
    pw = np.hstack([w, bias[:, None]]) @ v
    ct = xt @ v
    if "--minima" in args:
        from scipy.optimize import least_squares

        step = int(args[args.index("--minima") + 1])

        def resid(p):
            c = c0 + nb @ p[: r - 1]
            sig = (1 - np.tanh(pw @ c) ** 2) * (a.T @ p[r - 1 :])
            e = sig - q @ (q.T @ sig)
            return np.concatenate([e / np.linalg.norm(sig), [np.linalg.norm(p[r - 1 :]) - 1]])

        minima = x.copy()
        for i in range(0, b, step):
            p0 = np.concatenate([nb.T @ (ct[i] - c0), res[i] / np.linalg.norm(res[i])])
            sol = least_squares(resid, p0, method="lm", max_nfev=2000)
            xi = (v @ (c0 + nb @ sol.x[: r - 1]))[:d]
            xi[zero] = 0.0
            minima[i] = xi
            print(
                "sample %d: F truth %.2e -> minimum %.2e at rel. distance %.3f"
                % (i, f[i], np.linalg.norm(sol.fun[:-1]), np.linalg.norm(xi - x[i]) / np.linalg.norm(x[i])),
                flush=True,
            )
        if "--save-minima" in args:
            np.save(args[args.index("--save-minima") + 1], minima)
    if "--joint" in args:
        j = args.index("--joint")
        joint(x, w, bias, a, gw, gb, ga, gc, float(args[j + 1]), int(args[j + 2]), int(args[j + 3]))


def joint(x, w, bias, a, gw, gb, ga, gc, scale, n, steps):
    b, d = x.shape
    k = a.shape[0]
    keep = np.where(np.any(gw != 0, axis=0))[0]
    dk = len(keep)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(w.shape[0], n, replace=False))
    ws, bs, As = w[rows][:, keep], bias[rows], a[:, rows]
    obs = np.hstack([gw[rows][:, keep], gb[rows][:, None]])
    oa = np.hstack([ga[:, rows], gc[:, None]])
    wa = np.linalg.norm(obs) / np.linalg.norm(oa)

    def resid(xx, rr):
        h = np.tanh(xx @ ws.T + bs)
        d1 = 1 - h * h
        dl = d1 * (rr @ As)
        e1 = dl.T @ np.hstack([xx, np.ones((b, 1))]) - obs
        e2 = rr.T @ np.hstack([h, np.ones((b, 1))]) - oa
        return np.concatenate([e1.ravel(), wa * e2.ravel()]), (h, d1, dl)

    def jac(xx, rr, cache):
        h, d1, dl = cache
        d2 = -2 * h * d1
        p = rr @ As
        xt = np.hstack([xx, np.ones((b, 1))])
        nu, nr = b * dk, b * k
        j1 = np.zeros((n, dk + 1, nu + nr))
        j2 = np.zeros((k, n + 1, nu + nr))
        for i in range(b):
            blk = ((d2[i] * p[i])[:, None, None] * xt[i][None, :, None]) * ws[:, None, :]
            for c in range(dk):
                blk[:, c, c] += dl[i]
            j1[:, :, i * dk : (i + 1) * dk] = blk
            j1[:, :, nu + i * k : nu + (i + 1) * k] = (d1[i][:, None, None] * xt[i][None, :, None]) * As.T[:, None, :]
            j2[:, :n, i * dk : (i + 1) * dk] = rr[i][:, None, None] * (d1[i][:, None] * ws)[None, :, :]
            for kk in range(k):
                j2[kk, :n, nu + i * k + kk] = h[i]
                j2[kk, n, nu + i * k + kk] = 1.0
        return np.concatenate([j1.reshape(-1, nu + nr), wa * j2.reshape(-1, nu + nr)])

    xs = x[:, keep]
    xx = xs + scale * rng.standard_normal((b, dk)) * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(dk)
    hc = np.hstack([np.tanh(xx @ ws.T + bs), np.ones((b, 1))])
    rr = np.linalg.lstsq(hc.T, oa.T, rcond=None)[0]
    e, cache = resid(xx, rr)
    fv, lam, n2 = e @ e, 1e-3, np.linalg.norm(obs) ** 2
    for it in range(steps):
        jm = jac(xx, rr, cache)
        jtj, gr = jm.T @ jm, jm.T @ e
        dg = np.diag(jtj).copy()
        while lam < 1e8:
            p = -np.linalg.solve(jtj + lam * np.diag(dg + 1e-30), gr)
            xn, rn = xx + p[: b * dk].reshape(b, dk), rr + p[b * dk :].reshape(b, k)
            en, cn = resid(xn, rn)
            if en @ en < fv:
                xx, rr, e, cache, fv = xn, rn, en, cn, en @ en
                lam = max(lam / 3, 1e-12)
                break
            lam *= 8
        err = np.linalg.norm(xx - xs, axis=1) / np.linalg.norm(x, axis=1)
        print(
            "step %d: objective %.3e, rel. error median %.3e max %.3e, within 1e-6: %d"
            % (it, fv / n2, np.median(err), err.max(), (err < 1e-6).sum()),
            flush=True,
        )


if __name__ == "__main__":
    main()
