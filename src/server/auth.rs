//! API keys and tenants. A key file maps keys to tenants, one `KEY TENANT`
//! per line (`#` starts a comment); the tenant `*` marks an admin key, which
//! may name any tenant. Without a key file every caller is the admin of the
//! tenant "default" (and the server listens on loopback only unless told
//! otherwise).

use std::collections::HashMap;
use std::path::Path;

use std::sync::Arc;

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
/// request and puts its [`Caller`] into the request's extensions, where
/// handlers find it with [`caller`].
#[derive(Clone)]
pub struct Authenticate(pub Option<Arc<Keys>>);

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = authenticate(self.0.as_deref(), request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
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
        let (tenant, id) = match reference.split_once('/') {
            Some((tenant, id)) => (self.tenant(tenant)?, id),
            None => (self.tenant.clone(), reference),
        };
        crate::store::check_name("adapter id", id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((tenant, id.to_string()))
    }
}
