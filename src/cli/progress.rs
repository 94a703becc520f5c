//! Progress bars on stderr: the command line's [`Observer`] (the library draws nothing).

use std::sync::Mutex;

use gradleak::{Flow, Observer};

/// One indicatif bar per long stage (hidden when stderr is not a terminal).
#[derive(Default)]
pub struct Bars {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Observer for Bars {
    fn begin(&self, stage: &str, total: u64) {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{stage} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}] {{msg}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(pb);
        }
    }

    fn advance(&self, done: u64, detail: Option<f64>) -> Flow {
        if let Ok(b) = self.bar.lock()
            && let Some(pb) = b.as_ref()
        {
            pb.set_position(done);
            if let Some(f) = detail {
                pb.set_message(format!("{f:.2e}"));
            }
        }
        Flow::Continue
    }

    fn end(&self) {
        if let Ok(mut b) = self.bar.lock()
            && let Some(pb) = b.take()
        {
            pb.finish_and_clear();
        }
    }
}
