//! Where the server's adapters live: a local directory, one namespace per
//! tenant (`DIR/<tenant>/<id>.safetensors`) — or, with the `object-store`
//! feature, the same layout in an object store (`s3://bucket/prefix` with
//! the `s3` feature, `memory://`) — and a host cache of validated deltas
//! bounded in bytes (least recently used out first; pinned adapters stay).
//!
//! Each file carries its version in its metadata (`svfit.version`); an
//! upload of an existing id writes version + 1, atomically, so a reader
//! sees the old file or the new one. Files dropped into the directory are
//! picked up on their first use (and re-read when they change: the cache
//! remembers each file's size and modification time or entity tag). Every entry
//! handed to the engine is keyed by version and content, so a replaced
//! adapter never shares a slot or a cache entry with its old version.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lru::LruCache;
use sha2::Digest;

use crate::adapter::{Adapter, Deltas};
use crate::engine::AdapterDeltas;
use crate::factors::{FactorsKey, SingularValues};

pub const VERSION_KEY: &str = "svfit.version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("adapter '{0}' not found")]
    NotFound(String),
    #[error("invalid {what} '{name}': use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with '.')")]
    InvalidName { what: &'static str, name: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("adapter store: {0}")]
    Io(String),
}

/// What the store knows of one adapter.
#[derive(Clone, Debug)]
pub struct Stored {
    pub tenant: String,
    pub id: String,
    pub version: u64,
    pub bytes: u64,
    pub adapter: Adapter,
    /// What the engine gets: deltas keyed by tenant, id, version and content.
    pub deltas: Arc<AdapterDeltas>,
}

/// Counters of the host cache.
#[derive(Default, Clone, Copy, Debug)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub loads: u64,
    pub bytes: usize,
    pub entries: usize,
}

struct Cached {
    stored: Arc<Stored>,
    /// The file's fingerprint when read.
    fingerprint: Fingerprint,
    bytes: usize,
}

struct State {
    cache: LruCache<(String, String), Cached>,
    pinned: HashSet<(String, String)>,
    stats: CacheStats,
}

/// Identifies one state of a file: size and modification time (or tag).
pub type Fingerprint = (u64, String);

/// Storage of adapter files by (tenant, id).
pub trait Backend: Send + Sync {
    /// The file's fingerprint, `None` when it does not exist.
    fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError>;
    fn read(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replaces the file atomically.
    fn write(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// Whether there was a file to delete.
    fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;
    fn tenants(&self) -> Result<Vec<String>, StoreError>;
    fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError>;
}

/// Adapter files in a local directory.
pub struct LocalDir(PathBuf);

impl LocalDir {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        Ok(LocalDir(dir.to_path_buf()))
    }

    fn path(&self, tenant: &str, id: &str) -> PathBuf {
        self.0.join(tenant).join(format!("{id}.safetensors"))
    }

    /// Names of the entries of `dir` that `keep` maps to a name.
    fn names(dir: &Path, keep: impl Fn(&std::fs::DirEntry) -> Option<String>) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| keep(&e))
            .collect();
        out.sort();
        out
    }
}

impl Backend for LocalDir {
    fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError> {
        Ok(std::fs::metadata(self.path(tenant, id)).ok().map(|m| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            (m.len(), modified.to_string())
        }))
    }

    fn read(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(std::fs::read(self.path(tenant, id)).ok())
    }

    fn write(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(tenant, id);
        crate::home::write_atomic(&path, |w| std::io::Write::write_all(w, bytes))
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))
    }

    fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        Ok(std::fs::remove_file(self.path(tenant, id)).is_ok())
    }

    fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(Self::names(&self.0, |e| {
            e.path()
                .is_dir()
                .then(|| e.file_name().into_string().ok())
                .flatten()
        }))
    }

    fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        Ok(Self::names(&self.0.join(tenant), |e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".safetensors").map(str::to_string)
        }))
    }
}

/// The backend for `--adapters`: a directory, or (with the `object-store`
/// feature) an object store URL such as `s3://bucket/prefix`.
pub fn backend(location: &str) -> Result<Box<dyn Backend>, StoreError> {
    if location.contains("://") {
        #[cfg(feature = "object-store")]
        return Ok(Box::new(object::Objects::open(location)?));
        #[cfg(not(feature = "object-store"))]
        return Err(StoreError::Io(format!(
            "{location}: object store URLs need svfit built with --features s3 (or object-store)"
        )));
    }
    Ok(Box::new(LocalDir::open(Path::new(location))?))
}

pub struct AdapterStore {
    backend: Box<dyn Backend>,
    key: FactorsKey,
    singular: SingularValues,
    budget: usize,
    state: Mutex<State>,
}

/// Tenant and adapter names: safe as file names.
pub fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

