//! Fine-tuning jobs (OpenAI's `/v1/fine_tuning/jobs`, `http/jobs.rs`): a
//! tenant's file trained into an SVFit adapter by the server itself,
//! beside live traffic. Everything about a job lives in the store beside
//! the adapters (`--adapters` DIR or object store), under `.jobs`:
//!
//! - `<tenant>/<id>.json`: the job object (OpenAI's fields, and svfit's
//!   under `svfit`: the resolved hyper-parameters, progress, checkpoints
//!   and the lease of the replica running it);
//! - `<tenant>/<id>.events`: its events, a JSON array, oldest first;
//! - `<tenant>/<id>.ckpt`: the trainer's state after the last whole epoch.
//!
//! Every write is a compare-and-swap of one file ([`Backend::update`]), so
//! replicas on one object store agree: a job is claimed by writing a lease
//! into its object, renewed while it runs; a replica killed mid-job stops
//! renewing, and once the lease has expired any replica (or the same one,
//! restarted) resumes the job from its checkpoint ([`runner`]).
//!
//! A job's status goes `validating_files` → `queued` → `running` →
//! `succeeded` | `failed` | `cancelled`; the adapter it trains is stored
//! as `ft-<suffix>-<job hex>` (adapter ids take no `:`), servable at once
//! through both APIs.

pub mod request;
pub(super) mod runner;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tonic::Status;

use crate::store::{self, Backend, StoreError};
use request::JobRequest;

/// How fine-tuning jobs run in this server.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Jobs this replica runs at once (0: none; it still takes requests,
    /// and other replicas run them).
    pub runners: usize,
    /// The share of the compute a job takes while requests are in flight.
    pub share: f64,
    /// How long a replica's claim on a job lasts unless renewed: a job of
    /// a replica that died resumes elsewhere after this.
    pub lease: Duration,
    /// Jobs of one tenant not yet finished, at most.
    pub per_tenant: usize,
    /// Optimizer steps one job may take, at most.
    pub max_steps: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            runners: 1,
            share: 0.02,
            lease: Duration::from_secs(30),
            per_tenant: 4,
            max_steps: 20_000,
        }
    }
}

pub const VALIDATING: &str = "validating_files";
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";

/// Events kept per job: the newest, when a long job has more.
const MAX_EVENTS: usize = 5000;

/// Whether a job's status is final.
pub fn finished(status: &str) -> bool {
    matches!(status, SUCCEEDED | FAILED | CANCELLED)
}

/// The jobs of every tenant, and what this replica's runners share.
pub(super) struct Jobs {
    objects: Box<dyn Backend>,
    events: Box<dyn Backend>,
    checkpoints: Box<dyn Backend>,
    /// An empty `<id>.open` per job not yet finished, so that runners read
    /// those jobs' objects only, however many finished ones a tenant has.
    open: Box<dyn Backend>,
    pub(super) config: JobsConfig,
    /// Jobs cancelled through this replica, for its runners to stop at
    /// once (other replicas see the status at their next lease renewal).
    cancelled: Mutex<HashSet<String>>,
    /// The last step of each job running here.
    progress: Mutex<HashMap<String, u64>>,
    /// Set when the server stops: runners leave their jobs to be resumed.
    pub(super) stopping: Arc<AtomicBool>,
    /// Wakes the runners when a job is created here.
    wake: (Mutex<bool>, std::sync::Condvar),
    /// Held from counting a tenant's jobs to storing a new one.
    counting: tokio::sync::Mutex<()>,
}

/// What the store said, as a status.
pub(super) fn status(e: StoreError) -> Status {
    super::files::status(e)
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("fine-tuning job '{}' not found", store::shown(id)))
}

pub(super) use super::files::new_id;

fn valid_id(id: &str) -> Result<(), Status> {
    if super::files::is_id("ftjob", id) {
        Ok(())
    } else {
        Err(not_found(id))
    }
}

/// The adapter id a job's result is stored under.
pub fn model_id(job_id: &str, suffix: Option<&str>) -> String {
    let hex = job_id.trim_start_matches("ftjob-");
    match suffix {
        Some(s) => format!("ft-{s}-{hex}"),
        None => format!("ft-{hex}"),
    }
}

/// An event object.
pub(super) fn event(message: &str, level: &str, data: Option<Value>) -> Value {
    json!({
        "object": "fine_tuning.job.event", "id": new_id("ftevent"),
        "created_at": store::unix_now(), "level": level, "message": message,
        "data": data, "type": if data.is_some() { "metrics" } else { "message" },
    })
}

impl Jobs {
    pub(super) fn open(adapters: &str, config: JobsConfig) -> Result<Self, StoreError> {
        let location = format!("{}/.jobs", adapters.trim_end_matches('/'));
        Ok(Jobs {
            objects: store::backend_with(&location, "json")?,
            events: store::backend_with(&location, "events")?,
            checkpoints: store::backend_with(&location, "ckpt")?,
            open: store::backend_with(&location, "open")?,
            config,
            cancelled: Mutex::default(),
            progress: Mutex::default(),
            stopping: Arc::default(),
            wake: (Mutex::new(false), std::sync::Condvar::new()),
            counting: tokio::sync::Mutex::new(()),
        })
    }

