//! Attack parameters, linfa style: the builder [`AttackParams`] collects them and
//! [`AttackParams::check`] validates them once, returning the [`AttackConfig`] every
//! stage trusts. Defaults are named constants with the reason for their value.

use serde::Serialize;

use super::observer::{Observer, Shared};
use super::prior::Prior;
use super::subspace::SubspaceOptions;
use crate::attack::law::WeightLaw;
use crate::io::png::ImageShape;
use crate::model::Loss;
use crate::{Error, Result};

/// Fixed-point iterations of FastICA at most. The estimates are only starts for the
/// polish, so a loose convergence suffices.
pub const ICA_ITERATIONS: usize = 200;

/// Which attack to run (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Exact single-sample recovery x = g_w / g_b.
    Analytic,
    /// Wang, Lee & Lei (2023): Hermite moments and tensor decomposition.
    Tensor,
    /// Levenberg-Marquardt on the exact gradient equations from tensor starts.
    Refine,
    /// Span-membership search for exact zeros.
    Span,
    /// The best available route for the case.
    Auto,
    /// Deep Leakage from Gradients (Zhu et al. 2019).
    Dlg,
    /// Inverting Gradients (Geiping et al. 2020).
    Ig,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Analytic,
        Method::Tensor,
        Method::Refine,
        Method::Span,
        Method::Auto,
        Method::Dlg,
        Method::Ig,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Analytic => "analytic",
            Method::Tensor => "tensor",
            Method::Refine => "refine",
            Method::Span => "span",
            Method::Auto => "auto",
            Method::Dlg => "dlg",
            Method::Ig => "ig",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "method",
                name: s.into(),
                expected: Method::ALL.map(|m| m.name()).join(" "),
            })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Demixing rounds of the seeding stage at most; a round that finds nothing new ends them.
pub const SEED_ROUNDS: usize = 12;

/// Options of the search (`AttackConfig::search`).
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// Neurons the search iterates on (None: `NEURONS_PER_UNKNOWN` per unknown,
    /// at least `MIN_NEURONS`); every neuron is used for the final check.
    pub neurons: Option<usize>,
    /// Most Levenberg-Marquardt runs.
    pub max_starts: usize,
    /// Optional wall-clock cap in seconds (None: the budget is counted in starts and
    /// rounds only, so the output does not depend on the machine's speed or load).
    pub seconds: Option<f64>,
    /// Starts drawn from the prior besides the gradient's own row points.
    pub prior_starts: usize,
    /// Demixing rounds of the seeding stage (0: random starts only; `rounds`).
    pub seed_rounds: usize,
    /// FastICA iterations per round (`seed`).
    pub ica_iterations: usize,
    /// Threads polishing the seeds of one round (results do not depend on it).
    pub threads: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            neurons: None,
            max_starts: 2000,
            seconds: None,
            prior_starts: 64,
            seed_rounds: SEED_ROUNDS,
            ica_iterations: ICA_ITERATIONS,
            threads: 1,
        }
    }
}

/// Options of the tensor method (the paper's moment route).
#[derive(Clone, Debug, Default)]
pub struct TensorOptions {
    /// Force the tensor order (3 or 4); None: the lowest order whose Hermite
    /// coefficient is clearly non-zero for the activation.
    pub order: Option<usize>,
    /// The server's initialisation law for the first layer, when known (simulation).
    pub known_law: Option<WeightLaw>,
    /// Whiten with `known_law` instead of the law estimated from the m rows.
    pub use_known_law: bool,
    /// Form the tensor as the paper does, (1/m) sum_j f_j (x) He_p(u_j), instead of
    /// by regression on the Hermite features after removing the part linear in
    /// (a_j, a_j u_j) (the default; much lower variance).
    pub plain_moments: bool,
    pub cp: CpOptions,
}

