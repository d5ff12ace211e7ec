//! Where the server's adapters live: a local directory, one namespace per
//! tenant (`DIR/<tenant>/<id>.safetensors`) — or, with the `object-store`
//! feature, the same layout in an object store (`s3://bucket/prefix` with
//! the `s3` feature, `memory://`) — and a host cache of validated deltas
//! bounded in bytes (least recently used out first; pinned adapters stay).
//!
//! Each file carries its version in its metadata (`svfit.version`). An
//! upload is a compare-and-swap through [`Backend::update`]: the backend
//! reads the current file, the store computes the next file from it
//! (version + 1), and the backend writes it only if nobody else wrote in
//! between — a lock on the tenant's directory for local files, a
//! conditional put for object stores. So concurrent uploads of one id get
//! distinct, increasing versions, and a reader sees the old file or the new
//! one, never a mix. Files dropped into the directory are picked up on
//! their first use (and re-read when they change: the cache remembers each
//! file's size and modification time or entity tag). Every entry handed to
//! the engine is keyed by version and content, so a replaced adapter never
//! shares a slot or a cache entry with its old version.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use lru::LruCache;
use sha2::Digest;

use crate::adapter::{Adapter, AdapterDeltas, AdapterError, Deltas};
use crate::factors::{FactorsKey, SingularValues};

pub const VERSION_KEY: &str = "svfit.version";

/// Metadata key of the time an upload was stored (Unix seconds).
pub const CREATED_KEY: &str = "svfit.created";

/// Longest tenant or adapter name.
pub const MAX_NAME: usize = 128;

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("adapter '{0}' not found")]
    NotFound(String),
    #[error("invalid {what} '{}' ({} bytes): use 1 to {MAX_NAME} of A-Z a-z 0-9 . _ - (not starting with '.')", shown(name), name.len())]
    InvalidName { what: &'static str, name: String },
    /// The file is not a valid adapter for the served factors.
    #[error(transparent)]
    Invalid(AdapterError),
    /// The file is an adapter of another base model or factor set.
    #[error(transparent)]
    Mismatch(AdapterError),
    #[error("tenant '{tenant}' already pins {quota} adapters, its quota")]
    PinQuota { tenant: String, quota: usize },
    #[error("{pinned} adapters are pinned; at most {limit} may be (one device slot stays free)")]
    PinBudget { pinned: usize, limit: usize },
    #[error("adapter '{0}' kept changing while it was being written; retry")]
    Conflict(String),
    #[error("adapter store: {context}: {source}")]
    Io { context: String, source: Source },
}

impl StoreError {
    fn io(context: impl std::fmt::Display, source: impl Into<Source>) -> Self {
        StoreError::Io {
            context: context.to_string(),
            source: source.into(),
        }
    }
}

/// A client-supplied name as it may appear in a message: at most 64
/// characters of it.
pub fn shown(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
    }
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
    /// Freshness checks (one per lookup) and the time they took in all.
    pub checks: u64,
    pub check_seconds: f64,
    /// Lookups answered from the cache because the store was unreachable.
    pub served_unreachable: u64,
    pub bytes: usize,
    pub entries: usize,
}

/// How many adapters may be pinned: in all (the device slots less one, so
/// unpinned adapters always have a slot) and per tenant.
#[derive(Clone, Copy, Debug)]
pub struct PinLimits {
    pub total: usize,
    pub per_tenant: usize,
}

struct Cached {
    stored: Arc<Stored>,
    /// The file's fingerprint when read.
    fingerprint: Fingerprint,
    bytes: usize,
}

type Name = (String, String);

struct State {
    cache: LruCache<Name, Cached>,
    pinned: HashSet<Name>,
    stats: CacheStats,
    /// Since when the store has failed freshness checks (`None`: it answers).
    unreachable_since: Option<Instant>,
}

/// Identifies one state of a file: size and modification time (or tag).
pub type Fingerprint = (u64, String);

/// Computes the file to write from the current one (`None`: no file yet).
pub type NextFile<'a> = dyn FnMut(Option<&[u8]>) -> Result<Vec<u8>, StoreError> + 'a;