    /// Stores a new job (status `validating_files`) for `tenant`, whose
    /// training file holds `examples` examples, starting from the base or
    /// from the tenant's adapter `init` (id, version).
    pub(super) async fn create(
        &self,
        tenant: &str,
        request: JobRequest,
        examples: u64,
        init: Option<(String, u64)>,
    ) -> Result<Value, Status> {
        let steps = request.hyper.total_steps(examples as usize);
        if steps > self.config.max_steps {
            return Err(Status::resource_exhausted(format!(
                "the job would take {steps} steps; at most {} are run (--max-job-steps): \
                 fewer epochs, a larger batch_size or a smaller file",
                self.config.max_steps
            )));
        }
        let id = new_id("ftjob");
        let hyper = &request.hyper;
        let hyperparameters = json!({
            "n_epochs": hyper.epochs, "batch_size": hyper.batch,
            "learning_rate_multiplier": request.lr_multiplier,
        });
        let object = json!({
            "object": "fine_tuning.job", "id": id, "model": request.model,
            "created_at": store::unix_now(), "finished_at": null,
            "fine_tuned_model": null, "organization_id": tenant,
            "result_files": [], "status": VALIDATING,
            "training_file": request.training_file,
            "validation_file": request.validation_file,
            "hyperparameters": hyperparameters,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "trained_tokens": null, "error": null, "seed": request.seed,
            "suffix": request.suffix, "estimated_finish": null, "integrations": [],
            "metadata": request.metadata,
            "svfit": {
                "hyper": hyper, "examples": examples, "step": 0, "total_steps": steps,
                "checkpoints": [], "lease": null, "ran_on": [],
                "init": init.map(|(id, version)| json!({"adapter": id, "version": version})),
            },
        });
        let _counting = self.counting.lock().await;
        let open = self
            .list(tenant)
            .await?
            .iter()
            .filter(|j| !finished(j["status"].as_str().unwrap_or("")))
            .count();
        if open >= self.config.per_tenant {
            return Err(Status::resource_exhausted(format!(
                "tenant '{tenant}' has {open} unfinished fine-tuning jobs, its quota \
                 (--max-jobs-per-tenant): wait for one or cancel it"
            )));
        }
        let created = event("Created fine-tuning job", "info", None);
        self.append_events(tenant, &id, vec![created], None).await?;
        let mut empty = |_: Option<&[u8]>| Ok(Vec::new());
        self.open
            .update(tenant, &id, &mut empty)
            .await
            .map_err(status)?;
        let text = object.to_string().into_bytes();
        super::files::put(self.objects.as_ref(), tenant, &id, text).await?;
        self.wake();
        Ok(object)
    }

    /// Wakes this replica's runners.
    pub(super) fn wake(&self) {
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.1.notify_all();
    }

    /// Waits until woken or `timeout` passes.
    pub(super) fn sleep(&self, timeout: Duration) {
        let woken = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = self
            .wake
            .1
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }

    /// The tenant's jobs, newest first.
    pub(super) async fn list(&self, tenant: &str) -> Result<Vec<Value>, Status> {
        let mut jobs = Vec::new();
        for id in self.objects.ids(tenant).await.map_err(status)? {
            if let Some(job) = self.object(tenant, &id).await? {
                jobs.push(job);
            }
        }
        jobs.sort_by_key(|j| std::cmp::Reverse(j["created_at"].as_u64().unwrap_or(0)));
        Ok(jobs)
    }

    /// Every tenant's jobs not yet finished, oldest first (the open
    /// markers of jobs found finished are dropped on the way).
    pub(super) async fn unfinished(&self) -> Result<Vec<(String, Value)>, Status> {
        let mut jobs = Vec::new();
        for tenant in self.open.tenants().await.map_err(status)? {
            for id in self.open.ids(&tenant).await.map_err(status)? {
                match self.object(&tenant, &id).await? {
                    Some(job) if !finished(job["status"].as_str().unwrap_or("")) => {
                        jobs.push((tenant.clone(), job));
                    }
                    _ => self.closed(&tenant, &id).await,
                }
            }
        }
        jobs.sort_by_key(|(_, j)| j["created_at"].as_u64().unwrap_or(0));
        Ok(jobs)
    }

    /// Drops a finished job's open marker (a failure only costs a read of
    /// its object at the next look for work).
    pub(super) async fn closed(&self, tenant: &str, id: &str) {
        if let Err(e) = self.open.delete(tenant, id).await {
            tracing::warn!(job = id, error = %e, "dropping a finished job's marker");
        }
    }

