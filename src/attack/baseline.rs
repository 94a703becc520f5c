//! Baselines users compare against: DLG and IG (not implemented yet).

use super::{AttackConfig, Reconstruction, ServerView};
use crate::{Error, Result};

/// Options of the baselines.
#[derive(Clone, Debug, Default)]
pub struct BaselineOptions {}

pub fn dlg(_view: &ServerView, _cfg: &AttackConfig) -> Result<Reconstruction> {
    Err(Error::Invalid("--method dlg is not implemented yet".into()))
}

pub fn ig(_view: &ServerView, _cfg: &AttackConfig) -> Result<Reconstruction> {
    Err(Error::Invalid("--method ig is not implemented yet".into()))
}
