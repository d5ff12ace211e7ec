//! Where the server's adapters live: a local directory, one namespace per
//! tenant (`DIR/<tenant>/<id>.safetensors`), and a host cache of validated
//! deltas bounded in bytes (least recently used out first; pinned adapters
//! stay).
//!
//! Each file carries its version in its metadata (`svfit.version`); an
//! upload of an existing id writes version + 1, atomically, so a reader
//! sees the old file or the new one. Files dropped into the directory are
//! picked up on their first use (and re-read when they change on disk: the
//! cache remembers each file's size and modification time). Every entry
//! handed to the engine is keyed by version and content, so a replaced
//! adapter never shares a slot or a cache entry with its old version.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lru::LruCache;
use sha2::Digest;

use crate::adapter::{Adapter, AdapterError, Deltas};
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
    /// The file's (size, modification time) when read.
    fingerprint: (u64, Option<SystemTime>),
    bytes: usize,
}

struct State {
    cache: LruCache<(String, String), Cached>,
    pinned: HashSet<(String, String)>,
    stats: CacheStats,
}

pub struct AdapterStore {
    dir: PathBuf,
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
    /// A store in `dir` for adapters of the factors `key` (whose singular
    /// values are `singular`), caching at most `budget` bytes of deltas.
    pub fn open(
        dir: &Path,
        key: FactorsKey,
        singular: SingularValues,
        budget: usize,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        Ok(AdapterStore {
            dir: dir.to_path_buf(),
            key,
            singular,
            budget,
            state: Mutex::new(State {
                cache: LruCache::unbounded(),
                pinned: HashSet::new(),
                stats: CacheStats::default(),
            }),
        })
    }

    pub fn key(&self) -> &FactorsKey {
        &self.key
    }

    pub fn singular(&self) -> &SingularValues {
        &self.singular
    }

    fn path(&self, tenant: &str, id: &str) -> PathBuf {
        self.dir.join(tenant).join(format!("{id}.safetensors"))
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
        let path = self.path(tenant, id);
        let meta = std::fs::metadata(&path).map_err(|_| StoreError::NotFound(id.to_string()))?;
        let fingerprint = (meta.len(), meta.modified().ok());
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
        let bytes = std::fs::read(&path).map_err(|_| StoreError::NotFound(id.to_string()))?;
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
        let mismatch = |e: AdapterError| StoreError::Mismatch(e.to_string());
        // Base and factor id first: a different base is a precondition
        // failure, not a malformed file.
        adapter
            .validate(shown, &self.key, &[])
            .or_else(|e| match e {
                AdapterError::Tensor { .. } => Ok(()),
                other => Err(mismatch(other)),
            })?;
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
        let path = self.path(tenant, id);
        let mut stored = self.validate(tenant, id, bytes)?;
        let previous = std::fs::read(&path)
            .ok()
            .and_then(|b| Adapter::parse(&b, &path).ok())
            .and_then(|a| a.info.get(VERSION_KEY).and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0);
        let version = previous.max(if path.exists() { 1 } else { 0 }) + 1;
        stored
            .adapter
            .info
            .insert(VERSION_KEY.into(), version.to_string());
        stored
            .adapter
            .write(&path)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        // Re-read through the cache so the entry matches the file on disk.
        self.get(tenant, id)
    }

    pub fn delete(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        check_name("tenant", tenant)?;
        check_name("adapter id", id)?;
        let path = self.path(tenant, id);
        std::fs::remove_file(&path).map_err(|_| StoreError::NotFound(id.to_string()))?;
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

    pub fn is_pinned(&self, tenant: &str, id: &str) -> bool {
        self.state()
            .pinned
            .contains(&(tenant.to_string(), id.to_string()))
    }

    /// Tenants with a directory, sorted.
    pub fn tenants(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name("tenant", n).is_ok())
            .collect();
        out.sort();
        out
    }

    /// Adapter ids of `tenant`, sorted.
    pub fn ids(&self, tenant: &str) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.dir.join(tenant))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".safetensors").map(str::to_string))
            .filter(|n| check_name("adapter id", n).is_ok())
            .collect();
        out.sort();
        out
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
