"""Convolutional models: the torch.fx reader that turns an nn.Module into gradleak's
model description (model.json, format gradleak-cnn/1), export_model, and the CNN
attack (the features entering the fully connected head, exact and certified)."""

import json
import os

from ._model import _fx_chain, _is_module, _torch, to_numpy
from ._native import GradleakError

FORMAT = "gradleak-cnn/1"
# module classes that make a model a CNN for gradleak.attack
IMAGE_LAYERS = ("Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm2d")
KNOWN = "Conv2d BatchNorm2d(eval) ReLU LeakyReLU Tanh Sigmoid GELU MaxPool2d AvgPool2d AdaptiveAvgPool2d Flatten Linear Dropout(eval) Identity"


def is_cnn(model):
    """A torch module with a convolution or pooling layer."""
    return _is_module(model) and any(type(m).__name__ in IMAGE_LAYERS for m in model.modules())


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _layer(name, m):
    """The description entry of module m (named `name` in the model), or None to skip it."""
    nn = _torch().nn
    kind = type(m).__name__
    where = f"'{name}'" if name else "(functional)"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or _pair(m.dilation) != [1, 1] or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise GradleakError(
                f"invalid argument: layer {where} Conv2d with groups, dilation, string padding or "
                f"padding_mode '{m.padding_mode}' is not supported (gradleak takes stride, zero padding, bias)"
            )
        return {"type": "Conv2d", "name": name, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(m.padding),
                "bias": m.bias is not None}
    if isinstance(m, nn.BatchNorm2d):
        if m.training or not m.track_running_stats:
            raise GradleakError(
                f"invalid argument: layer {where} is a BatchNorm2d in training mode: its batch statistics are "
                "private to the client; call model.eval() before computing the gradient"
            )
        return {"type": "BatchNorm2d", "name": name, "num_features": m.num_features, "eps": float(m.eps),
                "training": False}
    if isinstance(m, nn.Dropout) or kind.startswith("Dropout"):
        if m.training and float(m.p) > 0:
            raise GradleakError(
                f"invalid argument: layer {where} is a {kind} in training mode: its random mask is private to "
                "the client; call model.eval() before computing the gradient"
            )
        return None
    if isinstance(m, nn.Identity):
        return None
    if isinstance(m, nn.LeakyReLU):
        return {"type": "LeakyReLU", "negative_slope": float(m.negative_slope)}
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise GradleakError(f"invalid argument: layer {where} GELU(approximate='{m.approximate}'): gradleak's gelu is the erf form")
        return {"type": "GELU"}
    if kind in ("ReLU", "Tanh", "Sigmoid", "Flatten"):
        if kind == "Flatten" and (m.start_dim != 1 or m.end_dim != -1):
            raise GradleakError(f"invalid argument: layer {where} Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}); gradleak flattens all but the batch")
        return {"type": kind}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if getattr(m, "ceil_mode", False) or _pair(getattr(m, "dilation", 1)) != [1, 1]:
            raise GradleakError(f"invalid argument: layer {where} {kind} with ceil_mode or dilation is not supported")
        if isinstance(m, nn.AvgPool2d) and (not m.count_include_pad or m.divisor_override is not None):
            raise GradleakError(f"invalid argument: layer {where} AvgPool2d needs count_include_pad=True and no divisor_override")
        return {"type": kind, "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding)}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return {"type": kind, "output": _pair(m.output_size)}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "name": name, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    raise GradleakError(f"unknown layer '{kind}' {where} (expected one of: {KNOWN})")


def _functional(node):
    """The module a functional call in a traced forward stands for, or 'skip'."""
    nn = _torch().nn
    name = getattr(node.target, "__name__", str(node.target))
    args, kw = node.args, node.kwargs
    arg = lambda i, key, default: args[i] if len(args) > i else kw.get(key, default)  # noqa: E731
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if name in simple:
        return simple[name]()
    if name == "gelu":
        return nn.GELU(approximate=kw.get("approximate", "none"))
    if name == "leaky_relu":
        return nn.LeakyReLU(arg(1, "negative_slope", 0.01))
    if name == "max_pool2d":
        return nn.MaxPool2d(arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0))
    if name == "avg_pool2d":
        return nn.AvgPool2d(arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0))
    if name == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d(arg(1, "output_size", None))
    if name in ("flatten", "view", "reshape"):
        if name == "flatten" and arg(1, "start_dim", 0) != 1:
            raise GradleakError("invalid argument: torch.flatten(x) must be flatten(x, 1) (keep the batch dimension)")
        return nn.Flatten()
    if name == "dropout":
        return nn.Dropout(arg(1, "p", 0.5)).train(bool(arg(2, "training", True)))
    raise GradleakError(f"unknown layer '{name}' (a call in the model's forward; expected one of: {KNOWN})")


