"""gradleak.sweep: a grid of simulated rounds over any concurrent.futures.Executor."""

import os
import tempfile

from . import _native
from ._native import GradleakError


def _split(grid):
    if not isinstance(grid, dict) or not grid:
        raise GradleakError("invalid argument: grid is a dict {key: value or [values]} (keys as in `gradleak sweep --grid`)")
    fixed, axes = [], []
    for k, v in grid.items():
        if isinstance(v, (list, tuple, range)):
            vals = [str(x) for x in v]
            if not vals:
                raise GradleakError(f"invalid argument: grid key '{k}' has no values")
            axes.append((str(k), vals))
        else:
            fixed.append((str(k), str(v)))
    return fixed, axes


def run_index(fixed, axes, index):
    """One run of the grid, as its CSV line (module level, so executors can pickle it)."""
    return _native.sweep_line(fixed, axes, index)


def sweep(grid, executor=None, csv=None):
    """Simulate every setting of `grid` and return the rows as a list of dicts.

    grid: {key: value or [values]}; keys are the command line's grid keys (data batch
    width depth hidden activation loss classes init dtype seed method defense tol
    prior ...). Lists are axes (the last varies fastest), scalars fixed; everything
    else has the command line's defaults. executor: any concurrent.futures.Executor
    (e.g. dask.distributed's Client.get_executor(), Ray's, a ProcessPoolExecutor);
    None runs here, one run after another. csv: write the rows there, in grid order,
    exactly as `gradleak sweep --csv` writes them (atomically).
    """
    fixed, axes = _split(grid)
    n = _native.sweep_len(fixed, axes)
    idx = list(range(n))
    if executor is None:
        lines = [run_index(fixed, axes, i) for i in idx]
    else:
        lines = list(executor.map(run_index, [fixed] * n, [axes] * n, idx))
    header = _native.sweep_header()
    if csv is not None:
        csv = os.fspath(csv)
        d = os.path.dirname(os.path.abspath(csv))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".gradleak-sweep-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(",".join(header) + "\n")
                for line in lines:
                    f.write(line + "\n")
            os.replace(tmp, csv)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    import csv as _csv

    return [dict(zip(header, row)) for row in _csv.reader(lines)]
