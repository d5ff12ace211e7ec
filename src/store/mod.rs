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
//!
//! The store is async: a [`Backend`]'s calls are futures of the caller's
//! runtime (the server's), awaited where a request is served, and the CPU
//! work of a new file (parsing, validating, computing its deltas) runs on
//! that runtime's blocking pool. A thread outside the runtime calls through
//! the runtime's `Handle::block_on`. The backends live in `local.rs` and
//! `object.rs` (the `object-store` feature).

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use lru::LruCache;

use crate::adapter::{Adapter, AdapterDeltas, AdapterError, Deltas, LowRanks};
use crate::factors::{FactorsKey, SingularValues};
use crate::lora::LoraLimits;

mod checker;
mod local;

use checker::Checker;
#[cfg(feature = "object-store")]
pub mod object;

pub use local::LocalDir;

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
    /// Work handed to the runtime's blocking pool did not finish (it
    /// panicked, or the runtime is shutting down).
    #[error("{0}")]
    Internal(String),
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

impl Cached {
    fn is_lora(&self) -> bool {
        !self.stored.deltas.lora.is_empty()
    }
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

/// A file's bytes and the fingerprint of exactly those bytes.
pub type Contents = (Vec<u8>, Fingerprint);

/// Computes the file to write from the current one (`None`: no file yet).
pub type NextFile<'a> = dyn FnMut(Option<&[u8]>) -> Result<Vec<u8>, StoreError> + Send + 'a;

/// What a [`Backend`] call returns, `T` or the error: a boxed future, so
/// that the store holds its backend as `dyn Backend` (chosen at startup
/// from `--adapters`).
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Storage of adapter files by (tenant, id). Calls are awaited on the
/// caller's runtime; none blocks the thread that polls it.
pub trait Backend: Send + Sync {
    /// The file's fingerprint, `None` when it does not exist.
    fn stat<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Fingerprint>>;
    /// The file and the fingerprint of exactly those bytes.
    fn read<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Contents>>;
    /// Replaces the file with `next(current)`, atomically and only if no
    /// other writer replaced it in between (`next` may be called again
    /// with the newer file).
    fn update<'a>(&'a self, tenant: &'a str, id: &'a str, next: &'a mut NextFile) -> Call<'a, ()>;
    /// Whether there was a file to delete.
    fn delete<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, bool>;
    fn tenants(&self) -> Call<'_, Vec<String>>;
    fn ids<'a>(&'a self, tenant: &'a str) -> Call<'a, Vec<String>>;
}

/// Runs `f` on the runtime's blocking pool: file I/O and the CPU work of
/// checking a file stay off the threads that serve requests.
async fn off_async<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?
}

/// The backend for `--adapters`: a directory, or (with the `object-store`
/// feature) an object store URL such as `s3://bucket/prefix`.
pub fn backend(location: &str) -> Result<Box<dyn Backend>, StoreError> {
    backend_with(location, "safetensors")
}

/// The same kind of backend for files named `<id>.<extension>`.
pub fn backend_with(
    location: &str,
    extension: &'static str,
) -> Result<Box<dyn Backend>, StoreError> {
    if location.contains("://") {
        #[cfg(feature = "object-store")]
        return Ok(Box::new(
            object::Objects::open(location)?.with_extension(extension),
        ));
        #[cfg(not(feature = "object-store"))]
        return Err(StoreError::io(
            location,
            "object store URLs need svfit built with --features s3 (or object-store)",
        ));
    }
    Ok(Box::new(LocalDir::open_with(
        Path::new(location),
        extension,
    )?))
}