/// Options of refinement (`Method::Refine`).
#[derive(Clone, Debug, Default)]
pub struct RefineOptions {
    /// Neurons in the joint fit (None: `NEURONS_PER_UNKNOWN` per unknown of one
    /// sample, at least `MIN_NEURONS`).
    pub neurons: Option<usize>,
}

/// Iterations of DLG's L-BFGS (Zhu et al. run 300 on small images; the MLP cases
/// here converge in far fewer when they converge at all).
pub const DLG_ITERS: usize = 300;
/// Iterations of IG's Adam (Geiping et al. use 4800-24000 on ResNets; a budget).
pub const IG_ITERS: usize = 1000;
/// Weight of the total-variation term (Geiping et al.'s 1e-4 for the cosine objective, scaled
/// up for the small images here, whose cosine distance drops fast).
pub const IG_TV_WEIGHT: f64 = 1e-2;
/// Random starts of each baseline by default: one DLG start from a random point
/// stalls in a spurious minimum (wrong soft label, saturated neurons) about half the
/// time on digits B = 1; the original paper reruns failures too. Success stops early.
pub const DEFAULT_RESTARTS: usize = 4;

/// Options of the baselines.
#[derive(Clone, Debug)]
pub struct BaselineOptions {
    /// DLG's L-BFGS iterations.
    pub dlg_iters: usize,
    /// IG's Adam iterations.
    pub ig_iters: usize,
    /// DLG's independent random starts; the best gradient fit is kept.
    pub restarts: usize,
    /// IG's random starts (Adam's budget is the cost: one by default).
    pub ig_restarts: usize,
    /// Weight of IG's total-variation prior (images only).
    pub tv_weight: f64,
    /// Image shape of the inputs (enables IG's total variation).
    pub image: Option<ImageShape>,
}

impl Default for BaselineOptions {
    fn default() -> Self {
        BaselineOptions {
            dlg_iters: DLG_ITERS,
            ig_iters: IG_ITERS,
            restarts: DEFAULT_RESTARTS,
            ig_restarts: 1,
            tv_weight: IG_TV_WEIGHT,
            image: None,
        }
    }
}

/// Validated attack parameters (build them with [`AttackParams`]).
#[derive(Clone, Debug)]
pub struct AttackConfig {
    pub(crate) method: Method,
    /// Force the batch size instead of estimating it from the rank.
    pub(crate) batch: Option<usize>,
    pub(crate) seed: u64,
    /// Public prior over inputs (search starts, baselines' initialisation).
    pub(crate) prior: Option<Prior>,
    /// Public per-coordinate prior mean (a data set's mean image): starts of the
    /// labelled joint fit on rank-deficient inputs.
    pub(crate) prior_image: Option<Vec<f64>>,
    /// The client's loss, when the server knows it (labels, baselines).
    pub(crate) loss: Option<Loss>,
    /// Known noise standard deviation per gradient entry (defences).
    pub(crate) noise_std: Option<f64>,
    /// Who hears about progress (and may cancel).
    pub(crate) observer: Option<Shared>,
    /// Polled by the searches; set from another thread to stop early.
    pub(crate) cancel: crate::attack::Cancel,
    pub(crate) tensor: TensorOptions,
    pub(crate) search: SearchOptions,
    pub(crate) refine: RefineOptions,
    pub(crate) baseline: BaselineOptions,
}

