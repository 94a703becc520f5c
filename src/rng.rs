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