impl AdapterStore {
    /// A store over `backend` for adapters of the factors `key` (whose
    /// singular values are `singular`), caching at most `budget` bytes of
    /// deltas.
    pub fn open(
        backend: Box<dyn Backend>,
        key: FactorsKey,
        singular: SingularValues,
        budget: usize,
    ) -> Self {
        AdapterStore {
            backend,
            key,
            singular,
            budget,
            state: Mutex::new(State {
                cache: LruCache::unbounded(),
                pinned: HashSet::new(),
                stats: CacheStats::default(),
            }),
        }
    }

    pub fn key(&self) -> &FactorsKey {
        &self.key
    }

    pub fn singular(&self) -> &SingularValues {
        &self.singular
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the cache
        // inconsistent in a way that matters (entries are whole values).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cache_stats(&self) -> CacheStats {
        let s = self.state();
        CacheStats {
            bytes: s.cache.iter().map(|(_, c)| c.bytes).sum(),
            entries: s.cache.len(),
            ..s.stats
        }
    }

    /// The current version of `tenant/id`, validated, from the cache or
    /// the directory.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let not_found = || StoreError::NotFound(id.to_string());
        let fingerprint = self.backend.stat(tenant, id)?.ok_or_else(not_found)?;
        let name = (tenant.to_string(), id.to_string());
        {
            let mut s = self.state();
            if let Some(c) = s.cache.get(&name) {
                if c.fingerprint == fingerprint {
                    let stored = c.stored.clone();
                    s.stats.hits += 1;
                    return Ok(stored);
                }
            }
            s.stats.misses += 1;
        }
        let bytes = self.backend.read(tenant, id)?.ok_or_else(not_found)?;
        let stored = Arc::new(self.validate(tenant, id, &bytes)?);
        let size = stored
            .deltas
            .deltas
            .iter()
            .map(|(p, d)| p.len() + 4 * d.len())
            .sum::<usize>();
        let mut s = self.state();
        s.stats.loads += 1;
        s.cache.put(
            name,
            Cached {
                stored: stored.clone(),
                fingerprint,
                bytes: size,
            },
        );
        Self::evict(&mut s, self.budget);
        Ok(stored)
    }

    /// Drops least recently used, unpinned entries until the cache fits.
    fn evict(s: &mut State, budget: usize) {
        let mut total: usize = s.cache.iter().map(|(_, c)| c.bytes).sum();
        let mut kept = Vec::new();
        while total > budget {
            let Some((name, entry)) = s.cache.pop_lru() else {
                break;
            };
            if s.pinned.contains(&name) {
                kept.push((name, entry));
                continue;
            }
            total -= entry.bytes;
            s.stats.evictions += 1;
        }
        for (name, entry) in kept {
            s.cache.put(name, entry);
        }
    }

    /// Checks a file's bytes completely against the served factors.
    fn validate(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<Stored, StoreError> {
        let shown = Path::new(id);
        let adapter =
            Adapter::parse(bytes, shown).map_err(|e| StoreError::Invalid(e.to_string()))?;
        // Base and factor id first: a different base is a precondition
        // failure, not a malformed file.
        adapter
            .check_base(shown, &self.key)
            .map_err(|e| StoreError::Mismatch(e.to_string()))?;
        adapter
            .validate(shown, &self.key, &self.singular)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let version = adapter
            .info
            .get(VERSION_KEY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let hash = hex(&sha2::Sha256::digest(bytes)[..6]);
        let deltas: Deltas = adapter.deltas(&self.singular);
        Ok(Stored {
            tenant: tenant.to_string(),
            id: id.to_string(),
            version,
            bytes: bytes.len() as u64,
            deltas: Arc::new(AdapterDeltas {
                key: format!("{tenant}/{id}@v{version}-{hash}"),
                deltas,
            }),
            adapter,
        })
    }

    /// Validates an uploaded file and makes it the next version of
    /// `tenant/id`; nothing is visible unless all of it is valid.
    pub fn put(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let mut stored = self.validate(tenant, id, bytes)?;
        let previous = match self.backend.read(tenant, id)? {
            None => 0,
            Some(old) => Adapter::parse(&old, Path::new(id))
                .ok()
                .and_then(|a| a.info.get(VERSION_KEY).and_then(|v| v.parse().ok()))
                .unwrap_or(1),
        };
        stored
            .adapter
            .info
            .insert(VERSION_KEY.into(), (previous + 1).to_string());
        let bytes = stored
            .adapter
            .to_bytes()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        self.backend.write(tenant, id, &bytes)?;
        // Read back through the cache so the entry matches what is stored.
        self.get(tenant, id)
    }

    pub fn delete(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        if !self.backend.delete(tenant, id)? {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let mut s = self.state();
        let name = (tenant.to_string(), id.to_string());
        s.cache.pop(&name);
        s.pinned.remove(&name);
        Ok(())
    }

    /// Pins (keeps in the host cache) or unpins an adapter.
    pub fn pin(&self, tenant: &str, id: &str, pinned: bool) -> Result<Arc<Stored>, StoreError> {
        let stored = self.get(tenant, id)?;
        let mut s = self.state();
        let name = (tenant.to_string(), id.to_string());
        if pinned {
            s.pinned.insert(name);
        } else {
            s.pinned.remove(&name);
            Self::evict(&mut s, self.budget);
        }
        Ok(stored)
    }

    pub fn pinned_count(&self) -> usize {
        self.state().pinned.len()
    }

    pub fn is_pinned(&self, tenant: &str, id: &str) -> bool {
        self.state()
            .pinned
            .contains(&(tenant.to_string(), id.to_string()))
    }

    /// Tenants that have adapters, sorted.
    pub fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut t = self.backend.tenants()?;
        t.retain(|n| check_name("tenant", n).is_ok());
        Ok(t)
    }

    /// Adapter ids of `tenant`, sorted.
    pub fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        check_name("tenant", tenant)?;
        let mut ids = self.backend.ids(tenant)?;
        ids.retain(|n| check_name("adapter id", n).is_ok());
        Ok(ids)
    }

    /// The deltas of a weighted mix, keyed for the engine by its parts'
    /// keys and weights.
    pub fn mix(&self, parts: &[(Arc<Stored>, f32)]) -> Arc<AdapterDeltas> {
        let key = parts
            .iter()
            .map(|(s, w)| format!("{}*{w}", s.deltas.key))
            .collect::<Vec<_>>()
            .join("+");
        let weighted: Vec<(f32, Deltas)> = parts
            .iter()
            .map(|(s, w)| (*w, s.deltas.deltas.clone()))
            .collect();
        Arc::new(AdapterDeltas {
            key: format!("mix:{key}"),
            deltas: crate::adapter::mix(&weighted),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adapter files in an object store (the `object-store` feature), laid
/// out as in a directory: `<prefix>/<tenant>/<id>.safetensors`. Calls run
/// on the store's own small runtime, so they may come from any thread.
#[cfg(feature = "object-store")]
mod object {
    use object_store::path::Path as ObjectPath;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

    use super::{Backend, Fingerprint, StoreError};

    pub struct Objects {
        store: Box<dyn ObjectStore>,
        prefix: ObjectPath,
        runtime: tokio::runtime::Runtime,
    }

    fn io(e: impl std::fmt::Display) -> StoreError {
        StoreError::Io(e.to_string())
    }

    impl Objects {
        /// Opens `url`; options come from `AWS_*` (and other provider)
        /// environment variables.
        pub fn open(url: &str) -> Result<Self, StoreError> {
            let parsed = url::Url::parse(url).map_err(|e| io(format!("{url}: {e}")))?;
            let options = std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v));
            let (store, prefix) = object_store::parse_url_opts(&parsed, options)
                .map_err(|e| io(format!("{url}: {e}")))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(io)?;
            Ok(Objects {
                store,
                prefix,
                runtime,
            })
        }

        fn path(&self, tenant: &str, id: &str) -> ObjectPath {
            self.prefix
                .clone()
                .join(tenant)
                .join(format!("{id}.safetensors").as_str())
        }

        fn run<T>(&self, f: impl std::future::Future<Output = T> + Send) -> T
        where
            T: Send,
        {
            std::thread::scope(|s| {
                s.spawn(|| self.runtime.block_on(f))
                    .join()
                    .expect("object store call panicked")
            })
        }

        /// Names directly under `dir` (sub-prefixes when `dirs`, else
        /// objects), last path part only.
        fn names(&self, dir: ObjectPath, dirs: bool) -> Result<Vec<String>, StoreError> {
            let listed = self
                .run(self.store.list_with_delimiter(Some(&dir)))
                .map_err(io)?;
            let paths: Vec<ObjectPath> = if dirs {
                listed.common_prefixes
            } else {
                listed.objects.into_iter().map(|o| o.location).collect()
            };
            let mut out: Vec<String> = paths
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .collect();
            out.sort();
            Ok(out)
        }
    }

    impl Backend for Objects {
        fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError> {
            match self.run(self.store.head(&self.path(tenant, id))) {
                Ok(meta) => Ok(Some((
                    meta.size,
                    meta.e_tag
                        .unwrap_or_else(|| meta.last_modified.to_rfc3339()),
                ))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(io(e)),
            }
        }

        fn read(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let path = self.path(tenant, id);
            let result = self.run(async { self.store.get(&path).await?.bytes().await });
            match result {
                Ok(bytes) => Ok(Some(bytes.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(io(e)),
            }
        }

        fn write(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
            let payload = PutPayload::from(bytes.to_vec());
            self.run(self.store.put(&self.path(tenant, id), payload))
                .map(|_| ())
                .map_err(io)
        }

        fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
            if self.stat(tenant, id)?.is_none() {
                return Ok(false);
            }
            self.run(self.store.delete(&self.path(tenant, id)))
                .map_err(io)?;
            Ok(true)
        }

        fn tenants(&self) -> Result<Vec<String>, StoreError> {
            self.names(self.prefix.clone(), true)
        }

        fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
            let dir = self.prefix.clone().join(tenant);
            Ok(self
                .names(dir, false)?
                .into_iter()
                .filter_map(|n| n.strip_suffix(".safetensors").map(str::to_string))
                .collect())
        }
    }
}
