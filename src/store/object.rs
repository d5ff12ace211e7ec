//! Adapter files in an object store (the `object-store` feature), laid out
//! as in a directory: `<prefix>/<tenant>/<id>.safetensors` (or another
//! extension, for the files API's files).
//!
//! Calls are futures of the caller's runtime (the server's): no runtime
//! and no thread of their own. The HTTP client's pooled connections are
//! tasks of the runtime that opened them, so one [`Objects`] is used from
//! one runtime — from async code, or through that runtime's
//! `Handle::block_on` on a thread outside it.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{Backend, Call, Contents, Fingerprint, NextFile, StoreError};

/// Conditional writes that lose to another writer are retried this many
/// times before the upload fails with `Conflict`.
const UPDATE_ATTEMPTS: usize = 16;

/// Bounds on one call to the store. Every request checks its adapter's
/// version with one call, so while the store is unreachable a request for a
/// cached adapter waits at most this long (with the retries below) before
/// it is served from the cache; a refused connection fails at once.
const CONNECT_TIMEOUT: &str = "2s";
const CALL_TIMEOUT: &str = "10s";

/// Few, quick retries (the client's default is ten over three minutes): a
/// request waits on them.
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
    extension: &'static str,
}

impl Objects {
    /// Opens `url`; options come from `AWS_*` environment variables
    /// (`AWS_TIMEOUT` and `AWS_CONNECT_TIMEOUT` override ours).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let environment = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        Self::open_with(url, environment)
    }

    /// Opens `url` with `options` (lower-case `aws_*` keys, as the
    /// environment variables' names) instead of the environment's.
    pub fn open_with(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, StoreError> {
        let fail = |e: object_store::Error| StoreError::io(url, e);
        let parsed = url::Url::parse(url).map_err(|e| StoreError::io(url, e))?;
        let options = [
            ("connect_timeout".to_string(), CONNECT_TIMEOUT.to_string()),
            ("timeout".to_string(), CALL_TIMEOUT.to_string()),
        ]
        .into_iter()
        .chain(options);
        let (store, prefix): (Box<dyn ObjectStore>, ObjectPath) =
            match object_store::ObjectStoreScheme::parse(&parsed)
                .map_err(|e| StoreError::io(url, e))?
            {
                #[cfg(feature = "s3")]
                (object_store::ObjectStoreScheme::AmazonS3, prefix) => {
                    // The S3 client takes the process's default crypto
                    // provider and panics without one: `server::start`
                    // installs ring, and so does this, for a store opened
                    // without a server. An error only says one is set.
                    let _ = rustls::crypto::ring::default_provider().install_default();
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
        Ok(Objects {
            store,
            prefix,
            extension: "safetensors",
        })
    }

    /// The same store for objects named `<id>.<extension>`.
    pub fn with_extension(self, extension: &'static str) -> Self {
        Objects { extension, ..self }
    }

    fn path(&self, tenant: &str, id: &str) -> ObjectPath {
        self.prefix
            .clone()
            .join(tenant)
            .join(format!("{id}.{}", self.extension).as_str())
    }

    /// Names directly under `dir` (sub-prefixes when `dirs`, else
    /// objects), last path part only.
    async fn names(&self, dir: ObjectPath, dirs: bool) -> Result<Vec<String>, StoreError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
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
    async fn read_versioned(
        &self,
        path: &ObjectPath,
    ) -> Result<Option<(Vec<u8>, Fingerprint, UpdateVersion)>, StoreError> {
        let result = async {
            let got = self.store.get(path).await?;
            let meta = got.meta.clone();
            Ok::<_, object_store::Error>((got.bytes().await?, meta))
        };
        match result.await {
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

    async fn stat_object(&self, path: &ObjectPath) -> Result<Option<Fingerprint>, StoreError> {
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(fingerprint(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::io(path, e)),
        }
    }

    /// Writes `next(current)` with a put conditional on the current
    /// object's version, again from the newer object when another writer
    /// won.
    async fn update_object(
        &self,
        path: &ObjectPath,
        next: &mut NextFile<'_>,
    ) -> Result<bool, StoreError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.read_versioned(path).await?;
            let bytes = next(current.as_ref().map(|(b, _, _)| b.as_slice()))?;
            let mode = match current {
                Some((_, _, version)) => PutMode::Update(version),
                None => PutMode::Create,
            };
            let options = PutOptions {
                mode,
                ..Default::default()
            };
            let put = self.store.put_opts(path, PutPayload::from(bytes), options);
            match put.await {
                Ok(_) => return Ok(true),
                // Another writer won: compute the next file from theirs.
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => continue,
                Err(e) => return Err(StoreError::io(path, e)),
            }
        }
        Ok(false)
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
    fn stat<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Fingerprint>> {
        Box::pin(async move { self.stat_object(&self.path(tenant, id)).await })
    }

    fn read<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, Option<Contents>> {
        Box::pin(async move {
            Ok(self
                .read_versioned(&self.path(tenant, id))
                .await?
                .map(|(bytes, fingerprint, _)| (bytes, fingerprint)))
        })
    }

    fn update<'a>(&'a self, tenant: &'a str, id: &'a str, next: &'a mut NextFile) -> Call<'a, ()> {
        Box::pin(async move {
            if self.update_object(&self.path(tenant, id), next).await? {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!("{tenant}/{id}")))
            }
        })
    }

    fn delete<'a>(&'a self, tenant: &'a str, id: &'a str) -> Call<'a, bool> {
        Box::pin(async move {
            let path = self.path(tenant, id);
            if self.stat_object(&path).await?.is_none() {
                return Ok(false);
            }
            self.store
                .delete(&path)
                .await
                .map_err(|e| StoreError::io(&path, e))?;
            Ok(true)
        })
    }

    fn tenants(&self) -> Call<'_, Vec<String>> {
        // A name starting with `.` is no tenant's (the files API's `.files`).
        Box::pin(async move {
            let mut names = self.names(self.prefix.clone(), true).await?;
            names.retain(|n| !n.starts_with('.'));
            Ok(names)
        })
    }

    fn ids<'a>(&'a self, tenant: &'a str) -> Call<'a, Vec<String>> {
        Box::pin(async move {
            let dir = self.prefix.clone().join(tenant);
            Ok(self
                .names(dir, false)
                .await?
                .into_iter()
                .filter_map(|n| {
                    n.strip_suffix(self.extension)?
                        .strip_suffix('.')
                        .map(str::to_string)
                })
                .collect())
        })
    }
}