impl AttackConfig {
    /// The defaults for `method` under `seed` (valid as they are).
    pub(crate) fn new(method: Method, seed: u64) -> Self {
        AttackConfig {
            method,
            batch: None,
            seed,
            prior: None,
            prior_image: None,
            loss: None,
            noise_std: None,
            observer: None,
            cancel: Default::default(),
            tensor: Default::default(),
            search: Default::default(),
            refine: Default::default(),
            baseline: Default::default(),
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// The cancellation token the searches poll.
    pub fn cancel_token(&self) -> &crate::attack::Cancel {
        &self.cancel
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Report progress to `observer` (observers need no validation).
    pub fn set_observer(&mut self, observer: impl Observer + 'static) {
        self.observer = Some(Shared(std::sync::Arc::new(observer)));
    }

    /// Back to a builder, to change some parameters and check again.
    pub fn into_params(self) -> AttackParams {
        AttackParams(self)
    }

    /// Options of the subspace stage implied by this configuration.
    pub fn subspace_options(&self) -> SubspaceOptions {
        SubspaceOptions {
            batch: self.batch,
            noise_std: self.noise_std,
            seed: self.seed,
        }
    }
}

/// Builder of the attack's parameters; [`check`](AttackParams::check) validates them.
///
/// ```
/// use gradleak::{AttackParams, Method};
/// let cfg = AttackParams::new(Method::Span).seed(7).search_starts(500).check().unwrap();
/// assert!(AttackParams::new(Method::Span).batch(0).check().is_err());
/// ```
#[derive(Clone, Debug)]
pub struct AttackParams(AttackConfig);

fn param(name: &'static str, reason: &str) -> Error {
    Error::Param {
        name,
        reason: reason.into(),
    }
}

impl AttackParams {
    /// The defaults of `method` (seed 1).
    pub fn new(method: Method) -> Self {
        AttackParams(AttackConfig::new(method, 1))
    }
    pub fn method(mut self, method: Method) -> Self {
        self.0.method = method;
        self
    }
    /// Seed of every random draw of the attack.
    pub fn seed(mut self, seed: u64) -> Self {
        self.0.seed = seed;
        self
    }
    /// Force the batch size instead of estimating it from the gradient's rank.
    pub fn batch(mut self, batch: usize) -> Self {
        self.0.batch = Some(batch);
        self
    }
    /// Public prior over input values (search starts, baselines).
    pub fn prior(mut self, prior: Prior) -> Self {
        self.0.prior = Some(prior);
        self
    }
    /// Public prior mean per input coordinate (e.g. a data set's mean image): the
    /// starts of the labelled joint fit when the inputs are rank-deficient.
    pub fn prior_image(mut self, mean: Vec<f64>) -> Self {
        self.0.prior_image = Some(mean);
        self
    }
    /// The client's loss, when known (label rules, baselines).
    pub fn loss(mut self, loss: Loss) -> Self {
        self.0.loss = Some(loss);
        self
    }
    /// Known noise standard deviation per gradient entry (a defence's noise).
    pub fn noise_std(mut self, sd: f64) -> Self {
        self.0.noise_std = Some(sd);
        self
    }
    /// Most Levenberg-Marquardt starts of the span (or pattern) search.
    pub fn search_starts(mut self, n: usize) -> Self {
        self.0.search.max_starts = n;
        self
    }
    /// Optional wall-clock cap of the search in seconds (default: none, so the
    /// output does not depend on the machine's speed).
    pub fn search_seconds(mut self, s: f64) -> Self {
        self.0.search.seconds = Some(s);
        self
    }
    /// Demixing (FastICA) rounds that seed the span search; 0: random starts only.
    pub fn seed_rounds(mut self, n: usize) -> Self {
        self.0.search.seed_rounds = n;
        self
    }
    /// Threads polishing the seeds of a round (the output does not depend on it).
    pub fn threads(mut self, n: usize) -> Self {
        self.0.search.threads = n;
        self
    }
    /// Starts drawn from the prior besides the gradient's own row points.
    pub fn prior_starts(mut self, n: usize) -> Self {
        self.0.search.prior_starts = n;
        self
    }
    /// Neurons the search iterates on (default: a rule of the problem's size).
    pub fn search_neurons(mut self, n: usize) -> Self {
        self.0.search.neurons = Some(n);
        self
    }
    /// Neurons of refinement's joint fit (default: a rule of the problem's size).
    pub fn refine_neurons(mut self, n: usize) -> Self {
        self.0.refine.neurons = Some(n);
        self
    }
    /// Options of the tensor method.
    pub fn tensor(mut self, opts: TensorOptions) -> Self {
        self.0.tensor = opts;
        self
    }
    /// The server's initialisation law of the first layer (tensor whitening).
    pub fn known_law(mut self, law: WeightLaw) -> Self {
        self.0.tensor.known_law = Some(law);
        self
    }
    /// Iterations of both baselines (DLG's L-BFGS, IG's Adam).
    pub fn baseline_iters(mut self, n: usize) -> Self {
        self.0.baseline.dlg_iters = n;
        self.0.baseline.ig_iters = n;
        self
    }
    /// Random starts of DLG.
    pub fn restarts(mut self, n: usize) -> Self {
        self.0.baseline.restarts = n;
        self
    }
    /// Image shape of the inputs (IG's total-variation prior).
    pub fn image(mut self, shape: ImageShape) -> Self {
        self.0.baseline.image = Some(shape);
        self
    }
    /// A token another thread may set to stop the attack early (the searches poll it).
    pub fn cancel(mut self, token: crate::attack::Cancel) -> Self {
        self.0.cancel = token;
        self
    }
    /// Report progress to `observer`, which may also cancel the attack.
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.0.set_observer(observer);
        self
    }

    /// Validate once; every stage trusts the result.
    pub fn check(self) -> Result<AttackConfig> {
        let c = &self.0;
        if c.batch == Some(0) {
            return Err(param("batch", "must be at least 1"));
        }
        if let Some(s) = c.noise_std
            && !(s >= 0.0 && s.is_finite())
        {
            return Err(param("noise_std", "must be a finite number >= 0"));
        }
        if let Some(p) = c.prior
            && !(p.std > 0.0 && p.std.is_finite() && p.mean.is_finite() && p.min < p.max)
        {
            return Err(param("prior", "needs std > 0, a finite mean and min < max"));
        }
        if let Some(img) = &c.prior_image
            && (img.is_empty() || img.iter().any(|v| !v.is_finite()))
        {
            return Err(param("prior_image", "needs at least one value, all finite"));
        }
        let s = &c.search;
        if s.max_starts == 0 {
            return Err(param("search_starts", "must be at least 1"));
        }
        if let Some(t) = s.seconds
            && (t.is_nan() || t <= 0.0)
        {
            return Err(param("search_seconds", "must be a positive number"));
        }
        if s.threads == 0 {
            return Err(param("threads", "must be at least 1"));
        }
        if s.neurons == Some(0) {
            return Err(param("search_neurons", "must be at least 1"));
        }
        if c.refine.neurons == Some(0) {
            return Err(param("refine_neurons", "must be at least 1"));
        }
        if let Some(o) = c.tensor.order
            && !(3..=4).contains(&o)
        {
            return Err(param("tensor order", "must be 3 or 4"));
        }
        let b = &c.baseline;
        if b.dlg_iters == 0 || b.ig_iters == 0 {
            return Err(param("baseline_iters", "must be at least 1"));
        }
        if b.restarts == 0 || b.ig_restarts == 0 {
            return Err(param("restarts", "must be at least 1"));
        }
        if !(b.tv_weight >= 0.0 && b.tv_weight.is_finite()) {
            return Err(param("tv_weight", "must be a finite number >= 0"));
        }
        Ok(self.0)
    }
}

/// Options of the decomposition.
#[derive(Clone, Copy, Debug)]
pub struct CpOptions {
    /// Jennrich starts (each with fresh random contractions), each polished by ALS.
    pub restarts: usize,
    /// ALS sweeps per start at most.
    pub max_sweeps: usize,
    /// Stop when the relative residual improves by less than this (relative) per sweep.
    pub tol: f64,
}

/// Defaults: 8 starts cover the occasional ill-conditioned random contraction;
/// 300 sweeps are ample (ALS from a Jennrich start converges in tens of sweeps unless
/// two components are nearly collinear); 1e-10 stops well below the moment noise.
impl Default for CpOptions {
    fn default() -> Self {
        CpOptions {
            restarts: 8,
            max_sweeps: 300,
            tol: 1e-10,
        }
    }
}
