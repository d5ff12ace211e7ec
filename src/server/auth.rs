//! API keys and tenants. A key file maps keys to tenants, one `KEY TENANT`
//! per line (`#` starts a comment); the tenant `*` marks an admin key, which
//! may name any tenant. Without a key file every caller is the admin of the
//! tenant "default" (and the server listens on loopback only unless told
//! otherwise).

use std::collections::HashMap;
use std::path::Path;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

pub const DEFAULT_TENANT: &str = "default";

#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
}

pub struct Keys {
    by_key: HashMap<String, Caller>,
}

impl Keys {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading API keys {}: {e}", path.display()))?;
        let mut by_key = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(key), Some(tenant), None) = (parts.next(), parts.next(), parts.next()) else {
                anyhow::bail!("{}:{}: expected 'KEY TENANT'", path.display(), n + 1);
            };
            let caller = if tenant == "*" {
                Caller {
                    tenant: DEFAULT_TENANT.into(),
                    admin: true,
                }
            } else {
                crate::store::check_name("tenant", tenant)
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
                Caller {
                    tenant: tenant.into(),
                    admin: false,
                }
            };
            by_key.insert(key.to_string(), caller);
        }
        if by_key.is_empty() {
            anyhow::bail!("{}: no keys", path.display());
        }
        Ok(Keys { by_key })
    }
}

/// The caller of a request: from `authorization: Bearer KEY` or
/// `x-api-key: KEY` when the server has keys.
pub fn authenticate(keys: Option<&Keys>, metadata: &MetadataMap) -> Result<Caller, Status> {
    let Some(keys) = keys else {
        return Ok(Caller {
            tenant: DEFAULT_TENANT.into(),
            admin: true,
        });
    };
    let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    let key = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"))
        .ok_or_else(|| Status::unauthenticated("missing API key (authorization: Bearer KEY)"))?;
    keys.by_key
        .get(key.trim())
        .cloned()
        .ok_or_else(|| Status::unauthenticated("unknown API key"))
}

/// The interceptor in front of the svfit services: authenticates each
/// request, holds each tenant to its request rate, and puts the
/// [`Caller`] into the request's extensions, where handlers find it with
/// [`caller`]. It runs before the request body is decoded, so a refused
/// request costs next to nothing.
#[derive(Clone)]
pub struct Authenticate {
    pub keys: Option<Arc<Keys>>,
    pub rate: Option<Arc<TenantRate>>,
}

impl Authenticate {
    /// The caller a request's `metadata` names, held to its tenant's
    /// request rate (the HTTP API calls this with its headers).
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let caller = authenticate(self.keys.as_deref(), metadata)?;
        if let Some(rate) = &self.rate {
            rate.admit(&caller.tenant)?;
        }
        Ok(caller)
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Requests per second per tenant: a token bucket per tenant (tenants
/// come from the key file, so there are few buckets).
pub struct TenantRate {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl TenantRate {
    /// `per_second` requests on average, `burst` at once.
    pub fn new(per_second: f64, burst: f64) -> Self {
        TenantRate {
            per_second,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `tenant`'s bucket, or says when to retry.
    pub fn admit(&self, tenant: &str) -> Result<(), Status> {
        let now = Instant::now();
        // Held for one map operation; a panic cannot leave it half-done.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(tenant.to_string()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_second);
        let mut status = Status::resource_exhausted(format!(
            "tenant '{tenant}' is over its rate of {} requests/s; retry in {} ms",
            self.per_second,
            wait.as_millis() + 1
        ));
        if let Ok(v) = (wait.as_secs() + 1).to_string().parse() {
            status.metadata_mut().insert("retry-after", v);
        }
        Err(status)
    }
}

/// The caller that [`Authenticate`] found.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the request was not authenticated"))
}

impl Caller {
    /// The tenant a request acts on: its own, or (admin only) the one named.
    pub fn tenant(&self, named: &str) -> Result<String, Status> {
        if named.is_empty() || named == self.tenant {
            Ok(self.tenant.clone())
        } else if self.admin {
            crate::store::check_name("tenant", named)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(named.to_string())
        } else {
            Err(Status::permission_denied(format!(
                "tenant '{}' may not act on tenant '{}'",
                self.tenant,
                crate::store::shown(named)
            )))
        }
    }

    /// Splits an adapter reference `id` or `tenant/id` into (tenant, id),
    /// both valid names.
    pub fn adapter(&self, reference: &str) -> Result<(String, String), Status> {
        match reference.split_once('/') {
            Some((tenant, id)) => self.named(tenant, id),
            None => self.named("", reference),
        }
    }

    /// The (tenant, id) of adapter `id` in tenant `tenant` (empty: the
    /// caller's own), both valid names the caller may act on.
    pub fn named(&self, tenant: &str, id: &str) -> Result<(String, String), Status> {
        let tenant = self.tenant(tenant)?;
        crate::store::check_name("adapter id", id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((tenant, id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_rate_waits_and_others_do_not() {
        let rate = TenantRate::new(1.0, 3.0);
        for _ in 0..3 {
            rate.admit("alice").unwrap();
        }
        let refused = rate.admit("alice").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().get("retry-after").is_some());
        rate.admit("bob").unwrap();
    }
}
