//! The sequence search (docs/DESIGN.md, "Text: sequences from the attention output"):
//! a prefix is extended by the tokens that passed the filter at the next position and
//! kept only if the first block's attention output at that position (causal, over the
//! prefix) lies in the span of the first block's output-projection gradient and, where
//! that span is given, its MLP input (the norm of the residual stream after the
//! attention, which holds the token itself) in the span of the MLP input projection's.
//! Each prefix keeps its keys and values, so an extension costs one position.

use faer::Mat;

use super::causal::Causal;
use super::span::RowSpan;

/// One accepted prefix: its last token, position and parent.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub parent: Option<usize>,
    pub token: u32,
    pub position: usize,
    /// The first block's key and value rows at this position (d each).
    pub key: Vec<f64>,
    pub value: Vec<f64>,
    /// The attention output here, as tested.
    pub input: Vec<f64>,
    /// Relative distance of `input` from the output projection's span.
    pub distance: f64,
    /// The MLP input here, as tested (empty without the MLP test).
    pub mlp_input: Vec<f64>,
    pub children: usize,
}

/// What the search did at one position.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SearchStep {
    pub position: usize,
    pub prefixes: usize,
    pub candidates: usize,
    pub accepted: usize,
    /// Largest distance accepted and smallest rejected: the margin of the test.
    pub max_accepted: f64,
    pub min_rejected: f64,
    /// Candidates whose input equals one already on their prefix's path (not kept).
    pub repeats: usize,
    /// Candidates that passed the attention output's test and failed the MLP input's.
    pub rejected_by_mlp: usize,
    /// Largest MLP-input distance accepted and smallest rejected.
    pub mlp_max_accepted: f64,
    pub mlp_min_rejected: f64,
}

/// The accepted prefixes (a trie) and the steps.
pub(crate) struct Trie {
    pub nodes: Vec<Node>,
    pub steps: Vec<SearchStep>,
    /// The search stopped early because more prefixes passed than the span has dimensions.
    pub overflow: bool,
}

impl Trie {
    /// Token ids from the root to `n`.
    pub fn sequence(&self, n: usize) -> Vec<u32> {
        self.path(n)
            .into_iter()
            .map(|i| self.nodes[i].token)
            .collect()
    }

    /// The nodes from the root to `n`.
    pub fn path(&self, n: usize) -> Vec<usize> {
        path_of(&self.nodes, n)
    }

    /// Leaves: prefixes no token extends, i.e. the recovered sequences.
    pub fn leaves(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].children == 0)
            .collect()
    }
}

/// Candidates per block of the forward pass (bounds memory: rows x 4d f64).
const CHUNK: usize = 512;

