"""One training step of a torch MLP on a batch of 8 digits; the server attacks the
gradient the client sends back and prints what it recovered, sample by sample.

Run: python examples/python/pytorch_attack.py   (needs torch and the gradleak package)
"""

import numpy as np
import torch
from torch import nn

import gradleak

# the client's private batch: 8 handwritten digits (embedded in gradleak), 8x8 in [0, 1]
x_all, y_all, _, _ = gradleak.load_data("digits")
pick = np.random.default_rng(0).choice(len(x_all), size=8, replace=False)
x = torch.tensor(x_all[pick], dtype=torch.float32)
y = torch.tensor(y_all[pick])

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()

# the client's step; the server sent `model` and receives the gradient
optimizer.zero_grad()
loss_fn(model(x), y).backward()
gradient = [p.grad.clone() for p in model.parameters()]

rec = gradleak.attack(model, gradient, loss=loss_fn)
optimizer.step()  # the client carries on; the server already has what it needs

m = gradleak.evaluate(x, rec, tol=1e-3, labels=y)
print(f"gradient dtype {rec.report['dtype']}, batch size estimated {rec.batch_size}")
print(f"{'sample':>6} {'label':>5} {'recovered label':>15} {'rel. error':>10} {'exact':>5}")
for i in range(len(x)):
    k = m["matched"][i]
    lab = "-" if k < 0 else int(rec.labels[k])
    ex = "-" if k < 0 else bool(rec.exact[k])
    print(f"{i:>6} {int(y[i]):>5} {lab:>15} {m['rel_errors'][i]:>10.2e} {str(ex):>5}")
print(f"recovered {m['recovered']}/{len(x)} within 1e-3, labels correct {m['label_accuracy']:.0%}, mean PSNR {m['mean_psnr']:.1f} dB")
