"""gradleak.text on the tiny committed fixtures (tests/fixtures/text, made by
scripts/make_text_fixtures.py tiny: d = 64, 2 layers, vocab 4096, B = 3, 16 tokens)
and tiny configs made here."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import gradleak  # noqa: E402
from gradleak import text as gt  # noqa: E402
from gradleak import _textgen as tg  # noqa: E402

from conftest import REPO  # noqa: E402

FIX = REPO / "tests" / "fixtures" / "text"
TINY = sorted(p.name for p in FIX.iterdir() if (p / "truth.json").is_file()) if FIX.is_dir() else []


def load(name):
    from safetensors.torch import load_file

    d = FIX / name
    truth = json.loads((d / "truth.json").read_text())
    model = getattr(transformers, truth["model_class"]).from_pretrained(d)
    return model, load_file(str(d / "gradient.safetensors")), truth, d


def rust_available():
    """The Rust text attack: the extension's text_attack, or a gradleak binary whose
    `text attack --help` works."""
    if hasattr(gradleak._native, "text_attack"):
        return True
    exe = gt._binary()
    if exe is None:
        return False
    r = subprocess.run([exe, "text", "attack", "--help"], capture_output=True)
    return r.returncode == 0


needs_rust = pytest.mark.skipif(not rust_available(), reason="no Rust text attack (extension text_attack or `gradleak text attack`)")


def fake_rust(ids, certified=True):
    """A stand-in for the Rust attack that returns the given sequences."""

    def run(model_dir, gradient, tokenizer=None):
        run.calls.append((Path(model_dir), Path(gradient), tokenizer))
        from safetensors.torch import load_file

        run.grads = load_file(str(gradient))
        run.config = json.loads((Path(model_dir) / "config.json").read_text())
        return {"certified": certified, "sequences": [{"ids": s, "text": None, "exact": True} for s in ids]}

    run.calls = []
    return run


def test_fixtures_exist_and_fit():
    assert set(TINY) >= {"gpt2-cls-tiny", "gpt2-lm-tiny", "bert-cls-tiny", "llama-lm-tiny"}
    for name in TINY:
        d = FIX / name
        size = sum(f.stat().st_size for f in d.iterdir())
        truth = json.loads((d / "truth.json").read_text())
        # the BERT fixture is float64 (twice the bytes): see TINY in make_text_fixtures.py
        assert size < (3.8e6 if truth["dtype"] == "float32" else 7.2e6), (name, size)
        # below the limit: every distinct (token, position) input is a direction of the span
        assert truth["distinct_token_positions"] < 64
        assert all(len(s) == sum(m) for s, m in zip(truth["ids"], truth["mask"]))


@pytest.mark.parametrize("name", TINY)
def test_recompute_accepts_the_true_batch_in_any_order(name):
    model, grads, truth, _ = load(name)
    ids = truth["ids"]
    for order in (ids, ids[::-1], ids[1:] + ids[:1]):
        rc = gt.recompute_check(model, order, grads)
        assert rc["ok"], rc
        # a reordered batch only changes the rounding: a few unit roundoffs, far below the tolerance
        assert rc["rel_diff"] <= 32 * gt.unit_roundoff(torch.float32)
        if truth["labels"] is not None:
            want = [truth["labels"][ids.index(s)] for s in order]
            assert rc["labels"] == want


@pytest.mark.parametrize("name", TINY)
def test_recompute_rejects_a_planted_wrong_token_or_a_missing_sequence(name):
    model, grads, truth, _ = load(name)
    ids = truth["ids"]
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        bad = [list(s) for s in ids]
        b = trial % len(bad)
        p = int(torch.randint(len(bad[b]), (1,), generator=g))
        old = bad[b][p]
        while bad[b][p] in (old, model.config.pad_token_id):
            bad[b][p] = int(torch.randint(model.config.vocab_size, (1,), generator=g))
        rc = gt.recompute_check(model, bad, grads)
        assert not rc["ok"], (trial, rc)
        # the separation the tolerance relies on: a wrong token is >= 100x above it
        assert rc["rel_diff"] > 100 * rc["tolerance"]
    assert not gt.recompute_check(model, ids[:-1], grads)["ok"]
    assert not gt.recompute_check(model, ids + [ids[0]], grads)["ok"]
    assert not gt.recompute_check(model, [], grads)["ok"]


def test_planted_wrong_sequence_is_not_certified_even_if_rust_says_so(monkeypatch):
    model, grads, truth, _ = load("gpt2-cls-tiny")
    bad = [list(s) for s in truth["ids"]]
    bad[0][1] = (bad[0][1] + 1) % (model.config.vocab_size - 1)
    monkeypatch.setattr(gt, "run_rust", fake_rust(bad, certified=True))
    rec = gt.attack(model, grads)
    assert not rec.certified
    assert rec.report["python"]["rust_certified"] is True
    assert not rec.recompute["ok"]
    monkeypatch.setattr(gt, "run_rust", fake_rust(truth["ids"][::-1], certified=True))
    rec = gt.attack(model, grads)
    assert rec.certified and rec.recompute["ok"]
    assert rec.labels == truth["labels"][::-1]
    # the Rust certificate is required too
    monkeypatch.setattr(gt, "run_rust", fake_rust(truth["ids"], certified=False))
    assert not gt.attack(model, grads).certified


def test_dict_and_list_gradients_give_the_same_files(monkeypatch):
    model, grads, truth, _ = load("gpt2-lm-tiny")
    names = [n for n, _ in model.named_parameters()]
    fake = fake_rust(truth["ids"])
    monkeypatch.setattr(gt, "run_rust", fake)
    as_list = gt.attack(model, [grads[n] for n in names])
    from_list = dict(fake.grads)
    as_tuple = gt.attack(model, tuple(grads[n] for n in names))
    as_dict = gt.attack(model, {n: grads[n] for n in reversed(names)})
    assert set(from_list) == set(names)
    for n in names:
        assert torch.equal(from_list[n], grads[n])
        assert torch.equal(fake.grads[n], grads[n])
    assert as_list.certified and as_tuple.certified and as_dict.certified
    assert fake.config["model_type"] == "gpt2"


def test_bad_input_raises_gradleak_error():
    model, grads, truth, _ = load("gpt2-cls-tiny")
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(gradleak.GradleakError, match="unsupported model"):
        gt.attack(torch.nn.Linear(4, 2), [torch.zeros(2, 4), torch.zeros(2)])
    with pytest.raises(gradleak.GradleakError, match="unsupported model GPT2Model"):
        gt.attack(model.transformer, grads)
    with pytest.raises(gradleak.GradleakError, match="tensors for"):
        gt.attack(model, [grads[n] for n in names][:-1])
    with pytest.raises(gradleak.GradleakError, match="not in the model"):
        gt.attack(model, dict(grads, **{"nope.weight": torch.zeros(1)}))
    missing = dict(grads)
    missing.pop(names[3])
    with pytest.raises(gradleak.GradleakError, match=f"no tensor for parameter {names[3]}"):
        gt.attack(model, missing)
    wrong = dict(grads)
    wrong[names[0]] = wrong[names[0]][:-1]
    with pytest.raises(gradleak.GradleakError, match="shape"):
        gt.attack(model, wrong)
    nan = dict(grads)
    nan[names[2]] = nan[names[2]].clone()
    nan[names[2]][0] = float("nan")
    with pytest.raises(gradleak.GradleakError, match="NaN"):
        gt.attack(model, nan)
    with pytest.raises(gradleak.GradleakError, match="expected a list"):
        gt.attack(model, grads[names[0]])


def test_evaluate_matches_one_to_one():
    truth = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    m = gt.evaluate(truth, [[8, 9], [1, 2, 3, 4], [5, 6, 7]])
    assert m["exact"] == 3 and m["token_accuracy"] == 1 and m["rouge1"] == 1 and m["rouge2"] == 1
    # one wrong token in the first: 3/4 of its tokens, ROUGE-1 F1 3/4, ROUGE-2 F1 1/3 (1 of 3 bigrams)
    m = gt.evaluate(truth, [[5, 6, 7], [1, 2, 0, 4], [8, 9]])
    assert m["exact"] == 2
    assert m["token_accuracy"] == pytest.approx(8 / 9)
    assert m["rouge1"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert m["rouge2"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    # a missing sequence counts zero; duplicates cannot both match
    m = gt.evaluate(truth, [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert m["exact"] == 1 and m["recovered"] == 2
    assert gt.evaluate(truth, [])["exact"] == 0


def test_hungarian_fallback_agrees_with_brute_force():
    import itertools

    g = torch.Generator().manual_seed(3)
    for n, m in [(3, 3), (4, 5), (5, 5)]:
        cost = torch.rand(n, m, generator=g).tolist()
        col = gt._hungarian(cost)
        best = min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        assert sorted(set(col)) == sorted(col) and sum(cost[i][col[i]] for i in range(n)) == pytest.approx(best)


def test_make_case_is_deterministic_and_matches_named_parameters():
    kw = dict(arch="gpt2", head="cls", batch=2, seq_len=8, seed=5, vocab=4096, preset="tiny", layers=1)
    a = tg.make_case(**kw)
    b = tg.make_case(**kw)
    assert a[2] == b[2] and a[3] == b[3]
    assert list(a[4]) == [n for n, _ in a[0].named_parameters()]
    for n in a[4]:
        assert torch.equal(a[4][n], b[4][n])
    c = tg.make_case(**dict(kw, seed=6))
    assert c[2] != a[2] or not torch.equal(c[4]["score.weight"], a[4]["score.weight"])


def test_reduced_vocab_tokenizer_matches_gpt2_on_texts_that_fit():
    full, small = tg.gpt2_tokenizer(), tg.gpt2_tokenizer(4096)
    assert len(small) == 4096 and small.pad_token_id == 4095 and full.pad_token_id == 50256
    n = 0
    for t in tg.read_texts():
        ids = full(t).input_ids
        if max(ids) < 4095:
            assert small(t).input_ids == ids
            n += 1
    assert n >= 10


@needs_rust
@pytest.mark.parametrize("name", ["gpt2-cls-tiny", "gpt2-lm-tiny"])
def test_attack_on_tiny_gpt2_recovers_every_sequence(name):
    model, grads, truth, d = load(name)
    rec = gt.attack(model, grads, tokenizer=str(d / "tokenizer.json"))
    m = gt.evaluate(truth["ids"], rec)
    assert m["exact"] == truth["batch"] == len(rec.ids), (m, rec.report)
    assert all(rec.exact) and rec.certified, rec.report
    assert rec.recompute["ok"]
    assert sorted(rec.texts) == sorted(truth["texts"])
    if truth["labels"] is not None:
        mt = gt.match(truth["ids"], rec.ids)
        assert [rec.labels[j] for j in mt] == truth["labels"]


@needs_rust
def test_attack_on_tiny_bert_recovers_every_sequence():
    model, grads, truth, d = load("bert-cls-tiny")
    rec = gt.attack(model, grads, tokenizer=str(d / "tokenizer.json"))
    m = gt.evaluate(truth["ids"], rec)
    assert m["exact"] == truth["batch"] == len(rec.ids), (m, rec.report)
    assert all(rec.exact) and rec.certified, rec.report
    assert rec.recompute["ok"] and rec.report["arch"] == "bert"
    assert sorted(rec.texts) == sorted(truth["texts"])
    mt = gt.match(truth["ids"], rec.ids)
    assert [rec.labels[j] for j in mt] == truth["labels"]


@needs_rust
def test_simulate_tiny_gpt2_end_to_end():
    m, rec, truth = gt.simulate("gpt2", "lm", batch=2, seq_len=12, seed=7, vocab=4096, preset="tiny")
    assert m["exact"] == 2 and m["certified"] and m["marked_exact_wrong"] == 0, m
    assert sorted(rec.texts) == sorted(truth["texts"])


@pytest.mark.parametrize("name", ["gpt2-lm-tiny", "llama-lm-tiny"])
def test_lm_last_tokens_are_read_from_the_output_layer(name, monkeypatch):
    model, grads, truth, _ = load(name)
    prefixes = [s[:-1] for s in truth["ids"]]
    done, diag = gt.complete_last_tokens(model, prefixes, grads)
    assert done == truth["ids"]
    # the chosen coefficient is 1 (one e_y h^T / N term each), the runner-up far below
    # (exactly 1 for an untied head; a tied embedding adds small input-path terms)
    assert all(abs(c - 1) < 0.1 for c in diag["coef"]) and max(diag["runner_up"]) < 0.5
    # through attack(): a Rust report of prefixes without their last token, layers passed
    def run(model_dir, gradient, tokenizer=None):
        return {"certified": False, "notes": ["each sequence is recovered without its last token"],
                "layers": [{"passed": True}, {"passed": True}],
                "sequences": [{"ids": s, "text": None, "exact": False} for s in prefixes[::-1]]}

    monkeypatch.setattr(gt, "run_rust", run)
    rec = gt.attack(model, grads)
    assert sorted(rec.ids) == sorted(truth["ids"]) and rec.certified and all(rec.exact)
    # a wrong prefix token: the completion still runs, the recompute rejects the batch
    bad = [list(s) for s in prefixes]
    bad[0][0] = (bad[0][0] + 1) % (model.config.vocab_size - 1)
    prefixes[:] = bad
    rec = gt.attack(model, grads)
    assert not rec.certified and not any(rec.exact)


@needs_rust
def test_simulate_command_line_prints_the_metrics(capsys):
    rc = gt._main(["simulate", "--arch", "gpt2", "--head", "lm", "--batch", "2", "--seq-len", "10", "--seed", "3",
                   "--vocab", "4096", "--preset", "tiny", "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["exact"] == 2 and m["certified"] and m["token_accuracy"] == 1.0


def test_simulate_command_line_rejects_bad_input(capsys):
    assert gt._main(["simulate", "--arch", "bert", "--head", "lm", "--batch", "2", "--vocab", "4096",
                     "--preset", "tiny"]) == 2
    assert "bert: only the classification head" in capsys.readouterr().err
    assert gt._main(["simulate", "--batch", "100000", "--vocab", "4096", "--preset", "tiny"]) == 2
    assert "distinct texts fit" in capsys.readouterr().err
