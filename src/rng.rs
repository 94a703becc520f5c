//! Seeded random streams: one master seed, one independent ChaCha8 stream per use,
//! so adding a draw in one stage never shifts another stage's numbers.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Named streams of a run.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Data = 1,
    Model = 2,
    Labels = 3,
    Defense = 4,
    Attack = 5,
}

/// The generator for `stream` under `seed`.
pub fn stream(seed: u64, stream: Stream) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream as u64);
    r
}

/// Streams of the attack's stages, each the attack seed XOR a fixed salt. The salts
/// predate [`Stream`] and are kept so that published figures reproduce; they are
/// written here only, so no two stages share one.
#[derive(Clone, Copy, Debug)]
#[allow(clippy::enum_clike_unportable_variant)] // 64-bit salts; a u64 on every target via `as u64`
pub enum Salt {
    /// Sketch of the randomized range finder (subspace).
    Sketch,
    /// Neuron subsample of the span search.
    SearchNeurons,
    /// Starts drawn from the prior in the span search.
    SearchPrior,
    /// Neuron subsample of the pattern search.
    PatternNeurons,
    /// Neuron subsample of the joint refinement.
    RefineNeurons,
    /// DLG's initialisation.
    Dlg,
    /// IG's initialisation.
    Ig,
    /// Starts of the labelled joint fit (rank-deficient inputs).
    JointStarts,
    /// The random move that counts a CNN layer's free directions (`conv::pixels`).
    Pixels,
}

impl Salt {
    /// The salt's value.
    pub fn value(self) -> u64 {
        match self {
            Salt::Sketch => 0x005e_ed5b_5ace,
            Salt::SearchNeurons => 0x5ea_2c4,
            Salt::SearchPrior => 0x5a11_c0de,
            Salt::PatternNeurons => 0x9a7,
            Salt::RefineNeurons => 0x002e_f12e,
            Salt::Dlg => 0x00d1_9d19,
            Salt::Ig => 0x0016_1616,
            Salt::JointStarts => 0x0010_1e7f,
            Salt::Pixels => 0x0091_7e15,
        }
    }
}

/// The generator of an attack stage under the attack seed `seed`.
pub fn salted(seed: u64, salt: Salt) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ salt.value())
}
