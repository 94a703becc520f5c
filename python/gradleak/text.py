"""Text: recover a client's sentences from one transformer gradient.

    import gradleak.text as gt
    rec = gt.attack(model, grads, tokenizer=None)   # grads: [p.grad ...] or {name: grad}
    rec.ids, rec.texts, rec.exact, rec.certified, rec.report
    gt.evaluate(true_ids, rec)

    python -m gradleak.text simulate --arch gpt2 --head cls --batch 8 --seq-len 32 --seed 1

The attack itself is Rust (`gradleak::text::attack_json`, through the extension's
`text_attack`, or the `gradleak text attack` command line when the extension lacks
it). This module saves the model (save_pretrained) and the gradient (safetensors) to a
temporary folder, runs it, and then checks the answer in torch: it recomputes the
gradient of the recovered batch (labels solved from the classification head's
gradient; for an LM head the ids define the loss) and compares it with the gradient
received. `certified` is true only when the Rust certificate holds and that relative
difference is at the dtype's rounding floor (see `recompute_tolerance`).

Supported: GPT2ForSequenceClassification, GPT2LMHeadModel, BertForSequenceClassification,
LlamaForCausalLM, LlamaForSequenceClassification (Hugging Face transformers).
The client's loss is the model's own (`model(input_ids, attention_mask, labels).loss`:
mean cross entropy), right padding with config.pad_token_id, dropout off.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _textgen
from ._native import GradleakError

SUPPORTED = {
    "GPT2ForSequenceClassification": ("gpt2", "cls"),
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "BertForSequenceClassification": ("bert", "cls"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "cls"),
}

# The recompute check: relative Frobenius difference allowed, in units of the dtype's
# unit roundoff u (2^-24 float32, 2^-53 float64). Measured (docs/TEXT_README_DRAFT.md):
# a correct batch recomputed in another order / padding lands at 1-20 u; one wrong token
# at 1e3 u and above, so 256 u separates them.
TOLERANCE_ULPS = 256


class TextReconstruction:
    """What the attack recovered: ids (list of lists of int, in any order), texts (str
    or None each), exact (bool each, the Rust attack's per-sequence verdict), labels
    (solved from the head's gradient, cls only, else None), certified (the Rust
    certificate and the recompute check), recompute (dict: rel_diff, tolerance, ok),
    report (the Rust JSON report as a dict)."""

    __slots__ = ("ids", "texts", "exact", "labels", "certified", "recompute", "report")

    def __init__(self, ids, texts, exact, labels, certified, recompute, report):
        self.ids = ids
        self.texts = texts
        self.exact = exact
        self.labels = labels
        self.certified = certified
        self.recompute = recompute
        self.report = report

    def __len__(self):
        return len(self.ids)

    def __repr__(self):
        rd = self.recompute.get("rel_diff") if self.recompute else None
        return (f"TextReconstruction(sequences={len(self)}, exact={sum(self.exact)}, "
                f"certified={self.certified}, recompute_rel_diff={rd})")


# --------------------------------------------------------------------------- input


def _kind(model):
    name = type(model).__name__
    if name not in SUPPORTED:
        raise GradleakError(
            f"text attack: unsupported model {name} (supported: {', '.join(sorted(SUPPORTED))})")
    return SUPPORTED[name]


def _named_grads(model, grads, params=None):
    """{name: tensor} in named_parameters order (or of `params`), validated against the model."""
    import torch

    params = list(model.named_parameters()) if params is None else params
    if isinstance(grads, dict):
        names = {n for n, _ in params}
        extra = [k for k in grads if k not in names]
        if extra:
            raise GradleakError(f"gradient: names not in the model: {', '.join(extra[:3])}")
        out = {}
        for n, p in params:
            if n not in grads or grads[n] is None:
                raise GradleakError(f"gradient: no tensor for parameter {n}")
            out[n] = grads[n]
    elif isinstance(grads, (list, tuple)):
        if len(grads) != len(params):
            raise GradleakError(f"gradient: {len(grads)} tensors for {len(params)} parameters")
        out = {}
        for (n, p), g in zip(params, grads):
            if g is None:
                raise GradleakError(f"gradient: no tensor for parameter {n}")
            out[n] = g
    else:
        raise GradleakError("gradient: expected a list/tuple in named_parameters order or a {name: tensor} dict")
    for (n, p) in params:
        g = torch.as_tensor(out[n])
        if tuple(g.shape) != tuple(p.shape):
            raise GradleakError(f"gradient {n}: shape {tuple(g.shape)}, parameter {tuple(p.shape)}")
        if not torch.isfinite(g).all():
            raise GradleakError(f"gradient {n}: NaN or infinite values")
        out[n] = g.detach().to("cpu").contiguous()
    return out


def _tokenizer_file(tokenizer, folder):
    """A tokenizer.json path for the Rust side, or None (GPT-2's BPE built in)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        if not p.is_file():
            raise GradleakError(f"tokenizer: no file {p}")
        return p
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if not hasattr(backend, "save"):
        raise GradleakError("tokenizer: expected a tokenizer.json path, a fast tokenizer or a tokenizers.Tokenizer")
    p = Path(folder) / "tokenizer.json"
    backend.save(str(p))
    return p


def _decoder(tokenizer):
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tokenizer))
        return lambda ids: t.decode(ids)
    return lambda ids: tokenizer.decode(ids)


