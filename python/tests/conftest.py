"""Shared data for the Python tests: real images, not random numbers."""

import os
from pathlib import Path

import numpy as np
import pytest

import gradleak

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "python"


def photos_dir():
    d = os.environ.get("GRADLEAK_SHARED")
    base = Path(d) if d else REPO.parent / "shared"
    return base / "data" / "photos"


def faces(n=8, seed=0):
    """n greyscale 25x25 images (625 values in [0, 1]): crops of the photos in
    ../shared/data/photos (astronaut, cameraman, ...); without them, the embedded
    8x8 digits upsampled to 25x25. Returns (x float32 (n, 625), source)."""
    d = photos_dir()
    if d.is_dir():
        x, _, _, _ = gradleak.load_data(f"images:{d}:25")
        grey = x.reshape(-1, 25, 25, 3).mean(axis=-1).reshape(-1, 625)
        source = "photo crops"
    else:
        x, _, _, _ = gradleak.load_data("digits")
        up = np.repeat(np.repeat(x.reshape(-1, 8, 8), 4, axis=1), 4, axis=2)[:, :25, :25]
        grey = up.reshape(-1, 625)
        source = "upsampled digits"
    idx = np.random.default_rng(seed).choice(len(grey), size=n, replace=False)
    return grey[idx].astype(np.float32), source


@pytest.fixture(scope="session")
def face_batch():
    return faces()
