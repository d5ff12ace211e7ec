//! The files of OpenAI's files API (`/v1/files`, `http/files.rs`): a
//! tenant's fine-tuning data, kept beside its adapters in the same kind of
//! backend (`--adapters` DIR or object store), under `.files`:
//! `.files/<tenant>/<id>.jsonl` holds the bytes as uploaded and
//! `.files/<tenant>/<id>.json` the file object (name, purpose, size,
//! time). The bytes are written first and the object last, and deleted in
//! the other order: a file exists once its object does, and a killed
//! process leaves at worst bytes no object names (never listed).
//!
//! An upload is checked before anything is stored: within
//! `--max-file-bytes`, the tenant under `--max-files-per-tenant`, purpose
//! `fine-tune`, and every line a training example `svfit train` takes (the
//! OpenAI chat format, `prompt`/`completion`, or `text`), the first bad
//! line named.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tonic::Status;

use crate::store::{self, Backend, StoreError};
use crate::train::data::Dataset;

use super::validation::Limits;
use super::Shared;

/// Uploads read at once; more wait their turn, so uploads hold at most
/// this many times `--max-file-bytes` (and their examples while checked).
const CONCURRENT_UPLOADS: usize = 2;

/// The files of every tenant.
pub(super) struct Files {
    bytes: Box<dyn Backend>,
    objects: Box<dyn Backend>,
    uploads: tokio::sync::Semaphore,
    /// Held from counting a tenant's files to storing a new one, so that
    /// concurrent uploads cannot pass the quota together.
    counting: tokio::sync::Mutex<()>,
}

/// What the store said, as a status (files are not adapters).
pub(super) fn status(e: StoreError) -> Status {
    match e {
        StoreError::InvalidName { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Conflict(_) => Status::aborted(e.to_string()),
        other => {
            tracing::error!(error = %other, "files");
            Status::unavailable("the file store failed or is unreachable; retry later")
        }
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("file '{}' not found", store::shown(id)))
}

impl Files {
    /// The files kept beside the adapters at `adapters` (a directory or an
    /// object store URL).
    pub(super) fn open(adapters: &str) -> Result<Self, StoreError> {
        let location = format!("{}/.files", adapters.trim_end_matches('/'));
        Ok(Files {
            bytes: store::backend_with(&location, "jsonl")?,
            objects: store::backend_with(&location, "json")?,
            uploads: tokio::sync::Semaphore::new(CONCURRENT_UPLOADS),
            counting: tokio::sync::Mutex::new(()),
        })
    }

    /// A turn to read and check an upload (held until it is stored).
    pub(super) async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.uploads
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is stopping"))
    }

    /// Checks and stores an upload of `tenant`; its file object.
    pub(super) async fn create(
        &self,
        shared: &Arc<Shared>,
        tenant: &str,
        filename: &str,
        purpose: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, Status> {
        if purpose != "fine-tune" {
            return Err(Status::invalid_argument(format!(
                "purpose: '{}' is not stored here (only fine-tune)",
                store::shown(purpose)
            )));
        }
        let limits = &shared.limits;
        check_size(bytes.len(), limits)?;
        self.check_quota(tenant, limits).await?;
        let (checked, bytes) = {
            let shared = shared.clone();
            let name = filename.to_string();
            tokio::task::spawn_blocking(move || (check_lines(&shared, &name, &bytes), bytes))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        };
        let examples = checked?;
        let id = new_id("file");
        let object = json!({
            "id": id, "object": "file", "bytes": bytes.len(),
            "created_at": store::unix_now(), "filename": filename,
            "purpose": purpose, "status": "processed", "status_details": null,
            "svfit": {"examples": examples},
        });
        let _counting = self.counting.lock().await;
        self.check_quota(tenant, limits).await?;
        put(self.bytes.as_ref(), tenant, &id, bytes).await?;
        put(
            self.objects.as_ref(),
            tenant,
            &id,
            object.to_string().into_bytes(),
        )
        .await?;
        Ok(object)
    }

    /// Refuses a new file of a tenant at its quota (checked before the
    /// lines are read, and again under `counting` before it is stored).
    async fn check_quota(&self, tenant: &str, limits: &Limits) -> Result<(), Status> {
        let held = self.objects.ids(tenant).await.map_err(status)?.len();
        if held >= limits.files_per_tenant {
            return Err(Status::resource_exhausted(format!(
                "tenant '{tenant}' keeps {held} files, its quota: delete some first"
            )));
        }
        Ok(())
    }

    /// The tenant's file objects, newest first.
    pub(super) async fn list(&self, tenant: &str) -> Result<Vec<Value>, Status> {
        let mut files = Vec::new();
        for id in self.objects.ids(tenant).await.map_err(status)? {
            if let Some(object) = self.object(tenant, &id).await? {
                files.push(object);
            }
        }
        files.sort_by_key(|f| std::cmp::Reverse(f["created_at"].as_u64().unwrap_or(0)));
        Ok(files)
    }

    /// One file object of the tenant.
    pub(super) async fn get(&self, tenant: &str, id: &str) -> Result<Value, Status> {
        valid_id(id)?;
        self.object(tenant, id).await?.ok_or_else(|| not_found(id))
    }

    /// A file's bytes as uploaded.
    pub(super) async fn content(&self, tenant: &str, id: &str) -> Result<Vec<u8>, Status> {
        self.get(tenant, id).await?;
        let read = self.bytes.read(tenant, id).await.map_err(status)?;
        read.map(|(bytes, _)| bytes).ok_or_else(|| not_found(id))
    }

    /// Deletes a file: its object first, so it is gone once that is.
    pub(super) async fn delete(&self, tenant: &str, id: &str) -> Result<(), Status> {
        valid_id(id)?;
        if !self.objects.delete(tenant, id).await.map_err(status)? {
            return Err(not_found(id));
        }
        self.bytes.delete(tenant, id).await.map_err(status)?;
        Ok(())
    }

    async fn object(&self, tenant: &str, id: &str) -> Result<Option<Value>, Status> {
        let Some((bytes, _)) = self.objects.read(tenant, id).await.map_err(status)? else {
            return Ok(None);
        };
        let object: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("file '{id}': its object is unreadable: {e}")))?;
        Ok(Some(object))
    }
}

