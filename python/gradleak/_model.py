"""Reading a model, its gradient and its loss into the arrays the library takes.

torch is imported only when a torch object is passed in; dicts of numpy arrays
work without it.
"""

import re

import numpy as np

from ._native import GradleakError

# torch module class -> the library's activation name
ACTIVATIONS = {
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "GELU": "gelu",
    "SiLU": "silu",
    "Softplus": "softplus",
    "ELU": "elu",
    "Identity": "identity",
}
NAMES = sorted(set(ACTIVATIONS.values()))
LOSSES = {"CrossEntropyLoss": "ce", "BCEWithLogitsLoss": "bce", "MSELoss": "mse"}

# what the library's activations fix (src/model/activation.rs)
LEAKY_SLOPE = 0.01
ELU_ALPHA = 1.0
SOFTPLUS_BETA = 1.0


def _is_torch(obj):
    return type(obj).__module__.split(".")[0] == "torch"


def _is_module(obj):
    """A torch nn.Module, including user subclasses defined outside torch."""
    if _is_torch(obj):
        return True
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def to_numpy(t, what):
    """A float32/float64 numpy array from a tensor or array (float32 stays float32)."""
    if t is None:
        raise GradleakError(f"invalid argument: {what} is None (was backward() called?)")
    if _is_torch(t):
        t = t.detach()
        if t.dtype.is_floating_point and t.dtype not in (_torch().float32, _torch().float64):
            raise GradleakError(f"invalid argument: {what} has dtype {t.dtype}; gradleak takes float32 or float64")
        a = t.cpu().numpy()
    else:
        a = np.asarray(t)
    if a.dtype not in (np.float32, np.float64):
        raise GradleakError(f"invalid argument: {what} has dtype {a.dtype}; gradleak takes float32 or float64")
    return np.ascontiguousarray(a)


def _torch():
    import torch

    return torch


def _leaves(module):
    """The leaf modules of a Sequential, nested Sequentials flattened."""
    nn = _torch().nn
    for m in module.children():
        if isinstance(m, nn.Sequential):
            yield from _leaves(m)
        else:
            yield m


def _activation_of(m):
    kind = type(m).__name__
    name = ACTIVATIONS.get(kind)
    if name is None:
        return None
    if kind == "LeakyReLU" and float(m.negative_slope) != LEAKY_SLOPE:
        raise GradleakError(
            f"invalid argument: LeakyReLU(negative_slope={m.negative_slope}): gradleak's leaky_relu has slope {LEAKY_SLOPE} only"
        )
    if kind == "ELU" and float(m.alpha) != ELU_ALPHA:
        raise GradleakError(f"invalid argument: ELU(alpha={m.alpha}): gradleak's elu has alpha {ELU_ALPHA} only")
    if kind == "Softplus" and float(m.beta) != SOFTPLUS_BETA:
        raise GradleakError(f"invalid argument: Softplus(beta={m.beta}): gradleak's softplus has beta 1 only")
    if kind == "GELU" and getattr(m, "approximate", "none") != "none":
        raise GradleakError(
            f"invalid argument: GELU(approximate='{m.approximate}'): gradleak's gelu is the exact erf form"
        )
    return name


def _function_module(target, args, kwargs):
    """The activation module a functional call stands for (torch.tanh, F.relu, x.sigmoid(), ...)."""
    nn = _torch().nn
    name = getattr(target, "__name__", str(target))
    simple = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    if name in simple:
        if name == "gelu" and kwargs.get("approximate", "none") != "none":
            return nn.GELU(approximate=kwargs["approximate"])
        return simple[name]()
    if name == "leaky_relu":
        return nn.LeakyReLU(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))
    if name == "elu":
        return nn.ELU(args[1] if len(args) > 1 else kwargs.get("alpha", 1.0))
    if name == "softplus":
        return nn.Softplus(args[1] if len(args) > 1 else kwargs.get("beta", 1.0))
    if name in ("flatten", "view", "reshape"):
        return nn.Flatten()
    return None


