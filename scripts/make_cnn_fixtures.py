"""Make PyTorch fixtures for convolutional clients (issue 21).

Each case folder holds model.json (the description gradleak reads, written here
independently of gradleak.export_model), model.safetensors (the state_dict, BatchNorm
running statistics included), gradient.safetensors ({name: p.grad} after one
loss.backward() on the batch, reduction='mean', the model in eval mode),
batch.safetensors (the private truth: x flattened as x.reshape(B, -1), i.e. C, H, W
order, and y) and case.json.
Run: python scripts/make_cnn_fixtures.py tests/fixtures/cnn          (tiny cases, committed)
     python scripts/make_cnn_fixtures.py DIR --large                   (LeNet and the VGG-style
                                          ConvNet at B = 1..64, f32 and f64; ~10-40 MB each: DIR in /tmp)
     python scripts/make_cnn_fixtures.py DIR --large --only convnet-f32-b64,convnet-f64-b64
                                          (only the named cases of --large)
     python scripts/make_cnn_fixtures.py DIR --pixels                  (the pixel stage's cases: LeNet and
                                          LeNet without pools at B = 1, 4, 16, and prior.npy, the mean crop)
Photos: ../shared/data/photos beside the checkout (--photos DIR to change it).
"""

import json
import os
import sys

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file

from make_fixtures import square_tiles

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "..", "..", "shared", "data", "photos")


def rgb_crops(size, photos=None):
    """RGB square crops of every photo at three scales (make_fixtures.square_tiles), as
    rows in C, H, W order."""
    tiles = square_tiles(size, "RGB", photos or PHOTOS)
    return np.stack([t.transpose(2, 0, 1).reshape(-1) for t in tiles])


def lenet(act=nn.ReLU, pool=nn.MaxPool2d):
    """conv5-6, pool, conv5-16, pool, fc 400-120-84-10 (LeCun et al. 1998, on 32x32x3)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), act(), pool(2),
        nn.Conv2d(6, 16, 5), act(), pool(2),
        nn.Flatten(),
        nn.Linear(400, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, 10),
    )


def lenet_np(act=nn.ReLU):
    """LeNet without its pooling layers and with 8 conv1 channels (the pixel stage's
    determined variant, docs/DESIGN.md "Pixels: the conv stage"): conv5-8, conv5-16,
    fc 9216-120-84-10."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 5), act(), nn.Conv2d(8, 16, 5), act(),
        nn.Flatten(),
        nn.Linear(9216, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, 10),
    )


