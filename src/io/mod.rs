//! File formats users hold: safetensors (PyTorch), NumPy .npy, PNG.
//! Every writer goes through [`write_atomic`]: no half-written output.

pub mod cnn;
pub mod layout;
pub mod npy;
pub mod outputs;
pub mod png;
pub mod safetensors;

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `bytes` to `path` via a temporary file in the same directory and a rename,
/// so a reader never sees a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::NotAFilePath {
        path: path.to_path_buf(),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Create a directory (and parents) for outputs.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}
