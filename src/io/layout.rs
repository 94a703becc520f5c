//! Which tensors of a safetensors file are which Linear layer, by structure rather
//! than by `nn.Sequential`'s `N.weight` spelling.
//!
//! A layer is a 2-D float tensor named `P.weight` (with `P.bias`, 1-D of its row count,
//! if present). Prefixes a wrapper adds (`module.` from DataParallel/DDP, `_orig_mod.`
//! from `torch.compile`) are stripped. Layers are ordered by their names in natural
//! order (`fc2` before `fc10`, `0` before `2`) when consecutive shapes chain (layer
//! l + 1 takes layer l's outputs); otherwise by the one order in which the shapes chain.
//! Anything else (BatchNorm running statistics, an extra tensor) is ignored with a note.
//! An explicit list of layer names (`--names fc1,fc2,head`) overrides all of this.

use std::collections::BTreeMap;

use serde::Serialize;

/// What the layout needs of a tensor file (implemented by `safetensors::TensorFile`):
/// the layout reads names and shapes only, so it does not depend on the file format.
pub trait TensorIndex {
    fn path(&self) -> &std::path::Path;
    fn tensor_names(&self) -> Vec<&str>;
    fn tensor_shape(&self, name: &str) -> Result<&[usize]>;
    /// A float tensor the readers can convert.
    fn is_float(&self, name: &str) -> bool;
}
use crate::{Error, Result};

/// Prefixes that wrappers put in front of a module's own names.
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// Most layers for which the order is searched by shape (beyond: give the names).
const MAX_SEARCH_LAYERS: usize = 16;

/// One Linear layer's tensors: `key` is the prefix without wrapper prefixes, `weight`
/// and `bias` the names in the file.
#[derive(Clone, Debug, Serialize)]
pub struct LayerNames {
    pub key: String,
    pub weight: String,
    pub bias: Option<String>,
}

/// How the layer order was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Names in natural order, shapes chaining.
    Names,
    /// The only order in which the shapes chain.
    Shapes,
    /// Given by the caller.
    Given,
}

/// The layers of a model or gradient file, in forward order.
#[derive(Clone, Debug, Serialize)]
pub struct Layout {
    pub layers: Vec<LayerNames>,
    pub order: Order,
    /// Tensors that are not a layer's weight or bias (left unread).
    pub ignored: Vec<String>,
}

/// The file's tensors that are no layer's weight or bias.
fn ignored(file: &impl TensorIndex, layers: &[LayerNames]) -> Vec<String> {
    let used: Vec<&str> = layers
        .iter()
        .flat_map(|l| std::iter::once(l.weight.as_str()).chain(l.bias.as_deref()))
        .collect();
    file.tensor_names()
        .into_iter()
        .filter(|n| !used.contains(n))
        .map(str::to_string)
        .collect()
}

/// `name` without wrapper prefixes (`module.`, `_orig_mod.`, repeated).
pub fn strip(name: &str) -> &str {
    let mut s = name;
    while let Some(rest) = WRAPPER_PREFIXES.iter().find_map(|p| s.strip_prefix(p)) {
        s = rest;
    }
    s
}

/// Natural-order key: digit runs compare as numbers (`fc2` < `fc10`).
fn natural_key(s: &str) -> Vec<(String, u128)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            let mut n: u128 = 0;
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                n = n.saturating_mul(10).saturating_add(d as u128 - '0' as u128);
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
            chars.next();
        }
    }
    out.push((text, 0));
    out
}

struct Candidate {
    names: LayerNames,
    rows: usize,
    cols: usize,
}

fn chains(c: &[&Candidate]) -> bool {
    c.windows(2).all(|w| w[1].cols == w[0].rows)
}

/// Orders of all candidates in which shapes chain; stops after two.
fn shape_orders(c: &[Candidate]) -> Vec<Vec<usize>> {
    fn go(c: &[Candidate], path: &mut Vec<usize>, used: &mut [bool], out: &mut Vec<Vec<usize>>) {
        if out.len() >= 2 {
            return;
        }
        if path.len() == c.len() {
            out.push(path.clone());
            return;
        }
        for k in 0..c.len() {
            if used[k] || path.last().is_some_and(|&p| c[k].cols != c[p].rows) {
                continue;
            }
            used[k] = true;
            path.push(k);
            go(c, path, used, out);
            path.pop();
            used[k] = false;
        }
    }
    let mut out = Vec::new();
    go(c, &mut Vec::new(), &mut vec![false; c.len()], &mut out);
    out
}

