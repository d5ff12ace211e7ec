//! API keys and tenants. A key file maps keys to tenants, one `KEY TENANT`
//! per line (`#` starts a comment); the tenant `*` marks an admin key, which
//! may name any tenant. Without a key file every caller is the admin of the
//! tenant "default" (and the server listens on loopback only unless told
//! otherwise).

use std::collections::HashMap;
use std::path::Path;

use tonic::metadata::MetadataMap;
use tonic::Status;

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

impl Caller {
    /// The tenant a request acts on: its own, or (admin only) the one named.
    pub fn tenant(&self, named: &str) -> Result<String, Status> {
        if named.is_empty() || named == self.tenant {
            Ok(self.tenant.clone())
        } else if self.admin {
            Ok(named.to_string())
        } else {
            Err(Status::permission_denied(format!(
                "tenant '{}' may not act on tenant '{named}'",
                self.tenant
            )))
        }
    }

    /// Splits an adapter reference `id` or `tenant/id` into (tenant, id).
    pub fn adapter(&self, reference: &str) -> Result<(String, String), Status> {
        match reference.split_once('/') {
            Some((tenant, id)) => Ok((self.tenant(tenant)?, id.to_string())),
            None => Ok((self.tenant.clone(), reference.to_string())),
        }
    }
}
