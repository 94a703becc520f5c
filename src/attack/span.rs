//! `--method span` (not implemented yet).

use super::{AttackConfig, Reconstruction, ServerView};
use crate::{Error, Result};

/// Options of this method.
#[derive(Clone, Debug, Default)]
pub struct SearchOptions {}

pub fn attack(_view: &ServerView, _cfg: &AttackConfig) -> Result<Reconstruction> {
    Err(Error::Invalid(
        "--method span is not implemented yet".into(),
    ))
}
