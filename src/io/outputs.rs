//! A command's output files as one unit: every path checked before the work starts,
//! every file written under a temporary name, all renamed together at the end. A run
//! that fails (or is dropped before [`Outputs::commit`]) leaves none of them behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Output files staged under temporary names in their own directories.
#[derive(Default)]
pub struct Outputs {
    /// (temporary, final) paths written so far.
    staged: Vec<(PathBuf, PathBuf)>,
}

fn tmp_name(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Output {
        path: path.to_path_buf(),
        reason: "is not a file path",
    })?;
    Ok(parent(path).join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Check that each path can be written: its directory exists and takes a new file,
/// the path is not a directory, and no two outputs share a path.
pub fn check_writable<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    let mut seen: Vec<&Path> = Vec::new();
    for p in paths {
        if seen.contains(&p) {
            return Err(Error::Output {
                path: p.to_path_buf(),
                reason: "is given for two outputs",
            });
        }
        seen.push(p);
        if p.is_dir() {
            return Err(Error::Output {
                path: p.to_path_buf(),
                reason: "is a directory, expected a file path",
            });
        }
        let dir = parent(p);
        if !dir.is_dir() {
            return Err(Error::io(
                p,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("directory {} does not exist", dir.display()),
                ),
            ));
        }
        let probe = tmp_name(p)?;
        std::fs::File::create(&probe).map_err(|e| Error::io(p, e))?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `bytes` for `path` under a temporary name (renamed by [`Outputs::commit`]).
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = tmp_name(path)?;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
        self.staged.push((tmp, path.to_path_buf()));
        Ok(())
    }

    /// Rename every staged file to its final path. On failure the files not yet
    /// renamed are removed, and those already renamed too.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let mut done: Vec<&PathBuf> = Vec::new();
        for (tmp, path) in &staged {
            if let Err(e) = std::fs::rename(tmp, path) {
                for (t, _) in &staged {
                    let _ = std::fs::remove_file(t);
                }
                for p in done {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::io(path, e));
            }
            done.push(path);
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_left_unless_committed() {
        let dir = std::env::temp_dir().join(format!("gradleak-outputs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        check_writable([a.as_path(), b.as_path()]).unwrap();
        assert!(check_writable([a.as_path(), dir.join("no/c.bin").as_path()]).is_err());
        assert!(check_writable([a.as_path(), a.as_path()]).is_err());
        let mut o = Outputs::new();
        o.write(&a, b"1").unwrap();
        o.write(&b, b"2").unwrap();
        drop(o);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let mut o = Outputs::new();
        o.write(&a, b"1").unwrap();
        o.write(&b, b"2").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
