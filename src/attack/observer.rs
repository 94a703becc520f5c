//! Progress of a long attack, reported to an [`Observer`] the caller supplies: the
//! library draws nothing (the command line draws bars; a binding may forward the
//! events or poll for an interrupt). The observer may ask the attack to stop.

use std::sync::Arc;

use crate::{Error, Result};

/// Whether the attack should go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop as soon as possible: the attack returns [`Error::Cancelled`].
    Stop,
}

/// Receives the progress of an attack's long stages (span search, baselines).
/// Every method has a default that ignores the event.
pub trait Observer: Send + Sync {
    /// A stage with `total` steps began (e.g. "span search", B samples).
    fn begin(&self, _stage: &str, _total: u64) {}
    /// `done` of the stage's steps are finished; `detail` is a short figure (e.g. the
    /// objective). Called often (every start or iteration): the place to check for an
    /// interrupt and return [`Flow::Stop`].
    fn advance(&self, _done: u64, _detail: Option<f64>) -> Flow {
        Flow::Continue
    }
    /// The stage ended.
    fn end(&self) {}
}

/// An observer shared by the attack's configuration (cheap to clone).
#[derive(Clone)]
pub struct Shared(pub Arc<dyn Observer>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// One stage's reporting: `begin` on creation, `end` on drop.
pub(crate) struct Progress<'a> {
    observer: Option<&'a dyn Observer>,
}

impl<'a> Progress<'a> {
    pub(crate) fn begin(observer: Option<&'a Shared>, stage: &str, total: u64) -> Self {
        let observer = observer.map(|s| s.0.as_ref());
        if let Some(o) = observer {
            o.begin(stage, total);
        }
        Progress { observer }
    }

    /// Report progress; `Err(Error::Cancelled)` when the observer asks to stop.
    pub(crate) fn advance(&self, done: u64, detail: Option<f64>) -> Result<()> {
        match self.observer.map(|o| o.advance(done, detail)) {
            Some(Flow::Stop) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.observer {
            o.end();
        }
    }
}
