//! Token ids to text. GPT-2's BPE is embedded (tiktoken-rs's r50k_base); a
//! `tokenizer.json` (Hugging Face `tokenizers` format) is read for its vocabulary and
//! decoded as byte-level BPE (GPT-2, RoBERTa, LLaMA-3 style) or WordPiece (BERT).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::TextError;

/// A decoder for one vocabulary.
pub enum Decoder {
    /// GPT-2's own BPE (50257 tokens).
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    /// Byte-level BPE from a tokenizer.json: id -> token in GPT-2's byte alphabet.
    ByteLevel(Vec<Option<String>>),
    /// WordPiece: id -> token, "##" marks a continuation.
    WordPiece(Vec<Option<String>>),
}

/// GPT-2's vocabulary size: the embedded BPE decodes ids below it.
pub const GPT2_VOCAB: usize = 50257;

impl Decoder {
    /// GPT-2's BPE.
    pub fn gpt2() -> Result<Self, TextError> {
        tiktoken_rs::r50k_base()
            .map(|b| Decoder::Gpt2(Box::new(b)))
            .map_err(|e| TextError::Tokenizer(format!("GPT-2's embedded BPE: {e}")))
    }

    /// Read a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            TextError::Tokenizer(format!("{}: not valid JSON ({e})", path.display()))
        })?;
        let model = v.get("model").ok_or_else(|| {
            TextError::Tokenizer(format!(
                "{}: no 'model' (not a tokenizer.json)",
                path.display()
            ))
        })?;
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                TextError::Tokenizer(format!("{}: no model.vocab map", path.display()))
            })?;
        let mut table: Vec<Option<String>> = Vec::new();
        for (tok, id) in vocab {
            let id = id.as_u64().ok_or_else(|| {
                TextError::Tokenizer(format!(
                    "{}: vocab id of '{tok}' is not an integer",
                    path.display()
                ))
            })? as usize;
            if id >= table.len() {
                table.resize(id + 1, None);
            }
            table[id] = Some(tok.clone());
        }
        if let Some(added) = v.get("added_tokens").and_then(Value::as_array) {
            for a in added {
                if let (Some(id), Some(c)) = (
                    a.get("id").and_then(Value::as_u64),
                    a.get("content").and_then(Value::as_str),
                ) {
                    let id = id as usize;
                    if id >= table.len() {
                        table.resize(id + 1, None);
                    }
                    table[id] = Some(c.to_string());
                }
            }
        }
        match model.get("type").and_then(Value::as_str) {
            Some("WordPiece") => Ok(Decoder::WordPiece(table)),
            Some("BPE") | None => Ok(Decoder::ByteLevel(table)),
            Some(other) => Err(TextError::Tokenizer(format!(
                "{}: tokenizer model '{other}' (decoded: BPE, WordPiece)",
                path.display()
            ))),
        }
    }

    /// The text of `ids`, or None when an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        match self {
            Decoder::Gpt2(bpe) => {
                if ids.iter().any(|&i| i as usize >= GPT2_VOCAB) {
                    return None;
                }
                bpe.decode(ids).ok()
            }
            Decoder::ByteLevel(table) => {
                let inv = byte_decoder();
                let mut bytes = Vec::new();
                for &i in ids {
                    let tok = table.get(i as usize)?.as_ref()?;
                    for ch in tok.chars() {
                        match inv.get(&ch) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend(ch.to_string().as_bytes()),
                        }
                    }
                }
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            Decoder::WordPiece(table) => {
                let mut out = String::new();
                for &i in ids {
                    let tok = table.get(i as usize)?.as_ref()?;
                    if let Some(rest) = tok.strip_prefix("##") {
                        out.push_str(rest);
                    } else {
                        if !out.is_empty() {
                            out.push(' ');
                        }
                        out.push_str(tok);
                    }
                }
                Some(out)
            }
        }
    }
}

/// GPT-2's byte-to-unicode table, inverted: the printable stand-in for each byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter()
        .zip(cs)
        .map(|(&b, c)| (char::from_u32(c).expect("valid"), b as u8))
        .collect()
}
