"""Convolutional models (issue 21): gradleak.attack on a CNN's PyTorch gradient
recovers the features entering its fully connected head exactly, with labels; the CLI
on export_model's folder gives the same result; unsupported layers are one-line errors."""

import os
import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from safetensors.torch import save_file

import gradleak
from conftest import REPO, photos_dir

# float32: the features carry the gradient's rounding (eps32 ~ 1.2e-7) times the
# batch's conditioning; measured <= 4e-7, a wrong or approximate sample is off by > 1e-2
F32_TOL = 1e-4


def crops(n, seed):
    """n RGB 32x32 photo crops from ../shared/data/photos as (n, 3, 32, 32) float32."""
    d = photos_dir()
    assert d.is_dir(), f"no photos at {d}"
    x, _, _, _ = gradleak.load_data(f"images:{d}:32")
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return torch.tensor(x[idx].reshape(n, 32, 32, 3).transpose(0, 3, 1, 2).copy(), dtype=torch.float32)


def convnet():
    """The VGG-style small CNN of the issue: conv3 blocks of 32, 64, 64 channels with 2x2
    max pooling, then a 1024-1024-10 ReLU head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


class BnNet(nn.Module):
    """A custom forward (functional ReLU and pooling, x.view(x.size(0), -1)) with an
    eval-mode BatchNorm and Dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(8 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        x = self.drop(x.view(x.size(0), -1))
        return self.fc2(torch.tanh(self.fc1(x)))


def gradient_of(model, x, y):
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def check_features(truth, rec, y):
    m = gradleak.evaluate(truth, rec, tol=F32_TOL, labels=y)
    assert m["recovered"] == len(truth), m["rel_errors"]
    assert m["label_accuracy"] == 1.0, (rec.labels, y)
    assert rec.exact.all() and rec.report["certified"]
    return m


def binary():
    for p in [os.environ.get("GRADLEAK_BIN"), REPO / "target" / "release" / "gradleak", REPO / "target" / "debug" / "gradleak"]:
        if p and os.path.exists(p):
            return str(p)
    pytest.fail("no gradleak binary (set GRADLEAK_BIN or cargo build)")


def test_convnet_features_exact_and_cli_agrees(tmp_path):
    torch.manual_seed(5)
    model = convnet().eval()
    x, y = crops(16, 1), torch.arange(16) % 10
    grads = gradient_of(model, x, y)
    rec = gradleak.attack(model, grads, loss="ce")
    assert rec.report["cnn"]["head_layer"] == "10" and rec.inputs.shape == (16, 1024)
    with torch.no_grad():
        h = model[:10](x)
    check_features(h, rec, y)
    # the same gradient through the command line, on the exported folder
    gradleak.export_model(model, tmp_path / "model")
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, str(tmp_path / "gradient.safetensors"))
    subprocess.run(
        [binary(), "attack", "--model", str(tmp_path / "model"), "--gradient", str(tmp_path / "gradient.safetensors"),
         "--loss", "ce", "--out", str(tmp_path / "feats.npy"), "--labels", str(tmp_path / "labels.npy"), "--quiet"],
        check=True, capture_output=True,
    )
    assert np.array_equal(np.load(tmp_path / "feats.npy"), rec.inputs)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), rec.labels)


def test_custom_forward_with_eval_batchnorm_and_dropout():
    torch.manual_seed(2)
    model = BnNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    x, y = crops(6, 2), torch.tensor([3, 1, 4, 1, 5, 9])
    rec = gradleak.attack(model, gradient_of(model, x, y), loss="ce")
    with torch.no_grad():
        h = F.max_pool2d(F.relu(model.bn(model.conv(x))), 2).reshape(6, -1)
    check_features(h, rec, y)


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: BnNet().train(), "layer 'bn' is a BatchNorm2d in training mode"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).train(),
         "layer '1' is a Dropout in training mode"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(4 * 60 * 60, 10)),
         "unknown layer 'Upsample' '1'"),
    ],
)
def test_unsupported_layers_are_named(make, says):
    model = make()
    x = crops(2, 3)
    grads = gradient_of(model, x, torch.tensor([0, 1]))
    with pytest.raises(gradleak.GradleakError) as e:
        gradleak.attack(model, grads, loss="ce")
    assert says in str(e.value) and "\n" not in str(e.value)