def _chain(model):
    """(name, module) in forward order: a Sequential's leaves, or a custom forward
    traced with torch.fx (one chain from the input; x.size() calls feeding a view are skipped)."""
    nn = _torch().nn
    if isinstance(model, nn.Sequential):
        out = []
        for name, m in model.named_modules():
            if name and not list(m.children()):
                out.append((name, m))
        return out
    return _fx_chain(model, _functional, skip_size=True)


def _shapes_fit(layers, c, h, w, features):
    """Whether a c x h x w input reaches the first Linear layer with `features` values."""
    for l in layers:
        t = l["type"]
        if t == "Conv2d":
            (kh, kw), (sh, sw), (ph, pw) = l["kernel"], l["stride"], l["padding"]
            c, h, w = l["out_channels"], (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        elif t in ("MaxPool2d", "AvgPool2d"):
            (kh, kw), (sh, sw), (ph, pw) = l["kernel"], l["stride"], l["padding"]
            h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        elif t == "AdaptiveAvgPool2d":
            h, w = l["output"]
        elif t == "Linear":
            return c * h * w == features
        if h < 1 or w < 1:
            return False
    return False


def describe(model, input_shape=None):
    """(description dict, parameter names in parameters() order). input_shape is
    (C, H, W); without it, the smallest square side whose shapes reach the first Linear
    layer's in_features (pooling's floor can make larger sides fit too; the features
    the attack recovers do not depend on it, pass input_shape to record the true one)."""
    layers = [l for l in (_layer(n, m) for n, m in _chain(model)) if l is not None]
    if not layers:
        raise GradleakError("invalid argument: the model has no layers")
    if input_shape is None:
        conv = next((l for l in layers if l["type"] == "Conv2d"), None)
        lin = next((l for l in layers if l["type"] == "Linear"), None)
        if conv is None or lin is None:
            raise GradleakError("invalid argument: give input_shape=(C, H, W) (no Conv2d before a Linear layer to infer it from)")
        c = conv["in_channels"]
        sides = [s for s in range(1, 1025) if _shapes_fit(layers, c, s, s, lin["in_features"])]
        if not sides:
            raise GradleakError(
                "invalid argument: give input_shape=(C, H, W) (no square input up to 1024 reaches the first "
                f"Linear layer's {lin['in_features']} features)"
            )
        input_shape = (c, sides[0], sides[0])
    desc = {"format": FORMAT, "input": [int(v) for v in input_shape], "layers": layers}
    return desc, [n for n, _ in model.named_parameters()]


def state_tensors(model):
    """The state_dict's float tensors as numpy arrays (BatchNorm running statistics included)."""
    return {k: to_numpy(v, k) for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def export_model(model, directory, input_shape=None):
    """Write model.json (the description) and model.safetensors (the state_dict) into
    `directory`, for `gradleak attack --model DIRECTORY`. Returns the description."""
    from safetensors.numpy import save_file

    desc, _ = describe(model, input_shape)
    os.makedirs(directory, exist_ok=True)
    tensors = state_tensors(model)
    tmp = os.path.join(directory, f".model.safetensors.tmp-{os.getpid()}")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    tmp = os.path.join(directory, f".model.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(desc, f, indent=1)
    os.replace(tmp, os.path.join(directory, "model.json"))
    return desc


def gradient_tensors(gradients, names):
    """{name: array} from a list in parameters() order or a {name: tensor} dict."""
    if isinstance(gradients, dict):
        out = {}
        for k, v in gradients.items():
            for prefix in ("_module.", "module."):
                if k not in names and k.startswith(prefix):
                    k = k[len(prefix):]
            out[k] = to_numpy(v, f"gradient of {k}")
        return out
    if isinstance(gradients, (list, tuple)):
        if len(gradients) != len(names):
            raise GradleakError(
                f"shape mismatch: the gradient list has {len(gradients)} entries, the model has {len(names)} parameters"
            )
        return {n: to_numpy(g, f"gradient of {n}") for n, g in zip(names, gradients)}
    raise GradleakError(f"invalid argument: gradients is a {type(gradients).__name__}; expected a list, a tuple or a dict of tensors")


def attack_cnn(model, gradients, loss=None, method="auto", batch=None, seed=1, input_shape=None, precision=None):
    """(native result dict) for a CNN: the features entering its fully connected head."""
    from . import _native

    desc, names = describe(model, input_shape)
    return _native.attack_cnn(
        json.dumps(desc),
        state_tensors(model),
        gradient_tensors(gradients, names),
        loss=loss,
        method=str(method),
        batch=None if batch is None else int(batch),
        seed=int(seed),
        precision=precision,
    )