    /// A job; one running here shows its last step (the stored one is
    /// renewed with the lease).
    pub(super) async fn get(&self, tenant: &str, id: &str) -> Result<Value, Status> {
        valid_id(id)?;
        let mut job = self
            .object(tenant, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if let Some(step) = self.step_here(id) {
            job["svfit"]["step"] = json!(step);
        }
        Ok(job)
    }

    fn step_here(&self, id: &str) -> Option<u64> {
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.get(id).copied()
    }

    async fn object(&self, tenant: &str, id: &str) -> Result<Option<Value>, Status> {
        let Some((bytes, _)) = self.objects.read(tenant, id).await.map_err(status)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("job '{id}': its object is unreadable: {e}")))
    }

    /// Rewrites a job's object with `change` (compare-and-swap: `change`
    /// may run again on a newer object); `change` refuses with a status.
    /// Returns the object written.
    pub(super) async fn update(
        &self,
        tenant: &str,
        id: &str,
        change: &mut (dyn FnMut(&mut Value) -> Result<(), Status> + Send),
    ) -> Result<Value, Status> {
        let mut refused = None;
        let mut written = Value::Null;
        let mut next = |current: Option<&[u8]>| {
            let mut job: Value = current
                .and_then(|b| serde_json::from_slice(b).ok())
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            if let Err(e) = change(&mut job) {
                refused = Some(e);
                return Err(StoreError::Conflict(id.to_string()));
            }
            written = job.clone();
            Ok(job.to_string().into_bytes())
        };
        match self.objects.update(tenant, id, &mut next).await {
            Ok(()) => Ok(written),
            Err(_) if refused.is_some() => Err(refused.unwrap_or_else(|| not_found(id))),
            Err(StoreError::NotFound(_)) => Err(not_found(id)),
            Err(e) => Err(status(e)),
        }
    }

    /// Records the last step of a job running here (`None`: it ended).
    pub(super) fn set_progress(&self, id: &str, step: Option<u64>) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match step {
            Some(step) => progress.insert(id.to_string(), step),
            None => progress.remove(id),
        };
    }

    /// Cancels a job not yet finished; its runner stops before its next
    /// step. A job running here records the step it was cancelled at.
    pub(super) async fn cancel(&self, tenant: &str, id: &str) -> Result<Value, Status> {
        self.get(tenant, id).await?;
        let at = self.step_here(id);
        let job = self
            .update(tenant, id, &mut |job| {
                let now = job["status"].as_str().unwrap_or("").to_string();
                if finished(&now) {
                    return Err(Status::failed_precondition(format!(
                        "job {id} has already {} and cannot be cancelled",
                        if now == CANCELLED {
                            "been cancelled"
                        } else {
                            &now
                        }
                    )));
                }
                job["status"] = json!(CANCELLED);
                job["finished_at"] = json!(store::unix_now());
                if let Some(step) = at {
                    job["svfit"]["cancelled_at_step"] = json!(step);
                }
                Ok(())
            })
            .await?;
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        let cancelled = event("Job cancelled", "info", None);
        self.append_events(tenant, id, vec![cancelled], None)
            .await?;
        self.closed(tenant, id).await;
        Ok(job)
    }

    /// Whether a job was cancelled through this replica.
    pub(super) fn cancelled_here(&self, id: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// A job's events, oldest first.
    pub(super) async fn events(&self, tenant: &str, id: &str) -> Result<Vec<Value>, Status> {
        self.get(tenant, id).await?;
        let read = self.events.read(tenant, id).await.map_err(status)?;
        Ok(read
            .and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    /// Adds events to a job's; with `after_step`, first drops the metrics
    /// of later steps (a job resumed from a checkpoint trains them again).
    pub(super) async fn append_events(
        &self,
        tenant: &str,
        id: &str,
        new: Vec<Value>,
        after_step: Option<u64>,
    ) -> Result<(), Status> {
        let mut next = |current: Option<&[u8]>| {
            let mut events: Vec<Value> = current
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            if let Some(step) = after_step {
                events.retain(|e| e["data"]["step"].as_u64().is_none_or(|s| s <= step));
            }
            events.extend(new.iter().cloned());
            let extra = events.len().saturating_sub(MAX_EVENTS);
            events.drain(..extra);
            Ok(serde_json::to_vec(&events).unwrap_or_default())
        };
        self.events
            .update(tenant, id, &mut next)
            .await
            .map_err(status)
    }

    /// The last checkpoint's bytes.
    pub(super) async fn checkpoint(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>, Status> {
        let read = self.checkpoints.read(tenant, id).await.map_err(status)?;
        Ok(read.map(|(bytes, _)| bytes))
    }

    pub(super) async fn put_checkpoint(
        &self,
        tenant: &str,
        id: &str,
        bytes: Vec<u8>,
    ) -> Result<(), Status> {
        let mut next = |_: Option<&[u8]>| Ok(bytes.clone());
        self.checkpoints
            .update(tenant, id, &mut next)
            .await
            .map_err(status)
    }

    /// Drops a finished job's checkpoint (the adapter is what remains).
    pub(super) async fn drop_checkpoint(&self, tenant: &str, id: &str) -> Result<(), Status> {
        self.checkpoints
            .delete(tenant, id)
            .await
            .map(|_| ())
            .map_err(status)
    }
}
