//! The Adapters service: uploads, reads, listings, deletions and pins of
//! the caller's tenant (an admin key may name any tenant), delegated to the
//! store; pins and deletions also reach the engine's slots.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::{auth, pb, store_status, Shared};
use crate::store::Stored;

/// Largest adapter upload accepted (the default model's are ~70 kB).
pub const MAX_UPLOAD: usize = 16 << 20;
/// Largest single message of the service.
pub const MAX_MESSAGE: usize = 8 << 20;
/// Uploads buffered at once; more wait their turn, so concurrent uploads
/// hold at most this many times [`MAX_UPLOAD`].
const CONCURRENT_UPLOADS: usize = 4;

pub(super) struct AdaptersService {
    shared: Arc<Shared>,
    uploads: Semaphore,
}

impl AdaptersService {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        AdaptersService {
            shared,
            uploads: Semaphore::new(CONCURRENT_UPLOADS),
        }
    }

    /// An uploaded GGUF LoRA, or PEFT LoRA (`peft_config` given), as the
    /// svfit LoRA file the store keeps; other bytes as they are.
    async fn lora_as_adapter(&self, bytes: Vec<u8>, peft_config: &str) -> Result<Vec<u8>, Status> {
        let gguf = bytes.starts_with(b"GGUF");
        if !gguf && peft_config.is_empty() {
            return Ok(bytes);
        }
        let config = &self.shared.config;
        let (model, sha) = (config.model.clone(), config.factors.base_sha256.clone());
        let peft_config = peft_config.to_string();
        let converted = tokio::task::spawn_blocking(move || {
            crate::lora::stored::import_bytes(
                &bytes,
                (!gguf).then_some(&*peft_config),
                &model,
                &sha,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("reading the LoRA: {e}")))?;
        converted.map_err(|e| Status::invalid_argument(format!("not a LoRA of this base: {e}")))
    }

    fn info(&self, stored: &Stored) -> pb::AdapterInfo {
        let a = &stored.adapter;
        pb::AdapterInfo {
            id: stored.id.clone(),
            tenant: stored.tenant.clone(),
            version: stored.version,
            bytes: stored.bytes,
            targets: a.targets.clone(),
            rank_policy: a.rank_policy.clone(),
            factors_id: a.factors_id.clone(),
            pinned: self.shared.store.is_pinned(&stored.tenant, &stored.id),
            info: a.info.clone().into_iter().collect(),
        }
    }
}

/// The file's bytes: the data messages after the header.
async fn receive(stream: &mut Streaming<pb::UploadChunk>) -> Result<Vec<u8>, Status> {
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(pb::upload_chunk::Part::Data(data)) => {
                if bytes.len() + data.len() > MAX_UPLOAD {
                    return Err(Status::invalid_argument(format!(
                        "adapter larger than {} MB",
                        MAX_UPLOAD >> 20
                    )));
                }
                bytes.extend_from_slice(&data);
            }
            _ => {
                return Err(Status::invalid_argument(
                    "only the first message may be a header",
                ))
            }
        }
    }
    Ok(bytes)
}

#[tonic::async_trait]
impl pb::adapters_server::Adapters for AdaptersService {
    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        let caller = auth::caller(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadChunk {
                part: Some(pb::upload_chunk::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be the header",
                ))
            }
        };
        let (tenant, id) = caller.named(&header.tenant, &header.id)?;
        let _turn = self
            .uploads
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is stopping"))?;
        // A client that stalls mid-upload must not keep its turn.
        let limit = self.shared.config.upload_timeout;
        let bytes = tokio::time::timeout(limit, receive(&mut stream))
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the upload took longer than {:.1} s",
                    limit.as_secs_f64()
                ))
            })??;
        let bytes = self.lora_as_adapter(bytes, &header.peft_config).await?;
        let stored = self
            .shared
            .store
            .put(&tenant, &id, bytes)
            .await
            .map_err(store_status)?;
        tracing::info!(
            tenant = stored.tenant,
            adapter = format!("{}@v{}", stored.id, stored.version),
            bytes = stored.bytes,
            "upload"
        );
        Ok(Response::new(self.info(&stored)))
    }

    async fn get(&self, req: Request<pb::AdapterRef>) -> Result<Response<pb::AdapterInfo>, Status> {
        let (tenant, id) = auth::caller(&req)?.named(&req.get_ref().tenant, &req.get_ref().id)?;
        let stored = self
            .shared
            .store
            .get(&tenant, &id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(self.info(&stored)))
    }

    async fn list(
        &self,
        req: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let all_tenants =
            r.tenant.is_empty() && caller.admin && self.shared.config.api_keys.is_some();
        let named = if all_tenants {
            None
        } else {
            Some(caller.tenant(&r.tenant)?)
        };
        let (stored, next_page_token) =
            list_page(&self.shared, named, r.page_size as usize, r.page_token).await?;
        Ok(Response::new(pb::ListAdaptersResponse {
            adapters: stored.iter().map(|s| self.info(s)).collect(),
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::AdapterRef>,
    ) -> Result<Response<pb::DeleteAdapterResponse>, Status> {
        let (tenant, id) = auth::caller(&req)?.named(&req.get_ref().tenant, &req.get_ref().id)?;
        self.shared
            .store
            .delete(&tenant, &id)
            .await
            .map_err(store_status)?;
        self.shared.engine.forget(&format!("{tenant}/{id}"));
        tracing::info!(tenant, adapter = id, "delete");
        Ok(Response::new(pb::DeleteAdapterResponse {}))
    }

    async fn pin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::AdapterInfo>, Status> {
        let (tenant, id) = auth::caller(&req)?.named(&req.get_ref().tenant, &req.get_ref().id)?;
        let pinned = req.get_ref().pinned;
        let stored = self
            .shared
            .store
            .pin(&tenant, &id, pinned)
            .await
            .map_err(store_status)?;
        self.shared.engine.pin(&format!("{tenant}/{id}"), pinned);
        Ok(Response::new(self.info(&stored)))
    }
}

/// One page of adapters, sorted by `tenant/id`: those of tenant `named`
/// (`None`: every tenant), after `page_token` (the last `tenant/id` of the
/// previous page), at most `page_size` (0: 100; at most 1000). Returns them
/// and the next page's token ("" after the last page).
pub(super) async fn list_page(
    shared: &Arc<Shared>,
    named: Option<String>,
    page_size: usize,
    page_token: String,
) -> Result<(Vec<Arc<Stored>>, String), Status> {
    let page_size = match page_size {
        0 => 100,
        n => n.min(1000),
    };
    let store = &shared.store;
    let tenants = match named {
        Some(t) => vec![t],
        None => store.tenants().await.map_err(store_status)?,
    };
    let mut names: Vec<(String, String)> = Vec::new();
    for t in &tenants {
        let ids = store.ids(t).await.map_err(store_status)?;
        names.extend(ids.into_iter().map(|id| (t.clone(), id)));
    }
    names.retain(|(t, id)| page_token.is_empty() || format!("{t}/{id}") > page_token);
    names.sort();
    let more = names.len() > page_size;
    names.truncate(page_size);
    let next = match names.last() {
        Some((t, id)) if more => format!("{t}/{id}"),
        _ => String::new(),
    };
    // An adapter that is invalid or was deleted meanwhile is left out.
    let mut stored: Vec<Arc<Stored>> = Vec::with_capacity(names.len());
    for (t, id) in &names {
        stored.extend(store.get(t, id).await.ok());
    }
    Ok((stored, next))
}
