"""gradleak.attack and gradleak.evaluate."""

import json

import numpy as np

from . import _native
from ._model import _is_torch, loss_name, prior_spec, read_gradient, read_model, to_numpy
from ._native import GradleakError


class Reconstruction:
    """What the attack recovered.

    inputs: float64 (n, d), recovered samples in any order; labels: int64 (n,), -1
    where unknown; exact: bool (n,), residual at the dtype's rounding floor;
    residuals: float64 (n,); batch_size: the estimated B (n < B means some are
    missing); report: the command line's JSON report as a dict.
    """

    __slots__ = ("inputs", "labels", "exact", "residuals", "batch_size", "report")

    def __init__(self, inputs, labels, exact, residuals, batch_size, report):
        self.inputs = inputs
        self.labels = labels
        self.exact = exact
        self.residuals = residuals
        self.batch_size = batch_size
        self.report = report

    @classmethod
    def _from_native(cls, out):
        """From the dict the native attacks return (arrays and the report as JSON)."""
        return cls(
            inputs=out["inputs"],
            labels=out["labels"],
            exact=out["exact"],
            residuals=out["residuals"],
            batch_size=out["batch_size"],
            report=json.loads(out["report_json"]),
        )

    def __len__(self):
        return self.inputs.shape[0]

    def __repr__(self):
        return (
            f"Reconstruction(recovered={len(self)}, exact={int(self.exact.sum())}, "
            f"batch_size={self.batch_size}, dim={self.inputs.shape[1]})"
        )

    def table(self):
        """The per-sample table the command line prints."""
        lines = [f"{'sample':>6} {'residual':>10} {'exact':>5} {'label':>5}  stage"]
        for i, s in enumerate(self.report["samples"]):
            r = "-" if s["residual"] is None else f"{s['residual']:.2e}"
            lab = "-" if s["label"] is None else str(s["label"])
            lines.append(f"{i:>6} {r:>10} {str(s['exact']):>5} {lab:>5}  {s['stage']}")
        return "\n".join(lines)


def attack(
    model,
    gradients,
    loss=None,
    method="auto",
    batch=None,
    seed=1,
    prior=None,
    noise_std=None,
    progress=False,
    *,
    activation=None,
):
    """Reconstruct the batch behind one gradient.

    model: a torch nn.Sequential of nn.Linear layers and one activation module type
    (Tanh Sigmoid ReLU LeakyReLU GELU SiLU Softplus ELU Identity; a leading Flatten is
    allowed), or a dict {"0.weight": array, "0.bias": array, ...} with activation=.
    gradients: [p.grad for p in model.parameters()], the tuple torch.autograd.grad
    returns, or a {name: tensor} dict (state_dict names). float32 gradients are
    attacked as float32 (what "exact" means depends on it).
    loss: "ce", "bce", "mse" or a torch loss module (reduction='mean'); enables labels.
    method: auto analytic tensor refine span dlg ig. batch: force the batch size.
    prior: {"mean":..,"std":..,"min":..,"max":..} over input values.
    noise_std: known noise per gradient entry (a defence). progress: bars on stderr.
    The attack runs with the GIL released; Ctrl-C stops it (KeyboardInterrupt).
    Bad input raises GradleakError.

    A model with Conv2d or pooling layers (Conv2d, eval BatchNorm2d, ReLU LeakyReLU
    Tanh Sigmoid GELU, MaxPool2d AvgPool2d AdaptiveAvgPool2d, Flatten, Linear; a
    Sequential or a forward torch.fx traces as one chain) is attacked at its fully
    connected head: rec.inputs are the features h_i entering the head's first Linear
    layer (d = its in_features), exact and certified as MLP inputs are; rec.report["cnn"]
    says which layer. The same as `gradleak attack --model DIR` on `export_model(model, DIR)`.
    """
    from ._cnn import attack_cnn, is_cnn

    if is_cnn(model):
        if prior is not None or noise_std is not None or activation is not None:
            raise GradleakError("invalid argument: prior, noise_std and activation do not apply to a CNN")
        out = attack_cnn(model, gradients, loss=loss_name(loss), method=method, batch=batch, seed=seed)
        return Reconstruction._from_native(out)
    layers, act, names = read_model(model, activation)
    grads = read_gradient(gradients, layers, names)
    if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
        raise GradleakError(f"invalid argument: batch must be a positive integer, not {batch!r}")
    if noise_std is not None:
        noise_std = float(noise_std)
    out = _native.attack(
        layers,
        grads,
        act,
        loss=loss_name(loss),
        method=str(method),
        batch=None if batch is None else int(batch),
        seed=int(seed),
        prior=prior_spec(prior),
        noise_std=noise_std,
        progress=bool(progress),
    )
    return Reconstruction._from_native(out)