impl Layout {
    /// The layers of `file`; `given` lists the layer names in forward order (wrapper
    /// prefixes optional), overriding the structural match.
    pub fn of(file: &impl TensorIndex, given: Option<&[String]>) -> Result<Layout> {
        let fail = |reason: String| Error::format(file.path(), reason);
        // stripped name -> name in the file
        let mut by_key: BTreeMap<String, String> = BTreeMap::new();
        for n in file.tensor_names().into_iter() {
            if let Some(prev) = by_key.insert(strip(n).to_string(), n.to_string()) {
                return Err(fail(format!(
                    "'{prev}' and '{n}' are the same tensor once wrapper prefixes are stripped"
                )));
            }
        }
        let candidate = |key: &str| -> Result<Option<Candidate>> {
            let wkey = if key.is_empty() {
                "weight".to_string()
            } else {
                format!("{key}.weight")
            };
            let Some(w) = by_key.get(&wkey) else {
                return Ok(None);
            };
            let shape = file.tensor_shape(w)?;
            if shape.len() != 2 || !file.is_float(w) {
                return Ok(None);
            }
            let bkey = if key.is_empty() {
                "bias".to_string()
            } else {
                format!("{key}.bias")
            };
            let bias = by_key
                .get(&bkey)
                .filter(|b| file.tensor_shape(b).is_ok_and(|s| s == [shape[0]]) && file.is_float(b))
                .cloned();
            Ok(Some(Candidate {
                names: LayerNames {
                    key: key.to_string(),
                    weight: w.clone(),
                    bias,
                },
                rows: shape[0],
                cols: shape[1],
            }))
        };
        let (layers, order) = match given {
            Some(list) => {
                let mut layers = Vec::with_capacity(list.len());
                for g in list {
                    let key = strip(g.trim());
                    let key = key.strip_suffix(".weight").unwrap_or(key);
                    let c = candidate(key)?.ok_or_else(|| {
                        fail(format!(
                            "no matrix named '{key}.weight' (from --names; the file has {})",
                            file.tensor_names()
                                .into_iter()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                    layers.push(c.names);
                }
                if layers.is_empty() {
                    return Err(Error::Spec {
                        kind: "--names",
                        spec: String::new(),
                        reason: "lists no layer".into(),
                    });
                }
                (layers, Order::Given)
            }
            None => {
                let mut cands = Vec::new();
                for key in by_key.keys() {
                    let prefix = match key.rsplit_once('.') {
                        Some((p, "weight")) => p,
                        None if key == "weight" => "",
                        _ => continue,
                    };
                    if let Some(c) = candidate(prefix)? {
                        cands.push(c);
                    }
                }
                if cands.is_empty() {
                    return Err(fail(
                        "no layer weights (2-D tensors named '<layer>.weight', e.g. '0.weight' or 'fc1.weight')"
                            .into(),
                    ));
                }
                cands.sort_by_key(|c| natural_key(&c.names.key));
                let refs: Vec<&Candidate> = cands.iter().collect();
                if chains(&refs) {
                    (cands.into_iter().map(|c| c.names).collect(), Order::Names)
                } else {
                    let shapes = || {
                        cands
                            .iter()
                            .map(|c| format!("{} {}x{}", c.names.key, c.rows, c.cols))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    if cands.len() > MAX_SEARCH_LAYERS {
                        return Err(fail(format!(
                            "{} layer weights whose names do not give a chaining order ({}); give the order with --names",
                            cands.len(),
                            shapes()
                        )));
                    }
                    let orders = shape_orders(&cands);
                    match orders.as_slice() {
                        [one] => {
                            let mut slots: Vec<Option<Candidate>> =
                                cands.into_iter().map(Some).collect();
                            (
                                one.iter()
                                    .map(|&k| slots[k].take().expect("each once").names)
                                    .collect(),
                                Order::Shapes,
                            )
                        }
                        [] => {
                            return Err(fail(format!(
                                "the layer weights do not chain in any order ({}); give the layers with --names",
                                shapes()
                            )));
                        }
                        _ => {
                            return Err(fail(format!(
                                "the layer weights chain in more than one order ({}); give the order with --names",
                                shapes()
                            )));
                        }
                    }
                }
            }
        };
        let ignored = ignored(file, &layers);
        Ok(Layout {
            layers,
            order,
            ignored,
        })
    }

    /// The same layers in another file (a gradient beside its model): matched by the
    /// stripped names, or, when those differ, by the other file's own structure.
    pub fn like(&self, file: &impl TensorIndex, given: Option<&[String]>) -> Result<Layout> {
        let by_key: BTreeMap<&str, &str> = file
            .tensor_names()
            .into_iter()
            .map(|n| (strip(n), n))
            .collect();
        let key = |k: &str, part: &str| {
            if k.is_empty() {
                part.to_string()
            } else {
                format!("{k}.{part}")
            }
        };
        let same: Option<Vec<LayerNames>> = self
            .layers
            .iter()
            .map(|l| {
                let w = by_key.get(key(&l.key, "weight").as_str())?;
                let b = match &l.bias {
                    Some(_) => Some(by_key.get(key(&l.key, "bias").as_str())?.to_string()),
                    None => None,
                };
                Some(LayerNames {
                    key: l.key.clone(),
                    weight: w.to_string(),
                    bias: b,
                })
            })
            .collect();
        let Some(layers) = same else {
            let own = Layout::of(file, given)?;
            if own.layers.len() != self.layers.len() {
                return Err(Error::Shape(format!(
                    "{}: {} layers, the model has {}",
                    file.path().display(),
                    own.layers.len(),
                    self.layers.len()
                )));
            }
            return Ok(own);
        };
        let ignored = ignored(file, &layers);
        Ok(Layout {
            layers,
            order: self.order,
            ignored,
        })
    }

    /// Layer names in order (the stripped keys).
    pub fn keys(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_wrapper_prefixes_and_sorts_naturally() {
        assert_eq!(strip("module._orig_mod.fc1.weight"), "fc1.weight");
        assert_eq!(strip("fc1.weight"), "fc1.weight");
        let mut v = vec!["fc10", "fc2", "fc1"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["fc1", "fc2", "fc10"]);
        let mut v = vec!["10", "2", "0"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["0", "2", "10"]);
    }

    #[test]
    fn shape_search_finds_the_one_chain() {
        let c = |k: &str, rows, cols| Candidate {
            names: LayerNames {
                key: k.into(),
                weight: format!("{k}.weight"),
                bias: None,
            },
            rows,
            cols,
        };
        // names sort as head, hidden, input; only input -> hidden -> head chains
        let cands = vec![c("head", 10, 32), c("hidden", 32, 64), c("input", 64, 8)];
        assert_eq!(shape_orders(&cands), vec![vec![2, 1, 0]]);
        // two square layers: either order chains
        let cands = vec![c("a", 8, 8), c("b", 8, 8)];
        assert_eq!(shape_orders(&cands).len(), 2);
    }
}
