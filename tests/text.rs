//! The text route on tiny GPT-2, LLaMA and BERT gradients made by PyTorch
//! (scripts/make_text_fixtures.py): every sequence recovered token for token and
//! certified; a planted wrong token not certified; bad input as typed errors and
//! one-line CLI failures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gradleak::Dtype;
use gradleak::io::safetensors::TensorFile;
use gradleak::text::{self, TextError, TextParams};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(name);
    assert!(
        p.join("config.json").exists(),
        "missing fixture {}",
        p.display()
    );
    p
}

fn truth(dir: &Path) -> Vec<Vec<u32>> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-text-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Rewrite a safetensors file with `f` applied to every value, stored as `dtype`.
fn rewrite(src: &Path, dst: &Path, dtype: safetensors::Dtype, f: impl Fn(&str, usize, f64) -> f64) {
    let file = TensorFile::open(src).unwrap();
    let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for name in file.names() {
        let (shape, v) = file.values(name).unwrap();
        let bytes: Vec<u8> = v
            .iter()
            .enumerate()
            .flat_map(|(k, &x)| {
                let y = f(name, k, x);
                match dtype {
                    safetensors::Dtype::F64 => y.to_le_bytes().to_vec(),
                    _ => (y as f32).to_le_bytes().to_vec(),
                }
            })
            .collect();
        data.insert(name.to_string(), (shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, (s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

#[test]
fn tiny_gpt2_classifier_every_sequence_certified() {
    let dir = fixture("gpt2-cls-tiny");
    let r = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams {
            tokenizer: Some(dir.join("tokenizer.json")),
        },
    )
    .unwrap();
    let mut got: Vec<Vec<u32>> = r.sequences.iter().map(|s| s.ids.clone()).collect();
    let mut want = truth(&dir);
    got.sort();
    want.sort();
    want.dedup();
    assert_eq!(got, want);
    assert!(r.certified);
    assert!(r.sequences.iter().all(|s| s.exact && s.text.is_some()));
    assert_eq!(r.dtype, Dtype::F32);
    for l in &r.layers {
        assert!(l.passed, "{l:?}");
        // true inputs at their own floor, far below the worst-case threshold
        assert!(l.max_distance < l.tau, "{l:?}");
        assert!(l.unexplained <= l.tolerance, "{l:?}");
    }
    // the attention output has one input per distinct prefix
    let prefixes: std::collections::BTreeSet<&[u32]> = want
        .iter()
        .flat_map(|s| (1..=s.len()).map(move |n| &s[..n]))
        .collect();
    assert_eq!(r.layers[1].rank, prefixes.len());
    // and so has the MLP input, the third check
    assert_eq!(r.layers.len(), 3);
    assert_eq!(r.layers[2].layer, "block 0 MLP input");
    assert_eq!(r.layers[2].rank, prefixes.len());
}

#[test]
fn planted_wrong_token_is_not_certified() {
    let dir = fixture("gpt2-cls-tiny");
    let grad = dir.join("gradient.safetensors");
    let seqs = truth(&dir);
    let ok = text::verify(&dir, &grad, &seqs).unwrap();
    assert!(ok.iter().all(|l| l.passed), "{ok:?}");
    for p in [0, 5, seqs[0].len() - 1] {
        let mut bad = seqs.clone();
        bad[0][p] = if bad[0][p] == 11 { 12 } else { 11 };
        let checks = text::verify(&dir, &grad, &bad).unwrap();
        assert!(!checks[1].passed, "position {p}: {:?}", checks[1]);
        // the residual stream holds the token itself: the MLP input check fails too
        assert!(
            !checks[2].passed && checks[2].unexplained > 100.0 * checks[2].tolerance,
            "position {p}: {:?}",
            checks[2]
        );
    }
    // a missing sequence leaves part of the gradient unexplained
    let fewer = text::verify(&dir, &grad, &seqs[1..]).unwrap();
    assert!(
        !fewer[1].passed && fewer[1].unexplained > 100.0 * fewer[1].tolerance,
        "{:?}",
        fewer[1]
    );
}

/// Attack an LM-head fixture in `dir` and compare with the truth: every sequence whole
/// (`whole`) or without its last token.
fn attack_lm_in(dir: &Path, gradient: &Path, whole: bool) -> text::TextReport {
    let r = text::attack(dir, gradient, &TextParams::default()).unwrap();
    let mut got: Vec<Vec<u32>> = r.sequences.iter().map(|s| s.ids.clone()).collect();
    let mut want: Vec<Vec<u32>> = truth(dir)
        .into_iter()
        .map(|s| if whole { s } else { s[..s.len() - 1].to_vec() })
        .collect();
    got.sort();
    want.sort();
    want.dedup();
    assert_eq!(got, want);
    r
}

fn attack_lm(name: &str, whole: bool) -> text::TextReport {
    let dir = fixture(name);
    attack_lm_in(&dir, &dir.join("gradient.safetensors"), whole)
}

#[test]
fn gpt2_language_model_head_completes_the_last_token() {
    let r = attack_lm("gpt2-lm-tiny", true);
    assert!(r.layers.iter().all(|l| l.passed), "{:?}", r.layers);
    let c = r.completion.as_ref().expect("the completion ran");
    assert!(c.passed && c.unexplained <= c.tolerance, "{c:?}");
    // the nearest other token leaves a share of ln_f's gradient far above the rounding
    assert!(c.runner_up > 1e3 * c.tolerance, "{c:?}");
    assert!(r.certified && !r.last_token_missing);
    assert!(r.sequences.iter().all(|s| s.exact));
}

#[test]
fn a_wrong_last_token_in_ln_f_bias_is_not_certified() {
    // move ln_f's bias gradient as if the first sequence ended in another token, leaving
    // its weight gradient: the two no longer agree on any token and nothing is vouched for
    let dir = fixture("gpt2-lm-tiny");
    let seqs = truth(&dir);
    let n_pred: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let y = *seqs[0].last().unwrap() as usize;
    let other = (y + 1) % 4095;
    let model = TensorFile::open(dir.join("model.safetensors")).unwrap();
    let (shape, wte) = model.values("transformer.wte.weight").unwrap();
    let d = shape[1];
    let out = tmpdir("lm-wrong-last");
    let g = out.join("gradient.safetensors");
    rewrite(
        &dir.join("gradient.safetensors"),
        &g,
        safetensors::Dtype::F32,
        |name, k, x| {
            if name == "transformer.ln_f.bias" {
                x + (wte[y * d + k] - wte[other * d + k]) / n_pred as f64
            } else {
                x
            }
        },
    );
    let r = attack_lm_in(&dir, &g, false);
    let c = r.completion.as_ref().expect("the completion ran");
    assert!(!c.passed && c.unexplained > c.tolerance, "{c:?}");
    assert!(!r.certified && r.last_token_missing);
    assert!(r.sequences.iter().all(|s| !s.exact));
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn token_filter_expansion_matches_direct_distances() {
    let dir = fixture("gpt2-cls-tiny");
    let b = text::bench::run(&dir, &dir.join("gradient.safetensors"), 3).unwrap();
    // the expansion cancels O(d) terms of size ~ ||x~||^2 = d + 1 in f64
    assert!(b.max_difference < 1e-9, "{}", b.max_difference);
}

#[test]
fn float32_values_in_float64_storage_are_attacked_at_float32() {
    let dir = fixture("gpt2-cls-tiny");
    let out = tmpdir("upcast");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
    rewrite(
        &dir.join("gradient.safetensors"),
        &out.join("gradient.safetensors"),
        safetensors::Dtype::F64,
        |_, _, x| x,
    );
    let r = text::attack(
        &out,
        &out.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap();
    assert_eq!(r.storage, Dtype::F64);
    assert_eq!(r.dtype, Dtype::F32);
    assert!(r.certified);
    assert_eq!(r.sequences.len(), truth(&dir).len());
}

#[test]
fn bad_input_is_a_typed_error() {
    let dir = fixture("gpt2-cls-tiny");
    let grad = dir.join("gradient.safetensors");
    let p = TextParams::default();
    let tmp = tmpdir("bad");
    // a folder without config.json
    assert!(matches!(
        text::attack(&tmp, &grad, &p),
        Err(TextError::Io { .. })
    ));
    assert!(matches!(
        text::attack(&tmp.join("nope"), &grad, &p),
        Err(TextError::NotAModelFolder { .. })
    ));
    // the gradient of another model: its names are not this model's
    let other = fixture("bert-cls-tiny");
    assert!(matches!(
        text::attack(&dir, &other.join("gradient.safetensors"), &p),
        Err(TextError::MissingTensor { .. })
    ));
    // an architecture the route does not read
    let t5 = tmpdir("t5");
    let mut t5cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    t5cfg["model_type"] = Value::from("t5");
    std::fs::write(t5.join("config.json"), t5cfg.to_string()).unwrap();
    assert!(matches!(
        text::attack(&t5, &grad, &p),
        Err(TextError::Unsupported(_))
    ));
    // NaN in the gradient
    rewrite(
        &grad,
        &tmp.join("nan.safetensors"),
        safetensors::Dtype::F32,
        |n, k, x| {
            if n.contains("h.0.attn.c_attn.weight") && k == 7 {
                f64::NAN
            } else {
                x
            }
        },
    );
    assert!(matches!(
        text::attack(&dir, &tmp.join("nan.safetensors"), &p),
        Err(TextError::Read(gradleak::Error::NonFinite(_)))
    ));
    // a config whose vocabulary does not match the weights
    let cfg_dir = tmpdir("vocab");
    std::fs::copy(
        dir.join("model.safetensors"),
        cfg_dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = Value::from(5000);
    std::fs::write(cfg_dir.join("config.json"), cfg.to_string()).unwrap();
    assert!(matches!(
        text::attack(&cfg_dir, &grad, &p),
        Err(TextError::Shape { .. })
    ));
}

#[test]
fn cli_text_attack_writes_jsonl_and_report() {
    let dir = fixture("gpt2-cls-tiny");
    let out = tmpdir("cli");
    let o = Command::new(BIN)
        .args(["text", "attack", "--model"])
        .arg(&dir)
        .arg("--gradient")
        .arg(dir.join("gradient.safetensors"))
        .arg("--tokenizer")
        .arg(dir.join("tokenizer.json"))
        .arg("--out")
        .arg(out.join("out.jsonl"))
        .arg("--report")
        .arg(out.join("rep.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(out.join("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), truth(&dir).len());
    assert!(
        lines.iter().all(|l| l["exact"] == Value::Bool(true)
            && l["ids"].is_array()
            && l["text"].is_string())
    );
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rep.json")).unwrap()).unwrap();
    assert_eq!(rep["certified"], Value::Bool(true));
    // bad input: one line, exit 1, no output file
    let o = Command::new(BIN)
        .args(["text", "attack", "--model"])
        .arg(out.join("missing"))
        .arg("--gradient")
        .arg(dir.join("gradient.safetensors"))
        .arg("--out")
        .arg(out.join("bad.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("not a model folder"), "{err}");
    assert!(!out.join("bad.jsonl").exists());
}

#[test]
fn tiny_llama_true_prefixes_pass_both_blocks() {
    let dir = fixture("llama-lm-tiny");
    let checks = text::verify(&dir, &dir.join("gradient.safetensors"), &truth(&dir)).unwrap();
    for c in &checks {
        assert!(c.passed, "{c:?}");
    }
}

#[test]
fn tiny_llama_lm_completes_the_last_token() {
    let r = attack_lm("llama-lm-tiny", true);
    assert!(r.layers.iter().all(|l| l.passed), "{:?}", r.layers);
    // a token repeated from the start gives its first position's input again: not kept
    // by the search, yet the completion's count N of predicted positions holds every one
    assert!(r.search.iter().map(|s| s.repeats).sum::<usize>() > 0);
    let c = r.completion.as_ref().expect("the completion ran");
    assert!(c.passed && c.runner_up > 1e3 * c.tolerance, "{c:?}");
    assert!(r.certified && r.sequences.iter().all(|s| s.exact));
}

#[test]
fn tiny_bert_classifier_every_sequence_certified() {
    let dir = fixture("bert-cls-tiny");
    let r = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams {
            tokenizer: Some(dir.join("tokenizer.json")),
        },
    )
    .unwrap();
    let mut got: Vec<Vec<u32>> = r.sequences.iter().map(|s| s.ids.clone()).collect();
    let mut want = truth(&dir);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(r.certified, "{:?}", r.notes);
    assert!(r.sequences.iter().all(|s| s.exact && s.text.is_some()));
    assert_eq!(r.dtype, Dtype::F64);
    let n: usize = want.iter().map(Vec::len).sum();
    for l in &r.layers {
        assert!(l.passed, "{l:?}");
        assert!(l.unexplained <= l.tolerance, "{l:?}");
    }
    // one input per position at the per-position layers
    for l in &r.layers[1..] {
        assert_eq!(l.rank, n, "{l:?}");
    }
    let e = r.encoder.as_ref().unwrap();
    // every true (position, token) pair found, and only those
    let pairs: std::collections::BTreeSet<(usize, u32)> = want
        .iter()
        .flat_map(|s| s.iter().enumerate().map(|(p, &t)| (p, t)))
        .collect();
    assert_eq!(e.accepted, pairs.len());
    assert!(e.groupings.iter().all(|g| g.valid), "{:?}", e.groupings);
}

#[test]
fn bert_planted_wrong_token_or_swap_is_not_certified() {
    let dir = fixture("bert-cls-tiny");
    let grad = dir.join("gradient.safetensors");
    let seqs = truth(&dir);
    let ok = text::verify(&dir, &grad, &seqs).unwrap();
    assert!(ok.iter().all(|l| l.passed), "{ok:?}");
    // a wrong token anywhere changes every position's context (bidirectional)
    for p in [0, 3, seqs[1].len() - 1] {
        let mut bad = seqs.clone();
        bad[1][p] = if bad[1][p] == 11 { 12 } else { 11 };
        let checks = text::verify(&dir, &grad, &bad).unwrap();
        assert!(
            checks[1..].iter().all(|l| !l.passed),
            "position {p}: {checks:?}"
        );
    }
    // two tokens swapped between sequences: the same (position, token) bag is not
    // enough, block 0's per-pair span passes but the contexts do not
    let mut swapped = seqs.clone();
    let t = swapped[1][2];
    swapped[1][2] = swapped[2][2];
    swapped[2][2] = t;
    let checks = text::verify(&dir, &grad, &swapped).unwrap();
    assert!(checks[0].passed, "{:?}", checks[0]);
    assert!(checks[1..].iter().all(|l| !l.passed), "{checks:?}");
    // a missing sequence leaves part of the gradient unexplained
    let fewer = text::verify(&dir, &grad, &seqs[1..]).unwrap();
    assert!(fewer[1..].iter().all(|l| !l.passed), "{fewer:?}");
}

/// The distinct tokens of `seqs`, each cut to its first `keep(len)` tokens.
fn distinct(seqs: &[Vec<u32>], keep: impl Fn(usize) -> usize) -> Vec<u32> {
    let set: std::collections::BTreeSet<u32> = seqs
        .iter()
        .flat_map(|s| s[..keep(s.len())].iter().copied())
        .collect();
    set.into_iter().collect()
}

#[test]
fn embedding_gradient_support_is_the_token_bag() {
    // classification: every non-pad input has a gradient, and only those
    let dir = fixture("gpt2-cls-tiny");
    let r = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap();
    let seqs = truth(&dir);
    let sup = r
        .support
        .as_ref()
        .expect("a classifier's wte gradient is read");
    assert_eq!(sup.tokens, distinct(&seqs, |n| n));
    assert_eq!(sup.longest, seqs.iter().map(Vec::len).max());
    // a tied LM head adds a term to every row: no support
    let r = attack_lm("gpt2-lm-tiny", true);
    assert!(r.support.is_none());
    // the tiny LLaMA's config ties its LM head too (tie_word_embeddings: true)
    assert!(attack_lm("llama-lm-tiny", true).support.is_none());
}

#[test]
fn a_token_the_sequences_leave_out_is_not_certified() {
    // plant a gradient on the embedding row of a token no sequence holds: the spans are
    // unchanged and still pass, but the recovered sequences no longer account for the
    // embedding gradient's support
    let dir = fixture("gpt2-cls-tiny");
    let seqs = truth(&dir);
    let used = distinct(&seqs, |n| n);
    let absent = (0..4096u32)
        .find(|t| used.binary_search(t).is_err())
        .unwrap();
    let d = 64;
    let out = tmpdir("support");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
    rewrite(
        &dir.join("gradient.safetensors"),
        &out.join("gradient.safetensors"),
        safetensors::Dtype::F32,
        |name, k, x| {
            if name.ends_with("wte.weight") && k / d == absent as usize {
                1e-3
            } else {
                x
            }
        },
    );
    let r = text::attack(
        &out,
        &out.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap();
    assert!(r.layers.iter().all(|l| l.passed), "{:?}", r.layers);
    assert!(!r.certified);
    assert!(r.sequences.iter().all(|s| !s.exact));
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("leave 1 of those tokens out")),
        "{:?}",
        r.notes
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Write `tensors` (name, shape, f32 values) as a safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A LoRA client on the tiny GPT-2: block 0's c_attn inputs of `seq` seen through a
/// seeded A (r x d), dB = sum_t delta_t (x) (A x_t) with seeded signals delta_t, in a
/// folder with the base model and peft's adapter file.
fn lora_case(seq: &[u32], r: usize, name: &str) -> PathBuf {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Uniform};
    let dir = fixture("gpt2-cls-tiny");
    let m = TensorFile::open(dir.join("model.safetensors")).unwrap();
    let (wte, wpe) = (
        m.values("transformer.wte.weight").unwrap().1,
        m.values("transformer.wpe.weight").unwrap().1,
    );
    let (g, b) = (
        m.values("transformer.h.0.ln_1.weight").unwrap().1,
        m.values("transformer.h.0.ln_1.bias").unwrap().1,
    );
    let d = g.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (small, unit) = (
        Uniform::new(-0.1, 0.1).unwrap(),
        Uniform::new(-1.0, 1.0).unwrap(),
    );
    let a: Vec<f64> = (0..r * d).map(|_| small.sample(&mut rng)).collect();
    let mut db = vec![0.0f64; 3 * d * r];
    for (p, &t) in seq.iter().enumerate() {
        let e: Vec<f64> = (0..d)
            .map(|j| wte[t as usize * d + j] + wpe[p * d + j])
            .collect();
        let mu = e.iter().sum::<f64>() / d as f64;
        let var = e.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / d as f64;
        let x: Vec<f64> = (0..d)
            .map(|j| (e[j] - mu) / (var + 1e-5).sqrt() * g[j] + b[j])
            .collect();
        let ax: Vec<f64> = (0..r)
            .map(|k| (0..d).map(|j| a[k * d + j] * x[j]).sum())
            .collect();
        for o in 0..3 * d {
            let delta: f64 = unit.sample(&mut rng);
            for k in 0..r {
                db[o * r + k] += delta * ax[k];
            }
        }
    }
    let out = tmpdir(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    write_f32(
        &out.join("adapter_model.safetensors"),
        &[(
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
            vec![r, d],
            f32s(&a),
        )],
    );
    write_f32(
        &out.join("gradient.safetensors"),
        &[(
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight",
            vec![3 * d, r],
            f32s(&db),
        )],
    );
    out
}

#[test]
fn lora_adapter_gradient_reads_one_sequence_under_its_rank() {
    let seq = truth(&fixture("gpt2-cls-tiny"))[0].clone();
    // 16 distinct (token, position) inputs: read exactly with r = 24, nothing with r = 16
    let dir = lora_case(&seq, 24, "lora24");
    let r = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap();
    assert_eq!(r.sequences.len(), 1, "{:?}", r.notes);
    assert_eq!(r.sequences[0].ids, seq);
    assert!(r.certified && r.sequences[0].exact, "{:?}", r.layers);
    assert_eq!(r.layers[0].rank, seq.len());
    let _ = std::fs::remove_dir_all(&dir);
    let dir = lora_case(&seq, 16, "lora16");
    let r = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap();
    assert!(r.sequences.is_empty() && !r.certified);
    assert!(
        r.notes.iter().any(|n| n.contains("full rank 16")),
        "{:?}",
        r.notes
    );
    // without the adapter file: a typed error naming it
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    let e = text::attack(
        &dir,
        &dir.join("gradient.safetensors"),
        &TextParams::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("adapter"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