def _rows(x, what):
    if _is_torch(x):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim < 2:
        raise GradleakError(f"shape mismatch: {what} must have one row per sample")
    # explicit column count: reshape(0, -1) cannot infer it for an empty batch
    return np.ascontiguousarray(a.reshape(a.shape[0], int(np.prod(a.shape[1:]))))


def evaluate(truth, rec, tol=1e-3, *, labels=None, data_range=None):
    """Match the recovered samples to the true batch (one to one, Hungarian on
    relative L2 error) and score them.

    truth: the true inputs, one row per sample (any trailing shape is flattened).
    rec: a Reconstruction (or an (n, d) array). labels: the true labels, for label
    accuracy. data_range: (lo, hi) for PSNR, default the truth's min and max.
    Returns a dict: recovered (count within tol), recovered_fraction, missing,
    median_rel_error, max_rel_error, mean_psnr, label_accuracy, rel_errors and psnr
    (arrays over the true samples, NaN where unmatched), matched (index into
    rec.inputs or -1), per_sample (the report's rows).
    """
    t = _rows(truth, "truth")
    if isinstance(rec, Reconstruction):
        x, lab = rec.inputs, rec.labels
    else:
        x = _rows(rec, "reconstruction")
        lab = np.full(x.shape[0], -1, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    x = np.ascontiguousarray(x.reshape(x.shape[0], int(np.prod(x.shape[1:]))))
    if x.shape[0] and x.shape[1] != t.shape[1]:
        raise GradleakError(f"shape mismatch: recovered samples have {x.shape[1]} values, the truth {t.shape[1]}")
    if x.shape[0] == 0:
        x = np.zeros((0, t.shape[1]))
    if data_range is None:
        data_range = (float(t.min()), float(t.max()))
        if data_range[1] <= data_range[0]:
            data_range = None
    true_labels = None
    if labels is not None:
        true_labels = [int(v) for v in (to_numpy(labels.double(), "labels") if _is_torch(labels) else np.asarray(labels)).reshape(-1)]
    m = json.loads(
        _native.evaluate(t, x, [int(v) for v in lab], float(tol), data_range=data_range, true_labels=true_labels)
    )
    per = m["per_sample"]
    nan = float("nan")
    m["recovered"] = sum(1 for p in per if p["recovered"])
    m["rel_errors"] = np.array([nan if p["rel_error"] is None else p["rel_error"] for p in per])
    m["psnr"] = np.array([nan if p["psnr"] is None else p["psnr"] for p in per])
    m["matched"] = np.array([-1 if p["matched"] is None else p["matched"] for p in per], dtype=np.int64)
    return m


def load_data(spec, rows=64, seed=1):
    """A data set the command line knows (`digits`, `images:DIR:S`, `csv:FILE`, ...):
    (x float64 (n, d), labels int64 or None, image shape (h, w, c) or None, value range or None).
    `digits` is embedded, so it works offline on any machine."""
    return _native.load_data(str(spec), rows=int(rows), seed=int(seed))
