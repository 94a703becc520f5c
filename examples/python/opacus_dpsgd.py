"""DP-SGD with Opacus: per-sample clipping and Gaussian noise, one step on a batch of
8 digits. The server attacks the privatised gradient at several noise multipliers
(it knows the noise level, sigma * C / B per entry, as DP-SGD makes it public) and
prints Opacus' epsilon beside the number of samples recovered.

Run: python examples/python/opacus_dpsgd.py   (needs torch, opacus, gradleak)
"""

import copy
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradleak

warnings.filterwarnings("ignore")  # Opacus warns about sigma = 0 and secure RNG

B, CLIP, DELTA = 8, 1.0, 1e-5
x_all, y_all, _, _ = gradleak.load_data("digits")
data = TensorDataset(torch.tensor(x_all, dtype=torch.float32), torch.tensor(y_all))

print(f"{'sigma':>7} {'epsilon':>10} {'recovered':>9} {'exact':>5} {'median rel. err':>15} {'labels':>6}")
rows = []
for sigma in [0.0, 1e-3, 1e-2, 0.1, 1.0]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 10))
    sent = copy.deepcopy(model)  # what the server sent
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(1))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(2),
    )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()  # clip per sample, sum, add N(0, (sigma C)^2), divide by B
    gradient = [p.grad for p in model._module.parameters()]
    eps = engine.get_epsilon(DELTA) if sigma > 0 else float("inf")
    try:
        rec = gradleak.attack(sent, gradient, loss="ce", noise_std=sigma * CLIP / B if sigma > 0 else None)
    except gradleak.GradleakError as e:  # e.g. the gradient is below its own noise floor
        print(f"{sigma:>7g} {eps:>10.3g} {0:>6}/{B} {0:>5} {'-':>15} {'-':>6}  ({e})")
        rows.append((sigma, eps, 0))
        continue
    m = gradleak.evaluate(x, rec, tol=1e-3, labels=y)
    acc = m["label_accuracy"]
    print(
        f"{sigma:>7g} {eps:>10.3g} {m['recovered']:>6}/{B} {int(rec.exact.sum()):>5} "
        f"{m['median_rel_error']:>15.2e} {'-' if acc is None else f'{acc:.0%}':>6}"
    )
    rows.append((sigma, eps, m["recovered"]))
print(f"delta = {DELTA}, clip C = {CLIP}, batch {B} of {len(data)} digits, one step; recovered = relative error <= 1e-3")
