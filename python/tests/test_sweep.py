"""gradleak.sweep over a dask.distributed cluster of two worker processes, against
one process, and against the command line's --shard/--merge."""

import csv
import os
import subprocess
from pathlib import Path

import pytest

import gradleak
from conftest import REPO

# small real runs (digits): seconds each in a release build
GRID = {
    "data": "digits",
    "width": [96, 160],
    "batch": [1, 3],
    "activation": ["tanh", "relu"],
    "seed": 5,
}
# wall-clock columns: the only ones two runs of the same grid may differ in
TIMINGS = {"seconds_attack", "seconds_total"}


def rows(path):
    with open(path, newline="") as f:
        r = list(csv.reader(f))
    head = r[0]
    keep = [i for i, h in enumerate(head) if h not in TIMINGS]
    return [[row[i] for i in keep] for row in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    p = tmp_path_factory.mktemp("sweep") / "single.csv"
    out = gradleak.sweep(GRID, csv=p)
    assert len(out) == 8 and all(r["error"] == "" for r in out), out
    return p


def test_dask_cluster_matches_single_process(single, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            merged = tmp_path / "dask.csv"
            gradleak.sweep(GRID, executor=client.get_executor(), csv=merged)
            workers = client.run(os.getpid)
    assert len(set(workers.values())) == 2
    assert rows(merged) == rows(single)
    assert len(rows(single)) == 1 + 8


def cli():
    for p in [os.environ.get("GRADLEAK_BIN"), REPO / "target" / "release" / "gradleak", REPO / "target" / "debug" / "gradleak"]:
        if p and Path(p).is_file():
            return str(p)
    return None


def test_cli_shards_merge_to_the_same_csv(single, tmp_path):
    exe = cli()
    if exe is None:
        pytest.skip("no gradleak binary (set GRADLEAK_BIN or cargo build)")
    flags = ["--data", "digits", "--seed", "5", "--grid", "width=96,160", "--grid", "batch=1,3", "--grid", "activation=tanh,relu"]
    parts = []
    for k in (2, 1):  # any order
        p = tmp_path / f"part{k}.csv"
        subprocess.run([exe, "sweep", *flags, "--shard", f"{k}/2", "--csv", str(p)], check=True, capture_output=True)
        parts.append(p)
    assert len(rows(parts[0])) == 1 + 4 and len(rows(parts[1])) == 1 + 4
    merged = tmp_path / "merged.csv"
    subprocess.run([exe, "sweep", *flags, "--csv", str(merged), "--merge", *map(str, parts)], check=True, capture_output=True)
    assert rows(merged) == rows(single)