def _fx_chain(model, functional, skip_size=False, hints=("", "")):
    """(name, module) in the order a custom nn.Module's forward applies them, traced with
    torch.fx: a submodule call by its name, any other call as `functional(node)` makes
    it (which raises on what it does not know), with None for the name. `skip_size`
    passes over x.size() calls (they feed a view); `hints` end the messages for a
    forward torch.fx cannot trace and for one that is not a chain. Raises unless
    forward is one chain from the input."""
    import torch.fx

    trace_hint, chain_hint = hints
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not a plain chain"
        raise GradleakError(
            f"invalid argument: the model is a {type(model).__name__} whose forward torch.fx cannot trace "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}){trace_hint}"
        ) from None
    mods = dict(gm.named_modules())
    chain, prev = [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise GradleakError("invalid argument: the model's forward takes more than one input")
            prev = node
            continue
        if skip_size and node.op == "call_method" and node.target == "size":
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise GradleakError("invalid argument: the model's forward does not return the end of its chain")
            break
        if node.op == "get_attr" or not node.args or node.args[0] is not prev:
            raise GradleakError(
                f"invalid argument: the model's forward is not a chain of layers (at '{node.name}'){chain_hint}"
            )
        if node.op == "call_module":
            chain.append((node.target, mods[node.target]))
        else:
            chain.append((None, functional(node)))
        prev = node
    return chain


def _activation_call(node):
    """The module of a functional call in an MLP's forward; raises on any other call."""
    m = _function_module(node.target, node.args, node.kwargs)
    if m is None:
        raise GradleakError(
            f"unknown operation '{getattr(node.target, '__name__', node.target)}' in the model's forward "
            "(gradleak takes a chain of Linear layers and activations)"
        )
    return m


def _traced_chain(model):
    """The modules a custom nn.Module's forward applies, in order, traced with torch.fx:
    (name, module) pairs. Raises unless forward is one chain of Linear layers and
    activations from the input."""
    return _fx_chain(
        model,
        _activation_call,
        hints=(
            "; gradleak takes a chain of Linear layers and activations",
            "; gradleak takes Linear layers and activations applied one after another",
        ),
    )


def _torch_layers(model):
    nn = _torch().nn
    if isinstance(model, nn.Sequential):
        named = dict((id(m), n) for n, m in model.named_modules())
        leaves = [(named.get(id(m)), m) for m in _leaves(model)]
    else:
        leaves = _traced_chain(model)
    linears, gaps, cur, lin_names = [], [], [], []
    for mname, m in leaves:
        if isinstance(m, nn.Linear):
            lin_names.append(mname)
        if isinstance(m, nn.Linear):
            if linears:
                gaps.append(cur)
            elif cur and not all(isinstance(c, nn.Flatten) for c in cur):
                raise GradleakError(f"invalid argument: {type(cur[0]).__name__} before the first Linear layer")
            linears.append(m)
            cur = []
        elif isinstance(m, nn.Flatten) and not linears:
            cur.append(m)
        elif _activation_of(m) is not None:
            cur.append(m)
        else:
            raise GradleakError(
                f"unknown module '{type(m).__name__}' (expected one of: Linear Flatten "
                + " ".join(ACTIVATIONS)
                + ")"
            )
    if not linears:
        raise GradleakError("shape mismatch: a model needs at least one Linear layer")
    if cur:
        raise GradleakError(
            f"invalid argument: {type(cur[0]).__name__} after the last Linear layer; gradleak attacks "
            "the logits (put the output nonlinearity into the loss, e.g. BCEWithLogitsLoss)"
        )
    acts = set()
    for g in gaps:
        if len(g) > 1:
            raise GradleakError(
                "invalid argument: two activations between Linear layers ("
                + ", ".join(type(m).__name__ for m in g)
                + ")"
            )
        acts.add(_activation_of(g[0]) if g else "identity")
    if len(acts) > 1:
        raise GradleakError(
            "invalid argument: mixed activations (" + " ".join(sorted(acts)) + "); gradleak needs the same one after every hidden layer"
        )
    activation = acts.pop() if acts else "identity"
    layers, names = [], []
    for i, (lin, lname) in enumerate(zip(linears, lin_names)):
        w = to_numpy(lin.weight, f"weight of Linear layer {i}")
        b = None if lin.bias is None else to_numpy(lin.bias, f"bias of Linear layer {i}")
        layers.append((w, b))
        names.append(f"{lname}.weight")
        if b is not None:
            names.append(f"{lname}.bias")
    # a gradient list comes in parameters() order, which for a custom module is its
    # definition order, not necessarily the order of the chain
    order = [n for n, _ in model.named_parameters()]
    if sorted(order) != sorted(names):
        raise GradleakError(
            "invalid argument: the model has parameters outside its Linear layers ("
            + ", ".join(n for n in order if n not in names)
            + ")"
        )
    return layers, activation, (names, order)


_KEY = re.compile(r"^(?:.*\.)?(\d+)\.(weight|bias)$")


def _dict_layers(model, activation):
    if activation is None:
        raise GradleakError(
            "invalid argument: a model given as a dict of arrays needs activation= (one of: " + " ".join(NAMES) + ")"
        )
    by_index = {}
    for name, arr in model.items():
        m = _KEY.match(name)
        if not m:
            raise GradleakError(f"invalid argument: model entry '{name}': expected names like '0.weight' and '0.bias'")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = (name, arr)
    layers, names = [], []
    for i in sorted(by_index):
        entry = by_index[i]
        if "weight" not in entry:
            raise GradleakError(f"invalid argument: model layer {i} has a bias but no weight")
        wn, w = entry["weight"]
        names.append(wn)
        b = None
        if "bias" in entry:
            bn, b = entry["bias"]
            names.append(bn)
            b = to_numpy(b, bn)
        layers.append((to_numpy(w, wn), b))
    return layers, activation, names


def read_model(model, activation=None):
    """(layers [(W, b or None)], activation name, parameter names in parameters() order)."""
    if isinstance(model, dict):
        return _dict_layers(model, activation)
    if _is_module(model):
        layers, act, names = _torch_layers(model)
        if activation is not None and activation != act:
            raise GradleakError(f"invalid argument: activation='{activation}' but the model's modules say '{act}'")
        return layers, act, names
    raise GradleakError(
        f"invalid argument: the model is a {type(model).__name__}; expected a torch nn.Module (a chain of Linear layers and activations) or a dict of arrays"
    )


def _strip(name, known):
    for prefix in ("_module.", "module."):
        if name not in known and name.startswith(prefix):
            name = name[len(prefix):]
    return name


def read_gradient(gradients, layers, names):
    """The gradient shaped like `layers`, from a list/tuple in parameters() order or a {name: tensor} dict.
    `names` are the layers' parameter names in chain order, or (those, parameters() order)."""
    order = names
    if isinstance(names, tuple):
        names, order = names
    if isinstance(gradients, (list, tuple)) and order != names and len(gradients) == len(order):
        gradients = dict(zip(order, gradients))
    shapes = []
    for w, b in layers:
        shapes.append(w.shape)
        if b is not None:
            shapes.append(b.shape)
    if isinstance(gradients, dict):
        known = set(names)
        got = {_strip(k, known): v for k, v in gradients.items()}
        missing = [n for n in names if n not in got]
        extra = [k for k in got if k not in known]
        if missing or extra:
            raise GradleakError(
                "shape mismatch: the gradient dict "
                + (f"lacks {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"has unknown {', '.join(extra)}" if extra else "")
                + f" (the model's parameters: {', '.join(names)})"
            )
        flat = [got[n] for n in names]
    elif isinstance(gradients, (list, tuple)):
        flat = list(gradients)
        if len(flat) != len(shapes):
            raise GradleakError(
                f"shape mismatch: the gradient list has {len(flat)} entries, the model has {len(shapes)} parameters "
                f"({', '.join(names)})"
            )
    else:
        raise GradleakError(
            f"invalid argument: gradients is a {type(gradients).__name__}; expected a list, a tuple or a dict of tensors"
        )
    arrays = [to_numpy(g, f"gradient of {n}") for g, n in zip(flat, names)]
    for a, s, n in zip(arrays, shapes, names):
        if a.shape != s:
            raise GradleakError(f"shape mismatch: the gradient of {n} has shape {tuple(a.shape)}, the parameter {tuple(s)}")
    out, k = [], 0
    for w, b in layers:
        gw = arrays[k]
        k += 1
        gb = None
        if b is not None:
            gb = arrays[k]
            k += 1
        out.append((gw, gb))
    return out


def loss_name(loss):
    """'ce', 'bce', 'mse' or None from a name or a torch loss module."""
    if loss is None:
        return None
    if isinstance(loss, str):
        name = loss.lower()
        if name not in ("ce", "bce", "mse"):
            raise GradleakError(f"unknown loss '{loss}' (expected one of: mse ce bce)")
        return name
    kind = type(loss).__name__
    name = LOSSES.get(kind)
    if name is None or not _is_torch(loss):
        raise GradleakError(f"unknown loss '{kind}' (expected one of: mse ce bce, CrossEntropyLoss BCEWithLogitsLoss MSELoss)")
    if getattr(loss, "reduction", "mean") != "mean":
        raise GradleakError(f"invalid argument: {kind}(reduction='{loss.reduction}'): gradleak assumes reduction='mean'")
    if getattr(loss, "weight", None) is not None or getattr(loss, "pos_weight", None) is not None:
        raise GradleakError(f"invalid argument: {kind} with class weights is not supported")
    if float(getattr(loss, "label_smoothing", 0.0)) != 0.0:
        raise GradleakError(f"invalid argument: {kind} with label_smoothing is not supported")
    return name


def prior_spec(prior):
    if prior is None or isinstance(prior, str):
        return prior
    if isinstance(prior, dict):
        unknown = set(prior) - {"mean", "std", "min", "max"}
        if unknown:
            raise GradleakError(f"unknown prior key '{sorted(unknown)[0]}' (expected one of: mean std min max)")
        return ",".join(f"{k}={float(v)!r}" for k, v in prior.items())
    raise GradleakError("invalid argument: prior is a dict with mean, std, min, max (or 'mean=..,std=..')")
