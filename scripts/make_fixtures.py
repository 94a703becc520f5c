"""Make PyTorch gradient fixtures in the layout of ../shared/fixtures/pytorch.

Each case folder holds model.safetensors (the server's nn.Sequential state_dict),
gradient.safetensors ({name: p.grad} after one loss.backward() on the batch,
reduction='mean'), batch.safetensors (the private truth: x, y) and case.json.
Run: python scripts/make_fixtures.py tests/fixtures/pytorch   (needs torch, safetensors, numpy)
"""

import gzip
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ACT = {
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU,
    "leaky_relu": torch.nn.LeakyReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
    "softplus": torch.nn.Softplus, "elu": torch.nn.ELU, "identity": torch.nn.Identity,
}
HERE = os.path.dirname(os.path.abspath(__file__))


def digits():
    raw = np.loadtxt(gzip.open(os.path.join(HERE, "..", "assets", "digits.csv.gz")), delimiter=",")
    return raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64)


def make(out, name, act, widths, loss, batch, dtype, init, seed, data="digits"):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    x_all, y_all = digits()
    if data == "gaussian":
        x_all = rng.normal(0, 1 / np.sqrt(16), size=(200, 16))
    d = x_all.shape[1]
    layers = []
    sizes = [d] + widths
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACT[act]())
    net = torch.nn.Sequential(*layers).to(dt)
    if init == "gaussian":
        with torch.no_grad():
            s = 1.0 / np.sqrt((x_all ** 2).sum(1).mean() + 1.0)
            net[0].weight.normal_(0, s)
            net[0].bias.normal_(0, s)
    idx = rng.choice(len(x_all), size=batch, replace=False)
    x = torch.tensor(x_all[idx], dtype=dt)
    k = widths[-1]
    if loss == "ce":
        y = torch.tensor(y_all[idx] % k, dtype=torch.int64)
        crit = torch.nn.CrossEntropyLoss()
    elif loss == "bce":
        y = torch.tensor(rng.integers(0, 2, size=(batch, k)), dtype=dt)
        crit = torch.nn.BCEWithLogitsLoss()
    else:
        y = torch.tensor(rng.normal(size=(batch, k)), dtype=dt)
        crit = torch.nn.MSELoss()
    net.zero_grad()
    crit(net(x), y).backward()
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    sd = {k2: v.detach().contiguous() for k2, v in net.state_dict().items()}
    save_file(sd, os.path.join(path, "model.safetensors"))
    save_file({n: p.grad.contiguous() for n, p in net.named_parameters()}, os.path.join(path, "gradient.safetensors"))
    save_file({"x": x.contiguous(), "y": y.contiguous()}, os.path.join(path, "batch.safetensors"))
    case = {"framework": f"torch {torch.__version__}", "activation": act, "widths": widths, "loss": loss,
            "batch": batch, "dtype": dtype, "init": init, "seed": seed, "data": data,
            "depth": len(widths) - 1}
    with open(os.path.join(path, "case.json"), "w") as f:
        json.dump(case, f, indent=1)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/pytorch"
    torch.set_num_threads(1)
    make(out, "digits-b1-tanh-ce", "tanh", [256, 10], "ce", 1, "float32", "torch-default", 1)
    make(out, "digits-gelu-ce-deep", "gelu", [256, 64, 10], "ce", 4, "float64", "torch-default", 2)
    make(out, "digits-relu-bce", "relu", [256, 3], "bce", 3, "float32", "torch-default", 3)
    make(out, "gaussian-silu-mse", "silu", [128, 2], "mse", 4, "float64", "gaussian", 4, data="gaussian")
    make(out, "digits-softplus-ce-depth3", "softplus", [128, 32, 32, 10], "ce", 4, "float32", "torch-default", 5)
    make(out, "digits-leaky_relu-mse", "leaky_relu", [128, 2], "mse", 2, "float64", "torch-default", 6)
    make(out, "digits-elu-ce", "elu", [128, 10], "ce", 3, "float32", "gaussian", 7)
    make(out, "digits-sigmoid-bce", "sigmoid", [128, 1], "bce", 5, "float64", "torch-default", 8)
    make(out, "digits-identity-mse", "identity", [64, 3], "mse", 2, "float32", "torch-default", 9)
    make(out, "digits-gelu-ce-4096", "gelu", [4096, 10], "ce", 8, "float32", "torch-default", 10)