pub struct AdapterStore {
    backend: Box<dyn Backend>,
    /// Shared with the blocking pool, where files are checked.
    checker: Arc<Checker>,
    /// Bytes of cached SVFit adapters, and of cached LoRAs, at most.
    budget: usize,
    lora_budget: usize,
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

/// What a version check found: the cached entry is current, or the file
/// must be read.
enum Checked {
    Current(Arc<Stored>),
    Changed,
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
            checker: Arc::new(Checker {
                key,
                singular,
                lora: None,
            }),
            budget,
            lora_budget: 0,
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
        &self.checker.key
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
            ..s.stats
        }
    }

    /// The current version of `tenant/id`, validated, from the cache or
    /// the backend.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let name = (tenant.to_string(), id.to_string());
        match self.check_version(&name).await? {
            Checked::Current(stored) => Ok(stored),
            Checked::Changed => self.load(name).await,
        }
    }

    /// The version check of every lookup: the file's fingerprint against
    /// the cached entry's.
    async fn check_version(&self, name: &Name) -> Result<Checked, StoreError> {
        let (tenant, id) = name;
        let started = Instant::now();
        let stat = self.backend.stat(tenant, id).await;
        let took = started.elapsed().as_secs_f64();
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
                found.ok_or_else(|| StoreError::NotFound(id.to_string()))?
            }
            Err(e) => return Self::cached_while_unreachable(&mut s, name, e).map(Checked::Current),
        };
        if let Some(c) = s.cache.get(name) {
            if c.fingerprint == fingerprint {
                let stored = c.stored.clone();
                s.stats.hits += 1;
                return Ok(Checked::Current(stored));
            }
        }
        s.stats.misses += 1;
        Ok(Checked::Changed)
    }

    /// Reads and validates the file of `name` and caches it.
    async fn load(&self, name: Name) -> Result<Arc<Stored>, StoreError> {
        let (tenant, id) = &name;
        let (bytes, fingerprint) = self
            .backend
            .read(tenant, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let checker = self.checker.clone();
        let (t, i) = name.clone();
        let stored = Arc::new(off_async(move || checker.validate(&t, &i, &bytes)).await?);
        let size = stored
            .deltas
            .deltas
            .iter()
            .map(|(p, d)| p.len() + 4 * d.len())
            .sum::<usize>()
            + stored
                .deltas
                .lora
                .iter()
                .map(|(p, u)| p.len() + 4 * (u.a.len() + u.b.len()))
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
        Self::evict(&mut s, self.budget, self.lora_budget);
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

    /// Drops least recently used, unpinned entries of each kind until it
    /// fits its budget: SVFit adapters `budget`, LoRAs `lora_budget`.
    fn evict(s: &mut State, budget: usize, lora_budget: usize) {
        for lora in [false, true] {
            let limit = if lora { lora_budget } else { budget };
            let mut total: usize = s
                .cache
                .iter()
                .filter(|(_, c)| c.is_lora() == lora)
                .map(|(_, c)| c.bytes)
                .sum();
            if total <= limit {
                continue;
            }
            // Least recently used first.
            let order: Vec<Name> = s
                .cache
                .iter()
                .rev()
                .filter(|(n, c)| c.is_lora() == lora && !s.pinned.contains(*n))
                .map(|(n, _)| n.clone())
                .collect();
            for name in order {
                if total <= limit {
                    break;
                }
                if let Some(entry) = s.cache.pop(&name) {
                    total -= entry.bytes;
                    s.stats.evictions += 1;
                }
            }
        }
    }

    /// Validates an uploaded file and makes it the next version of
    /// `tenant/id`; nothing is visible unless all of it is valid, and
    /// concurrent uploads of one id get distinct, increasing versions.
    pub async fn put(
        &self,
        tenant: &str,
        id: &str,
        bytes: Vec<u8>,
    ) -> Result<Arc<Stored>, StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let checker = self.checker.clone();
        let shown_id = id.to_string();
        let mut adapter = off_async(move || checker.check(&shown_id, &bytes)).await?;
        let mut written = Vec::new();
        let mut next = |current: Option<&[u8]>| {
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
        };
        self.backend.update(tenant, id, &mut next).await?;
        // What this upload wrote (a concurrent upload may already have
        // replaced it); the cache picks the stored file up on its next get.
        let checker = self.checker.clone();
        let (t, i) = (tenant.to_string(), id.to_string());
        let stored = off_async(move || Ok(checker.stored(&t, &i, adapter, &written))).await?;
        Ok(Arc::new(stored))
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        if !self.backend.delete(tenant, id).await? {
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
    pub async fn pin(
        &self,
        tenant: &str,
        id: &str,
        pinned: bool,
    ) -> Result<Arc<Stored>, StoreError> {
        let stored = self.get(tenant, id).await?;
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
            Self::evict(&mut s, self.budget, self.lora_budget);
        }
        Ok(stored)
    }

    pub fn is_pinned(&self, tenant: &str, id: &str) -> bool {
        self.state()
            .pinned
            .contains(&(tenant.to_string(), id.to_string()))
    }

    /// Tenants that have adapters, sorted.
    pub async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut t = self.backend.tenants().await?;
        t.retain(|n| check_name("tenant", n).is_ok());
        Ok(t)
    }

    /// Adapter ids of `tenant`, sorted.
    pub async fn ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        check_name("tenant", tenant)?;
        let mut ids = self.backend.ids(tenant).await?;
        ids.retain(|n| check_name("adapter id", n).is_ok());
        Ok(ids)
    }

    /// Accepts LoRAs that fit `limits` (the engine's LoRA tables), caching
    /// at most `budget` bytes of them (beside the SVFit adapters' budget).
    pub fn serving_loras(mut self, limits: LoraLimits, budget: usize) -> Self {
        self.lora_budget = budget;
        self.checker = Arc::new(Checker {
            key: self.checker.key.clone(),
            singular: self.checker.singular.clone(),
            lora: Some(limits),
        });
        self
    }

    /// The deltas of a weighted mix, keyed for the engine by its parts'
    /// keys and weights: the SVFit parts' weighted deltas, and the LoRA
    /// parts side by side (exact: see [`crate::adapter::mix_lora`]). CPU
    /// work in proportion to the parts' sizes: call it off the async
    /// threads.
    pub fn mix(&self, parts: &[(Arc<Stored>, f32)]) -> Arc<AdapterDeltas> {
        let key = parts
            .iter()
            .map(|(s, w)| format!("{}*{w}", s.deltas.key))
            .collect::<Vec<_>>()
            .join("+");
        let weighted: Vec<(f32, &Deltas)> = parts
            .iter()
            .filter(|(s, _)| !s.deltas.deltas.is_empty())
            .map(|(s, w)| (*w, &s.deltas.deltas))
            .collect();
        let loras: Vec<(f32, &LowRanks)> = parts
            .iter()
            .filter(|(s, _)| !s.deltas.lora.is_empty())
            .map(|(s, w)| (*w, &s.deltas.lora))
            .collect();
        Arc::new(AdapterDeltas {
            key: format!("mix:{key}"),
            owner: None,
            version: 0,
            deltas: crate::adapter::mix(&weighted),
            lora: crate::adapter::mix_lora(&loras),
        })
    }
}