# --------------------------------------------------------------------------- running Rust


def _binary():
    cands = [os.environ.get("GRADLEAK_BIN"), shutil.which("gradleak")]
    repo = Path(__file__).resolve().parents[2]
    cands += [repo / "target" / "release" / "gradleak", repo / "target" / "debug" / "gradleak"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def run_rust(model_dir, gradient, tokenizer=None):
    """The Rust attack on files: the report as a dict (the extension's text_attack, else
    the command line `gradleak text attack`, found via GRADLEAK_BIN, PATH or target/)."""
    from . import _native

    fn = getattr(_native, "text_attack", None)
    if fn is not None:
        return json.loads(fn(str(model_dir), str(gradient), None if tokenizer is None else str(tokenizer)))
    exe = _binary()
    if exe is None:
        raise GradleakError("text attack: the extension has no text_attack and no gradleak binary was found (set GRADLEAK_BIN)")
    with tempfile.TemporaryDirectory(prefix="gradleak-text-") as d:
        out, rep = Path(d) / "out.jsonl", Path(d) / "report.json"
        cmd = [exe, "text", "attack", "--model", str(model_dir), "--gradient", str(gradient),
               "--out", str(out), "--report", str(rep)]
        if tokenizer is not None:
            cmd += ["--tokenizer", str(tokenizer)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            raise GradleakError(msg)
        report = json.loads(rep.read_text())
        if "sequences" not in report and out.is_file():
            report["sequences"] = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
        return report


# --------------------------------------------------------------------------- recompute check


def unit_roundoff(dtype) -> float:
    import torch

    return {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}.get(dtype, 2.0 ** -24)


def recompute_tolerance(dtype) -> float:
    """The relative Frobenius difference the recompute check accepts: TOLERANCE_ULPS
    unit roundoffs of the gradient's dtype."""
    return TOLERANCE_ULPS * unit_roundoff(dtype)


def _head(model):
    """(head module, bias or None) of a sequence-classification model."""
    for name in ("score", "classifier"):
        if hasattr(model, name):
            m = getattr(model, name)
            return name, m
    raise GradleakError(f"{type(model).__name__}: no classification head")


def solve_labels(model, ids, grads):
    """Labels from the classification head's gradient, for a recovered batch. The head
    is linear: dL/dW = (P - Y)^T [H, 1] / B with H the pooled features (B x d), P the
    softmax (B x C), so (P - Y)^T = B [G_W, g_b] [H, 1]^+ (least squares, exact when
    [H, 1] has rank B); each sequence's label is the argmax of the solved Y row.
    Returns (labels, residual of the fit relative to |G|)."""
    import torch

    name, head = _head(model)
    pad = model.config.pad_token_id
    x, m = _textgen.pad_batch(ids, pad)
    dev = next(model.parameters()).device
    x, m = x.to(dev), m.to(dev)
    feats = {}

    def hook(mod, inp, out):
        feats["h"] = inp[0].detach()
        feats["z"] = out.detach()

    hd = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=m).logits
    finally:
        hd.remove()
    h = feats["h"].cpu()
    if h.dim() == 3:  # decoder: the head sees every position, the last non-pad one is pooled
        last = m.cpu().sum(1) - 1
        h = h[torch.arange(h.shape[0]), last]
    B = h.shape[0]
    p = torch.softmax(logits.cpu().to(torch.float64), -1)
    gw = grads[f"{name}.weight"].to(torch.float64)
    H = h.to(torch.float64)
    G = gw
    if f"{name}.bias" in grads and getattr(head, "bias", None) is not None:
        H = torch.cat([H, torch.ones(B, 1, dtype=torch.float64)], 1)
        G = torch.cat([gw, grads[f"{name}.bias"].to(torch.float64)[:, None]], 1)
    # (P - Y)^T H = B G  ->  H^T (P - Y) = B G^T
    sol = torch.linalg.lstsq(H.T, B * G.T).solution  # (B, C)
    y = p - sol
    fit = (H.T @ sol - B * G.T).norm() / max((B * G).norm().item(), 1e-300)
    return y.argmax(-1).tolist(), float(fit)


def gradient_of(model, ids, labels=None, chunk=None):
    """{name: grad} of the model's loss on ids (right padded), without touching .grad;
    in eval mode (dropout off), the mode restored after. chunk: sequences per backward
    (the gradient summed over chunks, each loss weighted by its share of the batch)."""
    import torch

    was = model.training
    model.eval()
    try:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        acc = None
        for loss in _textgen._chunk_losses(model, ids, labels, chunk):
            gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(params, gs)]
            acc = gs if acc is None else [a.add_(g) for a, g in zip(acc, gs)]
    finally:
        model.train(was)
    return {n: g for (n, _), g in zip(params, acc)}