/// Storage of adapter files by (tenant, id).
pub trait Backend: Send + Sync {
    /// The file's fingerprint, `None` when it does not exist.
    fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError>;
    /// The file and the fingerprint of exactly those bytes.
    fn read(&self, tenant: &str, id: &str) -> Result<Option<(Vec<u8>, Fingerprint)>, StoreError>;
    /// Replaces the file with `next(current)`, atomically and only if no
    /// other writer replaced it in between (`next` may be called again
    /// with the newer file).
    fn update(&self, tenant: &str, id: &str, next: &mut NextFile<'_>) -> Result<(), StoreError>;
    /// Whether there was a file to delete.
    fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;
    fn tenants(&self) -> Result<Vec<String>, StoreError>;
    fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError>;
}

/// Adapter files in a local directory.
pub struct LocalDir(PathBuf);

impl LocalDir {
    /// Opens (creating) `dir` and removes the temporary files that killed
    /// processes left behind.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir.display(), e))?;
        let local = LocalDir(dir.to_path_buf());
        for tenant in local.tenants()? {
            crate::home::remove_stale_temps(&dir.join(tenant));
        }
        Ok(local)
    }

    fn path(&self, tenant: &str, id: &str) -> PathBuf {
        self.0.join(tenant).join(format!("{id}.safetensors"))
    }

    /// Holds an exclusive lock on the tenant's directory (created if
    /// missing) until dropped: writers of that tenant take turns, in this
    /// process and in others that share the directory.
    fn lock(&self, tenant: &str) -> Result<std::fs::File, StoreError> {
        let dir = self.0.join(tenant);
        let fail = |e| StoreError::io(dir.display(), e);
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let handle = std::fs::File::open(&dir).map_err(fail)?;
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

impl Backend for LocalDir {
    fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError> {
        let path = self.path(tenant, id);
        Ok(absent_is_none(std::fs::metadata(&path), &path)?.map(|m| local_fingerprint(&m)))
    }

    fn read(&self, tenant: &str, id: &str) -> Result<Option<(Vec<u8>, Fingerprint)>, StoreError> {
        let path = self.path(tenant, id);
        let Some(mut file) = absent_is_none(std::fs::File::open(&path), &path)? else {
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

    fn update(&self, tenant: &str, id: &str, next: &mut NextFile<'_>) -> Result<(), StoreError> {
        let _lock = self.lock(tenant)?;
        let current = self.read(tenant, id)?.map(|(bytes, _)| bytes);
        let bytes = next(current.as_deref())?;
        let path = self.path(tenant, id);
        crate::home::write_atomic(&path, |w| std::io::Write::write_all(w, &bytes))
            .map_err(|e| StoreError::io(path.display(), e))
    }

    fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let _lock = self.lock(tenant)?;
        let path = self.path(tenant, id);
        Ok(absent_is_none(std::fs::remove_file(&path), &path)?.is_some())
    }

    fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Self::names(&self.0, |e| {
            e.file_type()
                .ok()?
                .is_dir()
                .then(|| e.file_name().into_string().ok())
                .flatten()
        })
    }

    fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        Self::names(&self.0.join(tenant), |e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".safetensors").map(str::to_string)
        })
    }
}

/// The backend for `--adapters`: a directory, or (with the `object-store`
/// feature) an object store URL such as `s3://bucket/prefix`.
pub fn backend(location: &str) -> Result<Box<dyn Backend>, StoreError> {
    if location.contains("://") {
        #[cfg(feature = "object-store")]
        return Ok(Box::new(object::Objects::open(location)?));
        #[cfg(not(feature = "object-store"))]
        return Err(StoreError::io(
            location,
            "object store URLs need svfit built with --features s3 (or object-store)",
        ));
    }
    Ok(Box::new(LocalDir::open(Path::new(location))?))
}

pub struct AdapterStore {
    backend: Box<dyn Backend>,
    key: FactorsKey,
    singular: SingularValues,
    budget: usize,
    pins: PinLimits,
    state: Mutex<State>,
}

/// Tenant and adapter names: safe as file names.
pub fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
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

/// The version recorded in an adapter file's metadata.
fn version_of(adapter: &Adapter) -> Option<u64> {
    adapter.info.get(VERSION_KEY).and_then(|v| v.parse().ok())
}

