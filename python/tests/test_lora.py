"""LoRA fine-tuning (docs/DESIGN.md "Text: LoRA"): only the adapters have gradients.
Block 0's lora_B gradient spans the inputs seen through lora_A (R^r): a tiny GPT-2
(d = 64, vocab 4096, fortunes) with peft's LoRA on c_attn is read exactly when its
distinct (token, position) inputs are fewer than r, and nothing is claimed at r or more."""
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from gradleak import text as gt  # noqa: E402
from gradleak import _textgen as tg  # noqa: E402

from test_text import needs_rust  # noqa: E402


def lora_client(r, batch, seq_len, seed=1):
    """A classifier with LoRA (rank r) on every c_attn, a batch of fortunes, its gradient
    (the adapters' and the classification head's: peft trains `score` too)."""
    tok = tg.gpt2_tokenizer(4096)
    cfg = tg.make_config("gpt2", "cls", vocab=4096, preset="tiny", layers=3)
    torch.manual_seed(seed)
    base = tg.model_class("gpt2", "cls")(cfg).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
        task_type="SEQ_CLS"))
    ids, _ = tg.pick_batch(tok, tg.read_texts(), batch, seq_len, seed)
    labels = [(b + seed) % 2 for b in range(batch)]
    return model, gt.gradient_of(model, ids, labels), ids, labels, tok


@needs_rust
def test_one_sequence_under_the_rank_is_exact_and_certified():
    model, grads, ids, labels, tok = lora_client(r=32, batch=1, seq_len=12)
    assert all(".lora_" in n or "score" in n for n in grads)
    rec = gt.attack(model, grads, tokenizer=tok)
    assert rec.ids == ids and rec.certified and rec.exact == [True], rec.report
    assert rec.labels == labels and rec.recompute["ok"]
    (layer,) = rec.report["layers"]
    assert layer["rank"] == len(set(enumerate(ids[0]))) < 32


@needs_rust
def test_at_the_rank_nothing_is_claimed():
    model, grads, ids, _, tok = lora_client(r=8, batch=1, seq_len=12)
    rec = gt.attack(model, grads, tokenizer=tok)
    assert rec.ids == [] and not rec.certified, rec.report
    assert any("full rank 8" in n for n in rec.report["notes"]), rec.report["notes"]


@needs_rust
def test_two_sequences_give_their_inputs_not_an_order():
    model, grads, ids, _, tok = lora_client(r=48, batch=2, seq_len=10)
    rec = gt.attack(model, grads, tokenizer=tok)
    assert rec.ids == [] and not rec.certified, rec.report
    # 28 dimensions of R^48 off the span: no false token, the bag is the batch's
    assert rec.report["token_bag"] == sorted({t for s in ids for t in s})
    # every true pair passes; block 0's inputs are nearly additive in (token, position),
    # so a cross pair (u, q) with (u, p), (t, p), (t, q) true may pass too (docs/DESIGN.md)
    L = max(len(s) for s in ids)
    per_pos = [len({s[p] for s in ids if p < len(s)}) for p in range(L)]
    got = [f["tokens"] for f in rec.report["token_filter"]]
    assert len(got) == L and all(g >= w for g, w in zip(got, per_pos)), (got, per_pos)


@needs_rust
def test_a_planted_direction_is_not_certified():
    model, grads, ids, _, tok = lora_client(r=32, batch=1, seq_len=12)
    name = next(n for n in grads if "h.0.attn.c_attn.lora_B" in n)
    g = torch.Generator().manual_seed(5)
    bad = dict(grads)
    bad[name] = grads[name] + 1e-3 * grads[name].norm() * torch.randn(grads[name].shape, generator=g).to(grads[name].dtype) / grads[name].numel() ** 0.5
    rec = gt.attack(model, bad, tokenizer=tok)
    assert not rec.certified and not any(rec.exact), rec.report