def _auto_chunk(model, ids):
    """Sequences per backward in the recompute: activations of about 2 GB (some 25
    floats per token, layer and width unit), so GPT-2 small B = 64 is one backward and
    GPT-2 large dims go in chunks of 13."""
    d = model.config.hidden_size
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    L = max(len(s) for s in ids)
    per_seq = L * d * layers
    return max(1, min(len(ids), int(2e7 // max(per_seq, 1))))


def rel_diff(a, b) -> float:
    """|a - b|_F / |b|_F over all tensors of two {name: grad} dicts, in float64."""
    import torch

    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    num = sum(float(((f(a[n]) - f(b[n])) ** 2).sum()) for n in b)
    den = sum(float((f(b[n]) ** 2).sum()) for n in b)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def recompute_check(model, ids, grads, head=None, chunk="auto"):
    """Recompute the recovered batch's gradient and compare with the one received.
    Returns {"rel_diff", "tolerance", "ok", "labels", "label_fit"}."""
    if head is None:
        head = _kind(model)[1]
    if not ids or any(len(s) == 0 for s in ids):
        return {"rel_diff": None, "tolerance": None, "ok": False, "labels": None, "label_fit": None,
                "note": "no recovered sequences" if not ids else "an empty recovered sequence"}
    pad = model.config.pad_token_id
    vocab = model.config.vocab_size
    if any(t < 0 or t >= vocab or t == pad for s in ids for t in s):
        return {"rel_diff": None, "tolerance": None, "ok": False, "labels": None, "label_fit": None,
                "note": "a recovered id outside the vocabulary or equal to the pad id"}
    labels, fit = (None, None)
    if head == "cls":
        labels, fit = solve_labels(model, ids, grads)
    if chunk == "auto":
        chunk = _auto_chunk(model, ids)
    g = gradient_of(model, ids, labels, chunk)
    dtype = next(model.parameters()).dtype
    r = rel_diff(g, grads)
    tol = recompute_tolerance(dtype)
    return {"rel_diff": r, "tolerance": tol, "ok": bool(r <= tol), "labels": labels, "label_fit": fit,
            "ulps": r / unit_roundoff(dtype)}


def _param_name(model, param):
    for n, p in model.named_parameters():
        if p is param:
            return n
    return None


def complete_last_tokens(model, prefixes, grads):
    """LM head: each sequence's last token, from the output layer's gradient.

    The last position of a causal LM sequence predicts nothing, so no block sees its
    input; the token itself is the target of the position before, t_b = len(P_b) - 1.
    The loss is (1/N) sum_t CE(z_t, y_t), N = sum_b len(P_b) predicted tokens, and
    dCE/dz = p - e_y. Everything but the B unknown targets is known from the prefixes:
    g_known = grad of (1/N)[sum of the known CE terms + sum_b p_b . z_{t_b}] (p_b the
    softmax at t_b, held constant), so the received gradient minus g_known is
    -(1/N) sum_b d z_{t_b}[y_b] / d theta. In the output weight W (V x d) that is
    -(1/N) e_{y_b} h_b^T, h_b the final hidden state at t_b: with R = G_W - g_known_W,
    H^T C^T = -N R^T (least squares, H = [h_b] of rank B) gives C (V x B) whose column b
    is e_{y_b} (for an untied head exactly, up to rounding; a tied embedding adds the
    input-path terms at the rows of input tokens, small against |h|). y_b = argmax_v C[v, b].
    The recompute check then certifies or rejects the completed batch.
    Returns (completed ids, {"coef": chosen coefficient per sequence, "runner_up": ...})."""
    import torch

    pad = model.config.pad_token_id
    x, m = _textgen.pad_batch(prefixes, pad)
    dev = next(model.parameters()).device
    x, m = x.to(dev), m.to(dev)
    out_emb = model.get_output_embeddings()
    wname = _param_name(model, out_emb.weight)
    feats = {}
    hd = out_emb.register_forward_hook(lambda mod, inp, out: feats.__setitem__("h", inp[0]))
    was = model.training
    model.eval()
    try:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        logits = model(input_ids=x, attention_mask=m).logits
        N = sum(len(s) for s in prefixes)
        terms = []
        for b, s in enumerate(prefixes):
            t = len(s) - 1
            if t > 0:
                terms.append(torch.nn.functional.cross_entropy(
                    logits[b, :t], torch.tensor(s[1:], dtype=torch.long, device=dev), reduction="sum"))
            z = logits[b, t]
            terms.append((torch.softmax(z, -1).detach() * z).sum())
        known = torch.stack(terms).sum() / N
        gw = torch.autograd.grad(known, [dict(params)[wname]])[0]
    finally:
        hd.remove()
        model.train(was)
    last = torch.tensor([len(s) - 1 for s in prefixes])
    H = feats["h"].detach().cpu()[torch.arange(len(prefixes)), last].to(torch.float64)  # (B, d)
    R = grads[wname].to(torch.float64) - gw.detach().cpu().to(torch.float64)  # (V, d)
    C = torch.linalg.lstsq(H.T, -N * R.T).solution  # (B, V)
    top = torch.topk(C, 2, dim=1)
    ys = top.indices[:, 0].tolist()
    return ([list(s) + [y] for s, y in zip(prefixes, ys)],
            {"coef": top.values[:, 0].tolist(), "runner_up": top.values[:, 1].tolist(), "weight": wname})


def _last_token_missing(report):
    if "last_token_missing" in report:
        return bool(report["last_token_missing"])
    return any("without its last token" in n for n in report.get("notes", []))


# --------------------------------------------------------------------------- attack


def attack(model, grads, tokenizer=None, *, check=True):
    """Recover the client's sequences from one gradient of a transformers model.

    model: one of SUPPORTED, with the weights the gradient was taken at; grads: a list
    or tuple in named_parameters() order, or a {name: tensor} dict; tokenizer: None
    (GPT-2's BPE, for GPT-2 vocabularies), a tokenizer.json path, or a fast tokenizer
    (saved as tokenizer.json for the Rust side). check: run the torch recompute check.
    Unsupported models and bad gradients raise GradleakError."""
    if _is_lora(model):
        return _lora_attack(model, grads, tokenizer, check)
    arch, head = _kind(model)
    g = _named_grads(model, grads)
    report, t_save = _run_saved(model.save_pretrained, g, tokenizer)
    seqs = report.get("sequences", [])
    ids = [list(map(int, s["ids"])) for s in seqs]
    texts = [s.get("text") for s in seqs]
    dec = _decoder(tokenizer)
    if dec is not None:
        texts = [t if t is not None else dec(i) for t, i in zip(texts, ids)]
    exact = [bool(s.get("exact", False)) for s in seqs]
    rust_cert = bool(report.get("certified", False))
    py = {"save_seconds": t_save, "rust_certified": rust_cert}
    # LM head: the Rust attack completes the last tokens itself (the final norm's
    # gradient); where it returns each sequence without its last token (a completion
    # that did not pass), complete it from the output layer's gradient here, then let
    # the recompute check decide. The Rust layer evidence (every layer's span
    # explained) stands in for its certificate then.
    completed = False
    layers_ok = bool(report.get("layers")) and all(l.get("passed", False) for l in report["layers"])
    # only on prefixes the Rust evidence accounts for (with spurious prefixes the
    # least squares over [h_b] is meaningless), and B <= d for [h_b] to have rank B
    if (head == "lm" and ids and _last_token_missing(report) and layers_ok
            and len(ids) <= model.config.hidden_size):
        t1 = time.time()
        ids, diag = complete_last_tokens(model, ids, g)
        completed = True
        py["last_tokens"] = dict(diag, seconds=time.time() - t1)
        if dec is None and arch == "gpt2" and model.config.vocab_size == _textgen.GPT2_VOCAB:
            try:
                dec = _decoder(_textgen.gpt2_tokenizer())
            except (RuntimeError, ImportError):
                dec = None
        texts = [dec(i) if dec is not None else None for i in ids]
    rc = None
    if check:
        t1 = time.time()
        rc = recompute_check(model, ids, g, head)
        rc["seconds"] = time.time() - t1
    if completed:
        certified = layers_ok and rc is not None and rc["ok"]
        if certified:
            exact = [True] * len(ids)
    else:
        certified = rust_cert and (rc is None or rc["ok"])
    report.setdefault("python", {})
    py["recompute"] = rc
    report["python"].update(py)
    labels = rc["labels"] if rc else None
    return TextReconstruction(ids, texts, exact, labels, certified, rc or {}, report)


def _run_saved(save, g, tokenizer):
    """Write the model (save(folder)), the gradient g and the tokenizer to a temporary
    folder and run the Rust attack on them: (report, seconds spent writing)."""
    from safetensors.torch import save_file

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gradleak-text-") as d:
        mdir = Path(d) / "model"
        save(mdir)
        gfile = Path(d) / "gradient.safetensors"
        save_file(g, str(gfile))
        tfile = _tokenizer_file(tokenizer, d)
        t_save = time.time() - t0
        return run_rust(mdir, gfile, tfile), t_save


def _is_lora(model):
    """A peft model with LoRA adapters (its trainable parameters are the adapters')."""
    return hasattr(model, "get_base_model") and any(
        ".lora_A." in n or ".lora_B." in n for n, _ in model.named_parameters())


def _save_lora(model, mdir):
    """The base model as save_pretrained would write it (config.json, model.safetensors
    under transformers' names) and the adapters' lora_A weights in
    adapter_model.safetensors, for the Rust LoRA route."""
    from safetensors.torch import save_file

    base = model.get_base_model()
    sd = {}
    for n, t in base.state_dict().items():
        if ".lora_" in n or ".original_module." in n:
            continue
        n = n.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        sd[n] = t.detach().to("cpu").clone().contiguous()
    mdir.mkdir(parents=True, exist_ok=True)
    base.config.save_pretrained(mdir)
    save_file(sd, str(mdir / "model.safetensors"))
    ad = {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if ".lora_A." in n}
    save_file(ad, str(mdir / "adapter_model.safetensors"))


def _lora_attack(model, grads, tokenizer, check):
    """LoRA: the Rust route reads block 0's c_attn adapter (docs/DESIGN.md "Text:
    LoRA"); a single recovered sequence of a classifier is certified by recomputing the
    adapters' gradient under each label."""
    arch, head = _kind(model.get_base_model())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g = _named_grads(model, grads, params)
    report, t_save = _run_saved(lambda mdir: _save_lora(model, mdir), g, tokenizer)
    seqs = report.get("sequences", [])
    ids = [list(map(int, s["ids"])) for s in seqs]
    dec = _decoder(tokenizer)
    texts = [s.get("text") if s.get("text") is not None or dec is None else dec(i) for s, i in zip(seqs, ids)]
    rust_cert = bool(report.get("certified", False))
    rc = None
    if check and ids and head == "cls":
        t1 = time.time()
        dtype = next(model.parameters()).dtype
        tol = recompute_tolerance(dtype)
        best = None
        for lab in range(model.config.num_labels):
            r = rel_diff(gradient_of(model, ids, [lab] * len(ids)), g)
            if best is None or r < best[0]:
                best = (r, lab)
        rc = {"rel_diff": best[0], "tolerance": tol, "ok": bool(best[0] <= tol),
              "labels": [best[1]] * len(ids), "seconds": time.time() - t1}
    certified = rust_cert and (rc is None or rc["ok"])
    exact = [certified] * len(ids)
    report.setdefault("python", {}).update({"save_seconds": t_save, "rust_certified": rust_cert, "recompute": rc})
    return TextReconstruction(ids, texts, exact, rc["labels"] if rc else None, certified, rc or {}, report)


# --------------------------------------------------------------------------- metrics


def _ngrams(s, n):
    out = {}
    for i in range(len(s) - n + 1):
        k = tuple(s[i: i + n])
        out[k] = out.get(k, 0) + 1
    return out


def rouge_n(ref, hyp, n):
    """ROUGE-n F1 on token ids (clipped n-gram counts)."""
    r, h = _ngrams(ref, n), _ngrams(hyp, n)
    if not r or not h:
        return 1.0 if not r and not h and ref == hyp else 0.0
    overlap = sum(min(c, h.get(k, 0)) for k, c in r.items())
    if overlap == 0:
        return 0.0
    p, q = overlap / sum(h.values()), overlap / sum(r.values())
    return 2 * p * q / (p + q)


def _hungarian(cost):
    """Minimum-cost assignment of rows to columns (rows <= columns); returns col per row.
    The O(n^2 m) potentials method (used when scipy is absent)."""
    n, m = len(cost), len(cost[0])
    INF = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [INF] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = [-1] * n
    for j in range(1, m + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col


def match(truth_ids, rec_ids):
    """One-to-one matching of true to recovered sequences maximising ROUGE-1 + ROUGE-2
    (+ exact equality); returns the recovered index per true sequence (-1: none)."""
    if not rec_ids or not truth_ids:
        return [-1] * len(truth_ids)
    score = [[rouge_n(t, r, 1) + rouge_n(t, r, 2) + (t == r) for r in rec_ids] for t in truth_ids]
    n, m = len(truth_ids), len(rec_ids)
    try:
        from scipy.optimize import linear_sum_assignment
        import numpy as np

        rows, cols = linear_sum_assignment(-np.asarray(score))
        out = [-1] * n
        for r, c in zip(rows, cols):
            out[r] = int(c)
        return out
    except ImportError:
        if n <= m:
            return _hungarian([[-x for x in row] for row in score])
        colT = _hungarian([[-score[i][j] for i in range(n)] for j in range(m)])
        out = [-1] * n
        for j, i in enumerate(colT):
            out[i] = j
        return out


def evaluate(truth_ids, result):
    """Metrics as the field reports them, after one-to-one (Hungarian) matching of true
    and recovered sequences: exact (sequences recovered token for token), token_accuracy
    (true tokens equal at the same position in the matched sequence), rouge1, rouge2 (F1
    on token ids, mean over true sequences; unmatched count 0), plus counts."""
    rec = result.ids if hasattr(result, "ids") else list(result)
    truth = [list(map(int, t)) for t in truth_ids]
    rec = [list(map(int, r)) for r in rec]
    mt = match(truth, rec)
    exact = acc = r1 = r2 = 0.0
    ntok = sum(len(t) for t in truth)
    for t, j in zip(truth, mt):
        if j < 0:
            continue
        r = rec[j]
        exact += t == r
        acc += sum(a == b for a, b in zip(t, r))
        r1 += rouge_n(t, r, 1)
        r2 += rouge_n(t, r, 2)
    n = max(len(truth), 1)
    out = {"sequences": len(truth), "recovered": len(rec), "exact": int(exact),
           "token_accuracy": acc / max(ntok, 1), "rouge1": r1 / n, "rouge2": r2 / n}
    if hasattr(result, "certified"):
        out["certified"] = bool(result.certified)
        out["marked_exact"] = int(sum(result.exact))
        out["marked_exact_wrong"] = int(sum(1 for j, e in enumerate(result.exact)
                                            if e and rec[j] not in truth))
    return out


# --------------------------------------------------------------------------- simulate


def simulate(arch="gpt2", head="cls", batch=8, seq_len=32, seed=1, vocab=_textgen.GPT2_VOCAB, dtype="float32",
             trained=0, texts=None, preset=None, log=print, **dims):
    """A model from a config with a seed (Hugging Face's random init), a client's batch
    of fortunes, its gradient, the attack, the metrics. Returns (metrics, result, truth)."""
    t0 = time.time()
    txt = _textgen.read_texts(texts) if texts else None
    model, tok, ids, labels, grads, truth = _textgen.make_case(
        arch=arch, head=head, batch=batch, seq_len=seq_len, seed=seed, vocab=vocab, dtype=dtype,
        trained=trained, texts=txt, preset=preset, log=log, **dims)
    t_client = time.time() - t0
    t1 = time.time()
    tokarg = tok if (arch != "gpt2" or vocab < _textgen.GPT2_VOCAB) else None
    res = attack(model, grads, tokenizer=tokarg)
    t_attack = time.time() - t1
    m = evaluate(ids, res)
    if labels is not None and res.labels is not None:
        mt = match(ids, res.ids)
        m["labels_right"] = sum(1 for b, j in enumerate(mt) if j >= 0 and res.labels[j] == labels[b])
    m.update({"client_seconds": round(t_client, 2), "attack_seconds": round(t_attack, 2),
              "recompute_rel_diff": res.recompute.get("rel_diff"),
              "recompute_tolerance": res.recompute.get("tolerance"),
              "distinct_tokens": truth["distinct_tokens"],
              "distinct_token_positions": truth["distinct_token_positions"],
              "d": model.config.hidden_size})
    return m, res, truth


def _main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gradleak.text")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="model from a config + client gradient + attack + metrics")
    s.add_argument("--arch", choices=_textgen.ARCHS, default="gpt2")
    s.add_argument("--head", choices=_textgen.HEADS, default="cls")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=32)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--vocab", type=int, default=_textgen.GPT2_VOCAB)
    s.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    s.add_argument("--trained", type=int, default=0, metavar="STEPS")
    s.add_argument("--preset", choices=sorted(_textgen.DIMS))
    s.add_argument("--texts", help="one text a line (default ../shared/data/text/fortunes.txt)")
    for k in ("d", "layers", "heads", "positions", "ffn"):
        s.add_argument(f"--{k}", type=int)
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    a = ap.parse_args(argv)
    dims = {k: getattr(a, k) for k in ("d", "layers", "heads", "positions", "ffn") if getattr(a, k) is not None}
    try:
        m, res, truth = simulate(a.arch, a.head, a.batch, a.seq_len, a.seed, a.vocab, a.dtype, a.trained,
                                 a.texts, a.preset, log=lambda *x: print(*x, file=sys.stderr), **dims)
    except (GradleakError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:>26}: {v}")
        print(f"{'certified':>26}: {res.certified}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
