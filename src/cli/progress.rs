//! Progress on stderr: the command line's [`Observer`] (the library draws nothing).
//! On a terminal, one indicatif bar per long stage; otherwise (a log, a pipe) one
//! plain line when a stage starts and one when it ends, with counts and seconds.
//! `--quiet` silences both.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use gradleak::{Flow, Observer};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Lines,
    Quiet,
}

impl Mode {
    /// Bars on a terminal, lines otherwise, nothing when `quiet`.
    pub fn detect(quiet: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        }
    }

    /// A plain stage line (in `Lines` mode only; a terminal has the bars).
    pub fn line(self, msg: &str) {
        if self == Mode::Lines {
            eprintln!("gradleak: {msg}");
        }
    }
}

struct Current {
    stage: String,
    total: u64,
    done: u64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// The observer behind `--quiet`, the bars and the stage lines.
pub struct Bars {
    mode: Mode,
    cur: Mutex<Option<Current>>,
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new(Mode::detect(false))
    }
}

impl Bars {
    pub fn new(mode: Mode) -> Self {
        Bars {
            mode,
            cur: Mutex::new(None),
        }
    }
}

impl Observer for Bars {
    fn begin(&self, stage: &str, total: u64) {
        let bar = (self.mode == Mode::Bars).then(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{stage} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}] {{msg}}"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        });
        self.mode.line(&format!("{stage}: start, {total} to do"));
        if let Ok(mut c) = self.cur.lock() {
            *c = Some(Current {
                stage: stage.to_string(),
                total,
                done: 0,
                start: Instant::now(),
                bar,
            });
        }
    }

    fn advance(&self, done: u64, detail: Option<f64>) -> Flow {
        if let Ok(mut c) = self.cur.lock()
            && let Some(c) = c.as_mut()
        {
            c.done = done;
            if let Some(pb) = &c.bar {
                pb.set_position(done);
                if let Some(f) = detail {
                    pb.set_message(format!("{f:.2e}"));
                }
            }
        }
        Flow::Continue
    }

    fn end(&self) {
        if let Ok(mut c) = self.cur.lock()
            && let Some(c) = c.take()
        {
            if let Some(pb) = c.bar {
                pb.finish_and_clear();
            }
            self.mode.line(&format!(
                "{}: done {}/{} in {:.2} s",
                c.stage,
                c.done,
                c.total,
                c.start.elapsed().as_secs_f64()
            ));
        }
    }
}

/// CPU seconds (user + system) this process has used so far: the comparable figure
/// on a shared machine, where wall seconds depend on the other jobs.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
