"""Make PyTorch gradient fixtures in the layout of ../shared/fixtures/pytorch.

Each case folder holds model.safetensors (the server's nn.Sequential state_dict),
gradient.safetensors ({name: p.grad} after one loss.backward() on the batch,
reduction='mean'), batch.safetensors (the private truth: x, y) and case.json.
Run: python scripts/make_fixtures.py tests/fixtures/pytorch   (needs torch, safetensors, numpy, pillow)
     python scripts/make_fixtures.py DIR --heldout   (larger correlated cases, not committed)
     python scripts/make_fixtures.py DIR --deep      (deep smooth nets on faces, not committed)
     python scripts/make_fixtures.py DIR --relu32    (float32 ReLU colour photo batches, B = 16-128, issue 22;
                                                     ~100-200 MB each: DIR in /tmp)
Photo cases read ../shared/data/photos (beside the checkout; --photos DIR to change it).
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


PHOTOS = os.path.join(HERE, "..", "..", "shared", "data", "photos")


def square_tiles(size, mode, photos=None):
    """Square crops of every photo (sorted by name) in PIL `mode` ("L" or "RGB") at three
    scales: the largest centred square, then tiles of half and a quarter of its side,
    resized to size x size, as float64 arrays (H, W or H, W, C) with values in [0, 1]."""
    from PIL import Image
    photos = photos or PHOTOS
    tiles = []
    for f in sorted(os.listdir(photos)):
        if not f.lower().endswith((".png", ".jpg", ".jpeg")):
            continue
        img = Image.open(os.path.join(photos, f)).convert(mode)
        w, h = img.size
        side = min(w, h)
        for level in range(3):
            s = side >> level
            nx, ny = w // s, h // s
            ox, oy = (w - nx * s) // 2, (h - ny * s) // 2
            for ty in range(ny):
                for tx in range(nx):
                    crop = img.crop((ox + tx * s, oy + ty * s, ox + (tx + 1) * s, oy + (ty + 1) * s))
                    tiles.append(np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0)
    return tiles


def photo_crops(size, photos=None):
    """Greyscale square crops of every photo at three scales (square_tiles), as rows.
    Strongly correlated inputs (all positive, smooth)."""
    x = np.stack([t.reshape(-1) for t in square_tiles(size, "L", photos)])
    return x, np.arange(len(x)) % 10


def face_crops(size, seed, count=64, photos=None):
    """Face-like correlated inputs: greyscale crops around the face in astronaut.png
    (Eileen Collins, NASA, public domain), random side 140-260 px and offsets within
    40 px, resized to size x size, values in [0, 1]. Neighbouring crops overlap heavily."""
    from PIL import Image
    img = Image.open(os.path.join(photos or PHOTOS, "astronaut.png")).convert("L")
    rng = np.random.default_rng(1000 + seed)
    rows = []
    for _ in range(count):
        side = int(rng.integers(140, 261))
        cx, cy = 215 + int(rng.integers(-40, 41)), 125 + int(rng.integers(-40, 41))
        x0, y0 = max(0, cx - side // 2), max(0, cy - side // 2)
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        rows.append(np.asarray(crop, dtype=np.float64).reshape(-1) / 255.0)
    return np.stack(rows), np.arange(count) % 10


def make(out, name, act, widths, loss, batch, dtype, init, seed, data="digits"):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    if data.startswith("npy:"):
        # rows written by another tool, e.g. `gradleak simulate --data images:... --save DIR`
        # (truth.npy: the crops of the `images:` data spec); labels drawn here
        x_all = np.load(data[len("npy:"):])
        y_all = rng.integers(0, 10, size=len(x_all))
    elif data.startswith("chw:"):
        # colour rows of `gradleak simulate --data images:DIR:S --save DIR` (truth.npy, each
        # row S x S x 3 interleaved) reordered channel-first, as torchvision's ToTensor gives
        rows = np.load(data[len("chw:"):])
        side = int(round(np.sqrt(rows.shape[1] / 3)))
        x_all = rows.reshape(-1, side, side, 3).transpose(0, 3, 1, 2).reshape(len(rows), -1)
        y_all = rng.integers(0, 10, size=len(x_all))
    elif data.startswith("faces"):
        x_all, _ = face_crops(int(data[len("faces"):]), seed)
        y_all = rng.integers(0, 10, size=len(x_all))
    elif data.startswith("photos"):
        x_all, y_all = photo_crops(int(data[len("photos"):]))
        y_all = rng.integers(0, 10, size=len(x_all))
    else:
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


def heldout(out):
    """Larger correlated cases of the issue's form (photo crops 25 x 25 grey, float32,
    widths 1024-4096, depth 1-3), for measurement; too large to commit."""
    for seed in range(1, 7):
        make(out, f"photos25-tanh-ce-2048-s{seed}", "tanh", [2048, 10], "ce", 8, "float32",
             "torch-default", seed, data="photos25")
    for seed in range(1, 7):
        make(out, f"faces25-tanh-ce-2048-s{seed}", "tanh", [2048, 10], "ce", 8, "float32",
             "torch-default", seed, data="faces25")
    make(out, "photos25-gelu-bce-deep", "gelu", [1024, 512, 1], "bce", 6, "float32",
         "torch-default", 21, data="photos25")
    make(out, "photos25-tanh-ce-depth3", "tanh", [1024, 1024, 1024, 5], "ce", 10, "float32",
         "torch-default", 22, data="photos25")
    make(out, "photos25-silu-ce-4096", "silu", [4096, 10], "ce", 16, "float32",
         "torch-default", 23, data="photos25")
    make(out, "photos25-gelu-ce-depth2-b16", "gelu", [2048, 256, 10], "ce", 16, "float32",
         "torch-default", 24, data="photos25")
    # issue 9: a federated-size photo batch, B = 64 colour 32 x 32 crops of the `images:` spec,
    # m = 8192; make the crops first with
    # gradleak simulate --data images:../shared/data/photos:32 --batch 64 --width 8192 \
    #     --activation tanh --dtype f32 --seed 1 --method span --seed-rounds 0 --search-starts 1 --save /tmp/photos64
    if os.path.exists("/tmp/photos64/truth.npy"):
        make(out, "photos32rgb-tanh-ce-8192-b64", "tanh", [8192, 10], "ce", 64, "float32",
             "torch-default", 25, data="npy:/tmp/photos64/truth.npy")


def relu32(out):
    """Issue 22: a PyTorch client's float32 gradient of colour photo crops (32 x 32 x 3,
    channel-first) through 3072-m-10 ReLU / leaky ReLU, torch-default init, CE, seeded
    uniform labels; B = 16, 64 (m = 8192) and 128 (m = 16384), and depth-2 nets. Each case
    is ~100-200 MB: write them to /tmp, not the repository. The crops are every colour
    crop of the `images:` data spec (213 of them at 32 x 32), written first by
    gradleak simulate --data images:../shared/data/photos:32 --batch 213 --width 300 \
        --activation tanh --seed 1 --method span --seed-rounds 0 --search-starts 1 --save /tmp/relu22-pool
    """
    pool = "chw:/tmp/relu22-pool/truth.npy"
    for b in (16, 64):
        make(out, f"rgb32-relu-ce-8192-b{b}", "relu", [8192, 10], "ce", b, "float32",
             "torch-default", 70, data=pool)
    make(out, "rgb32-leaky_relu-ce-8192-b64", "leaky_relu", [8192, 10], "ce", 64, "float32",
         "torch-default", 71, data=pool)
    make(out, "rgb32-relu-ce-16384-b128", "relu", [16384, 10], "ce", 128, "float32",
         "torch-default", 72, data=pool)
    make(out, "rgb32-relu-ce-depth2-b64", "relu", [8192, 1024, 10], "ce", 64, "float32",
         "torch-default", 73, data=pool)
    make(out, "rgb32-leaky_relu-ce-depth2-b64", "leaky_relu", [8192, 1024, 10], "ce", 64,
         "float32", "torch-default", 74, data=pool)


def deep(out):
    """Deep smooth nets on face crops (issue 12, done-when line 4): 25 x 25 grey, float32,
    torch-default init, widths >= 1024, depth 2-3; two draws (model and batch) of each."""
    for i in (1, 2):
        make(out, f"faces25-gelu-bce-deep-s{i}", "gelu", [1024, 512, 1], "bce", 6, "float32",
             "torch-default", 30 + i, data="faces25")
        make(out, f"faces25-tanh-ce-depth3-s{i}", "tanh", [1024, 1024, 1024, 5], "ce", 10,
             "float32", "torch-default", 40 + i, data="faces25")
        make(out, f"faces25-silu-ce-depth2-s{i}", "silu", [2048, 1024, 10], "ce", 12, "float32",
             "torch-default", 50 + i, data="faces25")
    make(out, "faces25-tanh-ce-depth3-b16", "tanh", [2048, 1024, 1024, 10], "ce", 16, "float32",
         "torch-default", 61, data="faces25")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/pytorch"
    torch.set_num_threads(1)
    if "--deep" in sys.argv:
        deep(out)
        sys.exit(0)
    if "--relu32" in sys.argv:
        relu32(out)
        sys.exit(0)
    if "--heldout" in sys.argv:
        heldout(out)
        sys.exit(0)
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
    # correlated inputs (greyscale photo crops), float32, widths 1024, depth 1-3 (issue 12)
    make(out, "photos16-tanh-ce-1024", "tanh", [1024, 10], "ce", 8, "float32", "torch-default", 11,
         data="photos16")
    make(out, "photos12-gelu-bce-deep", "gelu", [1024, 64, 1], "bce", 6, "float32", "torch-default",
         12, data="photos12")
    make(out, "photos12-tanh-ce-depth3", "tanh", [1024, 32, 32, 10], "ce", 10, "float32",
         "torch-default", 13, data="photos12")
    # deep smooth nets on face crops (the --deep cases, upper layers narrowed to keep the
    # repository small and the debug-build test under a few seconds)
    make(out, "faces12-gelu-bce-deep", "gelu", [1024, 256, 1], "bce", 6, "float32",
         "torch-default", 14, data="faces12")
    make(out, "faces12-tanh-ce-depth3", "tanh", [1024, 256, 256, 5], "ce", 10, "float32",
         "torch-default", 15, data="faces12")
    # deep piecewise-linear nets (issue 9): pattern search on the top layer, descent to x
    make(out, "digits-relu-ce-depth2", "relu", [256, 128, 10], "ce", 8, "float32", "torch-default", 14)
    make(out, "digits-relu-ce-depth3", "relu", [256, 128, 128, 10], "ce", 8, "float32",
         "torch-default", 15)
    make(out, "digits-leaky_relu-ce-depth2", "leaky_relu", [256, 128, 10], "ce", 6, "float32",
         "torch-default", 16)