/// Run the search; `tokens_at(p)` are the tokens that passed block 0's filter at
/// position p (None past the last position); `span_mlp`, when given, is the second
/// test every kept candidate must also pass.
pub(crate) fn search<'a>(
    model: &dyn Causal,
    span: &RowSpan,
    span_mlp: Option<&RowSpan>,
    tokens_at: impl Fn(usize) -> Option<&'a [u32]>,
    mut progress: impl FnMut(&SearchStep),
) -> Trie {
    let d = model.kv_width();
    let mut nodes: Vec<Node> = Vec::new();
    let mut steps = Vec::new();
    // live prefixes: None = the empty prefix
    let mut live: Vec<Option<usize>> = vec![None];
    let mut overflow = false;
    for p in 0.. {
        let Some(tokens) = tokens_at(p) else { break };
        if tokens.is_empty() || live.is_empty() {
            break;
        }
        let step_in = model.step(tokens, p);
        let mut next = Vec::new();
        let mut step = SearchStep {
            position: p,
            prefixes: live.len(),
            candidates: live.len() * tokens.len(),
            accepted: 0,
            max_accepted: 0.0,
            min_rejected: f64::INFINITY,
            repeats: 0,
            rejected_by_mlp: 0,
            mlp_max_accepted: 0.0,
            mlp_min_rejected: f64::INFINITY,
        };
        // at most one input per dimension of either span can be true
        let limit = span_mlp.map_or(span.rank, |m| m.rank.min(span.rank));
        for &prefix in &live {
            let path = prefix.map(|n| path_of(&nodes, n)).unwrap_or_default();
            let keys = Mat::from_fn(path.len(), d, |i, j| nodes[path[i]].key[j]);
            let values = Mat::from_fn(path.len(), d, |i, j| nodes[path[i]].value[j]);
            if overflow {
                break;
            }
            for start in (0..tokens.len()).step_by(CHUNK) {
                let len = CHUNK.min(tokens.len() - start);
                let xa = model.extend(keys.as_ref(), values.as_ref(), &step_in, start..start + len);
                let tests = span.test(xa.as_ref());
                // the candidates that pass the attention output's test, without repeats
                let mut passed = Vec::new();
                for (i, &test) in tests.iter().enumerate() {
                    if !span.accepts(test) {
                        step.min_rejected = step.min_rejected.min(test.distance);
                    } else if path.iter().any(|&n| same_input(&nodes[n].input, xa.row(i))) {
                        // an input equal to one already on the prefix's path adds nothing
                        // the gradient can see (LLaMA: a token repeated from the start has
                        // the attention output of the first): the repeat is not identifiable
                        step.repeats += 1;
                    } else {
                        passed.push(i);
                    }
                }
                let mlp = match span_mlp {
                    Some(m) if !passed.is_empty() => {
                        let toks: Vec<u32> = passed.iter().map(|&i| tokens[start + i]).collect();
                        let att = Mat::from_fn(passed.len(), xa.ncols(), |r, j| xa[(passed[r], j)]);
                        let xm = model.mlp_input(&toks, p, att.as_ref());
                        let t = m.test(xm.as_ref());
                        Some((xm, t, m))
                    }
                    _ => None,
                };
                for (k, &i) in passed.iter().enumerate() {
                    let mut mlp_input = Vec::new();
                    if let Some((xm, t, m)) = &mlp {
                        let mlp_distance = t[k].distance;
                        if !m.accepts(t[k]) {
                            step.rejected_by_mlp += 1;
                            step.mlp_min_rejected = step.mlp_min_rejected.min(mlp_distance);
                            continue;
                        }
                        step.mlp_max_accepted = step.mlp_max_accepted.max(mlp_distance);
                        mlp_input = (0..xm.ncols()).map(|j| xm[(k, j)]).collect();
                    }
                    let r = start + i;
                    step.accepted += 1;
                    step.max_accepted = step.max_accepted.max(tests[i].distance);
                    if let Some(n) = prefix {
                        nodes[n].children += 1;
                    }
                    nodes.push(Node {
                        parent: prefix,
                        token: tokens[r],
                        position: p,
                        key: (0..d).map(|j| step_in.k[(r, j)]).collect(),
                        value: (0..d).map(|j| step_in.v[(r, j)]).collect(),
                        input: (0..xa.ncols()).map(|j| xa[(i, j)]).collect(),
                        distance: tests[i].distance,
                        mlp_input,
                        children: 0,
                    });
                    next.push(Some(nodes.len() - 1));
                    if nodes.len() > limit {
                        overflow = true;
                    }
                }
            }
        }
        progress(&step);
        steps.push(step);
        // every accepted prefix is a distinct input of the output projection: more than the
        // span's rank cannot all be true
        if overflow {
            break;
        }
        live = next;
    }
    Trie {
        nodes,
        steps,
        overflow,
    }
}

/// The nodes from the root to `n`.
fn path_of(nodes: &[Node], mut n: usize) -> Vec<usize> {
    let mut path = vec![n];
    while let Some(p) = nodes[n].parent {
        path.push(p);
        n = p;
    }
    path.reverse();
    path
}

/// Two inputs are the same vector to rounding (relative difference under `SAME_INPUT`).
const SAME_INPUT: f64 = 1e-9;

fn same_input(a: &[f64], b: faer::RowRef<'_, f64>) -> bool {
    let (mut num, mut den) = (0.0, 0.0);
    for (j, &x) in a.iter().enumerate() {
        num += (x - b[j]).powi(2);
        den += x * x;
    }
    num <= SAME_INPUT * SAME_INPUT * den
}