/// Writes a new file `id` (a fresh id: one already there is a conflict);
/// the jobs' objects are written the same way.
pub(super) async fn put(
    backend: &dyn Backend,
    tenant: &str,
    id: &str,
    contents: Vec<u8>,
) -> Result<(), Status> {
    let mut contents = Some(contents);
    let mut next = |current: Option<&[u8]>| match current {
        None => Ok(contents.take().unwrap_or_default()),
        Some(_) => Err(StoreError::Conflict(id.to_string())),
    };
    backend.update(tenant, id, &mut next).await.map_err(status)
}

/// 413-worthy sizes are refused before the lines are read.
fn check_size(bytes: usize, limits: &Limits) -> Result<(), Status> {
    if bytes == 0 {
        return Err(Status::invalid_argument("file: empty"));
    }
    if bytes > limits.file_bytes {
        return Err(Status::out_of_range(format!(
            "file: {bytes} bytes; at most {} are stored (--max-file-bytes)",
            limits.file_bytes
        )));
    }
    Ok(())
}

/// Every line a training example for the served model; the number of
/// examples, or the first bad line.
fn check_lines(shared: &Shared, filename: &str, bytes: &[u8]) -> Result<usize, Status> {
    let context = shared.engine.config().context;
    let data = Dataset::from_reader(Path::new(filename), bytes, &shared.tokenizer, context, true)
        .map_err(|e| Status::invalid_argument(format!("file: {e}")))?;
    Ok(data.examples.len())
}

/// A new id: `prefix`, `-` and 24 hex digits (files are `file-…`, jobs
/// `ftjob-…`).
pub(super) fn new_id(prefix: &str) -> String {
    let part = || super::http::random_seed() >> 16;
    format!("{prefix}-{:012x}{:012x}", part(), part())
}

/// Whether `id` is one [`new_id`] makes with `prefix` (anything else is
/// not found, and never reaches the store).
pub(super) fn is_id(prefix: &str, id: &str) -> bool {
    let hex = id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .unwrap_or("");
    hex.len() == 24 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_id(id: &str) -> Result<(), Status> {
    if is_id("file", id) {
        Ok(())
    } else {
        Err(not_found(id))
    }
}
