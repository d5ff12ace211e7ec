//! Adapter files in a local directory: `DIR/<tenant>/<id>.safetensors`
//! (or another extension, for the files API's files),
//! written through `home::write_atomic`, with an exclusive lock on the
//! tenant's directory around each compare-and-swap.
//!
//! The files are read and written with `std::fs` on tokio's blocking pool
//! ([`off_async`]), one hop per backend call: an update must hold the
//! directory lock (`flock`, which `tokio::fs` does not offer) from its read
//! to its rename, and a call of several system calls is cheaper as one
//! hop than as one per call, which is what `tokio::fs` would make of it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{off_async, Backend, Call, Contents, Fingerprint, NextFile, StoreError};

/// Adapter files in a local directory.
pub struct LocalDir(PathBuf, &'static str);

impl LocalDir {
    /// Opens (creating) `dir` and removes the temporary files that killed
    /// processes left behind.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, "safetensors")
    }

    /// The same for files named `<id>.<extension>`.
    pub fn open_with(dir: &Path, extension: &'static str) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir.display(), e))?;
        for tenant in tenant_names(dir)? {
            crate::home::remove_stale_temps(&dir.join(tenant));
        }
        Ok(LocalDir(dir.to_path_buf(), extension))
    }

    fn path(&self, tenant: &str, id: &str) -> PathBuf {
        self.0.join(tenant).join(format!("{id}.{}", self.1))
    }
}

/// Holds an exclusive lock on the tenant's directory `dir` (created if
/// missing) until dropped: writers of that tenant take turns, in this
/// process and in others that share the directory.
fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    let fail = |e| StoreError::io(dir.display(), e);
    std::fs::create_dir_all(dir).map_err(fail)?;
    let handle = std::fs::File::open(dir).map_err(fail)?;
    handle.lock().map_err(fail)?;
    Ok(handle)
}

/// Names of the entries of `dir` that `keep` maps to a name (none when
/// `dir` does not exist).
fn names(
    dir: &Path,
    keep: impl Fn(&std::fs::DirEntry) -> Option<String>,
) -> Result<Vec<String>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(dir.display(), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(dir.display(), e))?;
        out.extend(keep(&entry));
    }
    out.sort();
    Ok(out)
}

/// The tenants' directories under `root` (a name starting with `.` is
/// no tenant's: the files API keeps its own tree in `.files`).
fn tenant_names(root: &Path) -> Result<Vec<String>, StoreError> {
    names(root, |e| {
        e.file_type()
            .ok()?
            .is_dir()
            .then(|| e.file_name().into_string().ok())
            .flatten()
            .filter(|n| !n.starts_with('.'))
    })
}

/// The ids of the files named `<id>.<extension>` in a tenant's directory.
fn id_names(dir: &Path, extension: &str) -> Result<Vec<String>, StoreError> {
    names(dir, |e| {
        let name = e.file_name().into_string().ok()?;
        name.strip_suffix(extension)?
            .strip_suffix('.')
            .map(str::to_string)
    })
}

fn local_fingerprint(meta: &std::fs::Metadata) -> Fingerprint {
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    (meta.len(), modified.to_string())
}

/// `Ok(None)` for a missing file, the error for anything else.
fn absent_is_none<T>(result: std::io::Result<T>, path: &Path) -> Result<Option<T>, StoreError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path.display(), e)),
    }
}

/// The file at `path` and the fingerprint of exactly those bytes.
fn read_file(path: &Path) -> Result<Option<Contents>, StoreError> {
    let Some(mut file) = absent_is_none(std::fs::File::open(path), path)? else {
        return Ok(None);
    };
    let fail = |e| StoreError::io(path.display(), e);
    // The fingerprint of the open file: a rename after the open does
    // not change what we read.
    let meta = file.metadata().map_err(fail)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).map_err(fail)?;
    Ok(Some((bytes, local_fingerprint(&meta))))
}

impl Backend for LocalDir {
    fn stat<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Fingerprint>> {
        let path = self.path(tenant, id);
        Box::pin(off_async(move || {
            Ok(absent_is_none(std::fs::metadata(&path), &path)?.map(|m| local_fingerprint(&m)))
        }))
    }

    fn read<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Contents>> {
        let path = self.path(tenant, id);
        Box::pin(off_async(move || read_file(&path)))
    }

    fn update<'a>(&'a self, tenant: &'a str, id: &'a str, next: &'a mut NextFile) -> Call<'a, ()> {
        let dir = self.0.join(tenant);
        let path = self.path(tenant, id);
        Box::pin(async move {
            let read_path = path.clone();
            let (held, current) = off_async(move || {
                let held = lock(&dir)?;
                Ok((held, read_file(&read_path)?.map(|(bytes, _)| bytes)))
            })
            .await?;
            // The lock travels with its handle: it is held until the write
            // below is done (or until this future is dropped, with nothing
            // written).
            let bytes = next(current.as_deref())?;
            off_async(move || {
                let _held = held;
                crate::home::write_atomic(&path, |w| std::io::Write::write_all(w, &bytes))
                    .map_err(|e| StoreError::io(path.display(), e))
            })
            .await
        })
    }

    fn delete<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, bool> {
        let dir = self.0.join(tenant);
        let path = self.path(tenant, id);
        Box::pin(off_async(move || {
            let _held = lock(&dir)?;
            Ok(absent_is_none(std::fs::remove_file(&path), &path)?.is_some())
        }))
    }

    fn tenants(&self) -> Call<'_, Vec<String>> {
        let root = self.0.clone();
        Box::pin(off_async(move || tenant_names(&root)))
    }

    fn ids<'a>(&'a self, tenant: &'a str) -> Call<'a, Vec<String>> {
        let (dir, extension) = (self.0.join(tenant), self.1);
        Box::pin(off_async(move || id_names(&dir, extension)))
    }
}
