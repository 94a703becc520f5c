//! `--method refine` (not implemented yet).

use super::{AttackConfig, Reconstruction, ServerView};
use crate::{Error, Result};

/// Options of this method.
#[derive(Clone, Debug, Default)]
pub struct RefineOptions {}

pub fn attack(_view: &ServerView, _cfg: &AttackConfig) -> Result<Reconstruction> {
    Err(Error::Invalid(
        "--method refine is not implemented yet".into(),
    ))
}