/// Seconds since the Unix epoch (0 on a clock before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Stored {
    /// When this version was uploaded (Unix seconds; 0 for a file placed
    /// in the store by hand).
    pub fn created(&self) -> u64 {
        self.adapter
            .info
            .get(CREATED_KEY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl AdapterStore {
    /// A store over `backend` for adapters of the factors `key` (whose
    /// singular values are `singular`), caching at most `budget` bytes of
    /// deltas, with at most `pins` pinned adapters.
    pub fn open(
        backend: Box<dyn Backend>,
        key: FactorsKey,
        singular: SingularValues,
        budget: usize,
        pins: PinLimits,
    ) -> Self {
        AdapterStore {
            backend,
            key,
            singular,
            budget,
            pins,
            state: Mutex::new(State {
                cache: LruCache::unbounded(),
                pinned: HashSet::new(),
                stats: CacheStats::default(),
                unreachable_since: None,
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
        // A std Mutex: it is held for map operations only, never across I/O
        // or an await. A panic while holding it cannot leave the cache
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
    /// the backend.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let not_found = || StoreError::NotFound(id.to_string());
        let name = (tenant.to_string(), id.to_string());
        let started = Instant::now();
        let stat = self.backend.stat(tenant, id);
        let took = started.elapsed().as_secs_f64();
        {
            // One lock for the check's counters and the cache lookup.
            let mut s = self.state();
            s.stats.checks += 1;
            s.stats.check_seconds += took;
            let fingerprint = match stat {
                Ok(found) => {
                    if let Some(since) = s.unreachable_since.take() {
                        tracing::info!(
                            after_s = since.elapsed().as_secs_f64(),
                            "adapter store reachable again"
                        );
                    }
                    found.ok_or_else(not_found)?
                }
                Err(e) => return Self::cached_while_unreachable(&mut s, &name, e),
            };
            if let Some(c) = s.cache.get(&name) {
                if c.fingerprint == fingerprint {
                    let stored = c.stored.clone();
                    s.stats.hits += 1;
                    return Ok(stored);
                }
            }
            s.stats.misses += 1;
        }
        let (bytes, fingerprint) = self.backend.read(tenant, id)?.ok_or_else(not_found)?;
        let stored = Arc::new(self.validate(tenant, id, &bytes)?);
        let size = stored
            .deltas
            .deltas
            .iter()
            .map(|(p, d)| p.len() + 4 * d.len())
            .sum::<usize>();
        let mut s = self.state();
        s.stats.loads += 1;
        // A slower reader of an older file must not replace a newer entry.
        let newer_cached = s
            .cache
            .peek(&name)
            .is_some_and(|c| c.stored.version > stored.version);
        if !newer_cached {
            s.cache.put(
                name,
                Cached {
                    stored: stored.clone(),
                    fingerprint,
                    bytes: size,
                },
            );
        }
        Self::evict(&mut s, self.budget);
        Ok(stored)
    }

    /// The cached version of `name` when the store cannot be asked: an
    /// outage of the store does not stop adapters that were in use. It is
    /// the version every replica served before the outage, since no upload
    /// or delete can succeed while the store is unreachable (the one
    /// exception: a write that lands just as this replica loses the store).
    fn cached_while_unreachable(
        s: &mut State,
        name: &Name,
        error: StoreError,
    ) -> Result<Arc<Stored>, StoreError> {
        let Some(cached) = s.cache.get(name) else {
            return Err(error);
        };
        let stored = cached.stored.clone();
        s.stats.served_unreachable += 1;
        // Logged once per outage, not once per request.
        if s.unreachable_since.is_none() {
            s.unreachable_since = Some(Instant::now());
            tracing::warn!(%error, "adapter store unreachable; serving cached adapters");
        }
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
        let adapter = self.check(id, bytes)?;
        Ok(self.stored(tenant, id, adapter, bytes))
    }

    /// The adapter in `bytes`, if it is one for the served factors.
    fn check(&self, id: &str, bytes: &[u8]) -> Result<Adapter, StoreError> {
        let shown = Path::new(id);
        let adapter = Adapter::parse(bytes, shown).map_err(StoreError::Invalid)?;
        // Base and factor id first: a different base is a precondition
        // failure, not a malformed file.
        adapter
            .check_base(shown, &self.key)
            .map_err(StoreError::Mismatch)?;
        adapter
            .validate(shown, &self.key, &self.singular)
            .map_err(StoreError::Invalid)?;
        Ok(adapter)
    }

    /// What the store knows of a checked `adapter` whose file is `bytes`.
    fn stored(&self, tenant: &str, id: &str, adapter: Adapter, bytes: &[u8]) -> Stored {
        let version = version_of(&adapter).unwrap_or(1);
        let hash = hex(&sha2::Sha256::digest(bytes)[..6]);
        let deltas: Deltas = adapter.deltas(&self.singular);
        Stored {
            tenant: tenant.to_string(),
            id: id.to_string(),
            version,
            bytes: bytes.len() as u64,
            deltas: Arc::new(AdapterDeltas {
                key: format!("{tenant}/{id}@v{version}-{hash}"),
                owner: Some(format!("{tenant}/{id}")),
                version,
                deltas,
            }),
            adapter,
        }
    }

    /// Validates an uploaded file and makes it the next version of
    /// `tenant/id`; nothing is visible unless all of it is valid, and
    /// concurrent uploads of one id get distinct, increasing versions.
    pub fn put(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let mut adapter = self.check(id, bytes)?;
        let mut written = Vec::new();
        self.backend.update(tenant, id, &mut |current| {
            // A current file that cannot be read still had a version: its
            // successor is at least 2, and after any version we can read.
            let previous = current.map_or(0, |old| {
                Adapter::parse(old, Path::new(id))
                    .ok()
                    .and_then(|a| version_of(&a))
                    .unwrap_or(1)
            });
            adapter
                .info
                .insert(VERSION_KEY.into(), previous.saturating_add(1).to_string());
            adapter
                .info
                .insert(CREATED_KEY.into(), unix_now().to_string());
            written = adapter
                .to_bytes()
                .map_err(|e| StoreError::io(format!("encoding {}", shown(id)), e))?;
            Ok(written.clone())
        })?;
        // What this upload wrote (a concurrent upload may already have
        // replaced it); the cache picks the stored file up on its next get.
        Ok(Arc::new(self.stored(tenant, id, adapter, &written)))
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

    /// Pins (keeps in the host cache) or unpins an adapter, within the
    /// pin limits.
    pub fn pin(&self, tenant: &str, id: &str, pinned: bool) -> Result<Arc<Stored>, StoreError> {
        let stored = self.get(tenant, id)?;
        let mut s = self.state();
        let name = (tenant.to_string(), id.to_string());
        if pinned {
            if !s.pinned.contains(&name) {
                let of_tenant = s.pinned.iter().filter(|(t, _)| t == tenant).count();
                if of_tenant >= self.pins.per_tenant {
                    return Err(StoreError::PinQuota {
                        tenant: tenant.to_string(),
                        quota: self.pins.per_tenant,
                    });
                }
                if s.pinned.len() >= self.pins.total {
                    return Err(StoreError::PinBudget {
                        pinned: s.pinned.len(),
                        limit: self.pins.total,
                    });
                }
            }
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
        let weighted: Vec<(f32, &Deltas)> =
            parts.iter().map(|(s, w)| (*w, &s.deltas.deltas)).collect();
        Arc::new(AdapterDeltas {
            key: format!("mix:{key}"),
            owner: None,
            version: 0,
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
    use object_store::{
        ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
    };

    use super::{Backend, Fingerprint, NextFile, StoreError};

    /// Conditional writes that lose to another writer are retried this
    /// many times before the upload fails with `Conflict`.
    const UPDATE_ATTEMPTS: usize = 16;

    /// Bounds on one call to the store. Every request checks its adapter's
    /// version with one call, so while the store is unreachable a request
    /// for a cached adapter waits at most this long (with the retries
    /// below) before it is served from the cache; a refused connection
    /// fails at once.
    const CONNECT_TIMEOUT: &str = "2s";
    const CALL_TIMEOUT: &str = "10s";

    /// Few, quick retries (the client's default is ten over three minutes):
    /// a request waits on them.
    #[cfg(feature = "s3")]
    fn retry() -> object_store::RetryConfig {
        use std::time::Duration;
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
        }
    }

    pub struct Objects {
        store: Box<dyn ObjectStore>,
        prefix: ObjectPath,
        runtime: tokio::runtime::Runtime,
    }

    impl Objects {
        /// Opens `url`; options come from `AWS_*` environment variables
        /// (`AWS_TIMEOUT` and `AWS_CONNECT_TIMEOUT` override ours).
        pub fn open(url: &str) -> Result<Self, StoreError> {
            let fail = |e: object_store::Error| StoreError::io(url, e);
            let parsed = url::Url::parse(url).map_err(|e| StoreError::io(url, e))?;
            let options = [
                ("connect_timeout".to_string(), CONNECT_TIMEOUT.to_string()),
                ("timeout".to_string(), CALL_TIMEOUT.to_string()),
            ]
            .into_iter()
            .chain(
                std::env::vars()
                    .filter(|(k, _)| k.starts_with("AWS_"))
                    .map(|(k, v)| (k.to_ascii_lowercase(), v)),
            );
            let (store, prefix): (Box<dyn ObjectStore>, ObjectPath) =
                match object_store::ObjectStoreScheme::parse(&parsed)
                    .map_err(|e| StoreError::io(url, e))?
                {
                    #[cfg(feature = "s3")]
                    (object_store::ObjectStoreScheme::AmazonS3, prefix) => {
                        let prefix = ObjectPath::parse(prefix).map_err(|e| fail(e.into()))?;
                        let mut builder = object_store::aws::AmazonS3Builder::new()
                            .with_url(url)
                            .with_retry(retry());
                        for (key, value) in options {
                            if let Ok(key) = key.parse() {
                                builder = builder.with_config(key, value);
                            }
                        }
                        (Box::new(builder.build().map_err(fail)?), prefix)
                    }
                    _ => object_store::parse_url_opts(&parsed, options).map_err(fail)?,
                };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| StoreError::io("starting the object store runtime", e))?;
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
                match s.spawn(|| self.runtime.block_on(f)).join() {
                    Ok(v) => v,
                    // The object store client's own bug: not ours to hide.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            })
        }

        /// Names directly under `dir` (sub-prefixes when `dirs`, else
        /// objects), last path part only.
        fn names(&self, dir: ObjectPath, dirs: bool) -> Result<Vec<String>, StoreError> {
            let listed = self
                .run(self.store.list_with_delimiter(Some(&dir)))
                .map_err(|e| StoreError::io(&dir, e))?;
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

        /// The object's bytes and the version to condition a put on.
        fn read_versioned(
            &self,
            path: &ObjectPath,
        ) -> Result<Option<(Vec<u8>, Fingerprint, UpdateVersion)>, StoreError> {
            let result = self.run(async {
                let got = self.store.get(path).await?;
                let meta = got.meta.clone();
                Ok::<_, object_store::Error>((got.bytes().await?, meta))
            });
            match result {
                Ok((bytes, meta)) => {
                    let fingerprint = fingerprint(&meta);
                    let version = UpdateVersion {
                        e_tag: meta.e_tag,
                        version: meta.version,
                    };
                    Ok(Some((bytes.to_vec(), fingerprint, version)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(StoreError::io(path, e)),
            }
        }
    }

    fn fingerprint(meta: &object_store::ObjectMeta) -> Fingerprint {
        (
            meta.size,
            meta.e_tag
                .clone()
                .unwrap_or_else(|| meta.last_modified.to_rfc3339()),
        )
    }

    impl Backend for Objects {
        fn stat(&self, tenant: &str, id: &str) -> Result<Option<Fingerprint>, StoreError> {
            let path = self.path(tenant, id);
            match self.run(self.store.head(&path)) {
                Ok(meta) => Ok(Some(fingerprint(&meta))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(StoreError::io(&path, e)),
            }
        }

        fn read(
            &self,
            tenant: &str,
            id: &str,
        ) -> Result<Option<(Vec<u8>, Fingerprint)>, StoreError> {
            Ok(self
                .read_versioned(&self.path(tenant, id))?
                .map(|(bytes, fingerprint, _)| (bytes, fingerprint)))
        }

        fn update(
            &self,
            tenant: &str,
            id: &str,
            next: &mut NextFile<'_>,
        ) -> Result<(), StoreError> {
            let path = self.path(tenant, id);
            for _ in 0..UPDATE_ATTEMPTS {
                let current = self.read_versioned(&path)?;
                let bytes = next(current.as_ref().map(|(b, _, _)| b.as_slice()))?;
                let mode = match current {
                    Some((_, _, version)) => PutMode::Update(version),
                    None => PutMode::Create,
                };
                let options = PutOptions {
                    mode,
                    ..Default::default()
                };
                let put = self.store.put_opts(&path, PutPayload::from(bytes), options);
                match self.run(put) {
                    Ok(_) => return Ok(()),
                    // Another writer won: compute the next file from theirs.
                    Err(
                        object_store::Error::Precondition { .. }
                        | object_store::Error::AlreadyExists { .. },
                    ) => continue,
                    Err(e) => return Err(StoreError::io(&path, e)),
                }
            }
            Err(StoreError::Conflict(format!("{tenant}/{id}")))
        }

        fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
            if self.stat(tenant, id)?.is_none() {
                return Ok(false);
            }
            let path = self.path(tenant, id);
            self.run(self.store.delete(&path))
                .map_err(|e| StoreError::io(&path, e))?;
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