def pixnet():
    """A tiny ReLU CNN whose conv layers the gradient determines at B = 1 (3x8x8:
    conv3-6, conv3-8, fc 128-16-4): the pixel stage's committed test case."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def convnet():
    """A VGG-style small CNN: three conv3 blocks (32, 64, 64 channels) with 2x2 max
    pooling, then a 1024-1024-10 ReLU head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def zoo():
    """Every layer kind on 3x12x12: a bias-free conv with eval BatchNorm, LeakyReLU, max
    pooling, a strided padded conv, GELU, padded average pooling, a 1x1 conv, Tanh,
    adaptive average pooling, then Linear-Sigmoid-Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.GELU(), nn.AvgPool2d(3, stride=1, padding=1),
        nn.Conv2d(5, 6, 1), nn.Tanh(), nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(), nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3),
    )


def pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def describe(net, input_shape):
    """The model.json layers of an nn.Sequential (names are the state_dict prefixes)."""
    layers = []
    for name, m in net.named_children():
        t = type(m).__name__
        if isinstance(m, nn.Conv2d):
            layers.append({"type": "Conv2d", "name": name, "in_channels": m.in_channels, "out_channels": m.out_channels,
                           "kernel": pair(m.kernel_size), "stride": pair(m.stride), "padding": pair(m.padding),
                           "bias": m.bias is not None})
        elif isinstance(m, nn.BatchNorm2d):
            layers.append({"type": "BatchNorm2d", "name": name, "num_features": m.num_features, "eps": m.eps,
                           "training": m.training})
        elif isinstance(m, nn.LeakyReLU):
            layers.append({"type": "LeakyReLU", "negative_slope": m.negative_slope})
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            layers.append({"type": t, "kernel": pair(m.kernel_size), "stride": pair(m.stride or m.kernel_size),
                           "padding": pair(m.padding)})
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            layers.append({"type": t, "output": pair(m.output_size)})
        elif isinstance(m, nn.Linear):
            layers.append({"type": "Linear", "name": name, "in_features": m.in_features,
                           "out_features": m.out_features, "bias": m.bias is not None})
        else:
            layers.append({"type": t})
    return {"format": "gradleak-cnn/1", "input": list(input_shape), "layers": layers}


def make(out, name, net, size, batch, dtype, seed, loss="ce", rows=None):
    torch.manual_seed(seed)
    net = net().to(dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            # running statistics and affine parameters away from their identity values
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    net.eval()
    x_all = rows if rows is not None else rgb_crops(size)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x_all), size=batch, replace=False)
    x = torch.tensor(x_all[idx], dtype=dtype)
    y = torch.tensor(rng.integers(0, 10, size=batch), dtype=torch.int64)
    logits = net(x.reshape(batch, 3, size, size))
    if logits.shape[1] < 10:
        y = y % logits.shape[1]
    nn.CrossEntropyLoss()(logits, y).backward()
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(describe(net, (3, size, size)), f, indent=1)
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    save_file(sd, os.path.join(path, "model.safetensors"))
    save_file({n: p.grad.contiguous() for n, p in net.named_parameters()}, os.path.join(path, "gradient.safetensors"))
    save_file({"x": x.contiguous(), "y": y.contiguous()}, os.path.join(path, "batch.safetensors"))
    case = {"name": name, "batch": batch, "loss": loss, "dtype": str(dtype).replace("torch.", ""),
            "seed": seed, "indices": idx.tolist(), "size": size}
    with open(os.path.join(path, "case.json"), "w") as f:
        json.dump(case, f, indent=1)
    print(name, "B =", batch, dtype)


def main():
    out = sys.argv[1]
    if "--photos" in sys.argv:
        global PHOTOS
        PHOTOS = sys.argv[sys.argv.index("--photos") + 1]
    if "--pixels" in sys.argv:
        x32 = rgb_crops(32)
        os.makedirs(out, exist_ok=True)
        # the public prior: the mean image of every crop
        np.save(os.path.join(out, "prior.npy"), x32.mean(0, keepdims=True))
        for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
            for b in (1, 4, 16):
                make(out, f"lenetnp-{tag}-b{b}", lenet_np, 32, b, dtype, 300 + b, rows=x32)
                make(out, f"lenet-{tag}-b{b}", lenet, 32, b, dtype, 100 + b, rows=x32)
        return
    if "--large" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
        x32 = rgb_crops(32)
        for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
            cases = [(f"lenet-{tag}-b{b}", lenet, b, 100 + b) for b in (1, 2, 4, 8, 16, 64)]
            cases += [(f"convnet-{tag}-b{b}", convnet, b, 200 + b) for b in (1, 4, 8, 16, 32, 48, 64, 128)]
            for name, net, b, seed in cases:
                if only is None or name in only:
                    make(out, name, net, 32, b, dtype, seed, rows=x32)
        return
    make(out, "lenet-f32", lenet, 32, 2, torch.float32, 1)
    make(out, "zoo-f64", zoo, 12, 3, torch.float64, 2)
    make(out, "zoo-f32", zoo, 12, 3, torch.float32, 3)
    make(out, "pixnet-f64", pixnet, 8, 1, torch.float64, 4)
    make(out, "pixnet-f64-b4", pixnet, 8, 4, torch.float64, 5)


if __name__ == "__main__":
    main()
