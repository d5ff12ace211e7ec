//! The runners: `--train-jobs` threads of a replica that take jobs from
//! the store and train them beside serving. A runner looks for work when
//! a job is created here and every few seconds (a job created through
//! another replica): it validates the files of new jobs (→ `queued` or
//! `failed`, the bad line named), then claims the oldest job that is
//! queued, or running under a lease that expired (its replica died), and
//! trains it:
//!
//! - in a work directory under the home (`jobs/<tenant>.<id>`), from the
//!   files and the last checkpoint in the store, so any replica can resume
//!   it exactly where the last epoch ended;
//! - each packed row of a step or evaluation taking a turn at the engine's gate
//!   ([`Pacer`]: `--train-share` of the time while requests are in
//!   flight);
//! - while a lease thread renews the claim, notices a cancel made through
//!   another replica, and records progress;
//! - events go to the store every few seconds, and at each epoch's end the
//!   checkpoint (after the events up to it);
//! - the adapter it trains goes into the adapter store, checked like any
//!   upload, and the job `succeeded` names it.
//!
//! A server that stops leaves its job `running` with its lease dropped,
//! to be resumed at once by the next runner.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::runtime::Handle;
use tonic::Status;

use super::{event, model_id, Jobs, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, VALIDATING};
use crate::engine::gate::Pacer;
use crate::model::WeightFormat;
use crate::store::unix_now;
use crate::train::data::{DataError, Dataset};
use crate::train::session::{self, Checkpoint, Frozen, Options};
use crate::train::{Hyper, Outcome, Pace};

use super::super::Shared;
use observer::JobObserver;

mod observer;

/// How often an idle runner looks for jobs created elsewhere.
const POLL: Duration = Duration::from_secs(2);
/// How often a running job's events reach the store.
const FLUSH: Duration = Duration::from_secs(2);

/// Why a job stopped before its end.
const GOING: u8 = 0;
const CANCEL: u8 = 1;
const SHUTDOWN: u8 = 2;
const LOST: u8 = 3;

/// Starts this replica's runners.
pub(in crate::server) fn start(shared: &Arc<Shared>) -> std::io::Result<Runners> {
    let replica = format!(
        "{}-{}",
        std::process::id(),
        super::new_id("r").trim_start_matches("r-")
    );
    let mut threads = Vec::new();
    for n in 0..shared.jobs.config.runners {
        let (weak, jobs) = (Arc::downgrade(shared), shared.jobs.clone());
        let (handle, replica) = (Handle::current(), replica.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("svfit-jobs-{n}"))
                .spawn(move || runner(weak, jobs, handle, replica))?,
        );
    }
    Ok(Runners {
        jobs: shared.jobs.clone(),
        threads,
    })
}

/// A replica's runner threads.
pub(in crate::server) struct Runners {
    jobs: Arc<Jobs>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Runners {
    /// Tells the runners to stop: a job stops after its current turn.
    pub(in crate::server) fn stop(&self) {
        self.jobs.stopping.store(true, SeqCst);
        self.jobs.wake();
    }

    /// Stops the runners and waits until they have left their jobs (a
    /// process that exits while one trains would pull the model from
    /// under it).
    pub(in crate::server) async fn join(&mut self) {
        self.stop();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Milliseconds since the Unix epoch (leases are kept in them).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn runner(weak: Weak<Shared>, jobs: Arc<Jobs>, handle: Handle, me: String) {
    while !jobs.stopping.load(SeqCst) {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        match handle.block_on(next_job(&shared, &me)) {
            Ok(Some((tenant, job))) => {
                let id = job["id"].as_str().unwrap_or("").to_string();
                tracing::info!(tenant, job = id, "fine-tuning job starts");
                run(&shared, &handle, &me, &tenant, &job);
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e.message(), "looking for fine-tuning jobs"),
        }
        drop(shared);
        jobs.sleep(POLL);
    }
}

/// Whether a job's lease is free (none, or expired).
fn lease_free(job: &Value, now: u64) -> bool {
    job["svfit"]["lease"]["until"]
        .as_u64()
        .is_none_or(|until| until <= now)
}

/// Validates new jobs' files; claims the next job to run, if any.
async fn next_job(shared: &Shared, me: &str) -> Result<Option<(String, Value)>, Status> {
    let jobs = &shared.jobs;
    for (tenant, job) in jobs.unfinished().await? {
        if !lease_free(&job, unix_ms()) {
            continue;
        }
        let id = job["id"].as_str().unwrap_or("");
        let status = job["status"].as_str().unwrap_or("");
        let Ok(claimed) = claim(jobs, &tenant, id, me, status).await else {
            continue;
        };
        if status == VALIDATING {
            validate(shared, &tenant, &claimed).await?;
            continue;
        }
        return Ok(Some((tenant, claimed)));
    }
    Ok(None)
}

/// Takes the lease of a job still in `status` with a free lease; a queued
/// job turns `running`.
async fn claim(
    jobs: &Jobs,
    tenant: &str,
    id: &str,
    me: &str,
    status: &str,
) -> Result<Value, Status> {
    let until = unix_ms() + jobs.config.lease.as_millis() as u64;
    jobs.update(tenant, id, &mut |job| {
        if job["status"] != status || !lease_free(job, unix_ms()) {
            return Err(Status::aborted("taken"));
        }
        job["svfit"]["lease"] = json!({"owner": me, "until": until});
        if status == VALIDATING {
            return Ok(());
        }
        if status == QUEUED {
            job["status"] = json!(RUNNING);
        }
        // Every replica that trained the job, in order (one, unless a
        // replica died or stopped mid-job).
        match job["svfit"]["ran_on"].as_array_mut() {
            Some(list) => list.push(json!(me)),
            None => job["svfit"]["ran_on"] = json!([me]),
        }
        Ok(())
    })
    .await
}

fn hyper_of(job: &Value) -> Result<Hyper, String> {
    serde_json::from_value(job["svfit"]["hyper"].clone())
        .map_err(|e| format!("the job's hyper-parameters are unreadable: {e}"))
}

/// Reads a file of the job as training data at the job's context: the
/// error names the file and the first bad line.
async fn dataset(
    shared: &Shared,
    tenant: &str,
    file: &str,
    hyper: &Hyper,
) -> Result<Vec<u8>, String> {
    let bytes = shared
        .files
        .content(tenant, file)
        .await
        .map_err(|e| format!("{file}: {}", e.message()))?;
    let parsed = Dataset::from_reader(
        Path::new(file),
        &bytes[..],
        &shared.tokenizer,
        hyper.ctx,
        true,
    );
    match parsed {
        Ok(_) => Ok(bytes),
        Err(DataError::Line { line, reason, .. }) => Err(format!("{file}: line {line}: {reason}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The files of a job in `validating_files`, read as its training will:
/// `queued`, or `failed` with the file and line at fault.
async fn validate(shared: &Shared, tenant: &str, job: &Value) -> Result<(), Status> {
    let id = job["id"].as_str().unwrap_or("");
    let hyper = hyper_of(job);
    let mut checked = hyper.as_ref().map(|_| ()).map_err(String::clone);
    for (param, file) in [
        ("training_file", &job["training_file"]),
        ("validation_file", &job["validation_file"]),
    ] {
        let (Ok(hyper), Ok(()), Some(file)) = (&hyper, &checked, file.as_str()) else {
            continue;
        };
        if let Err(e) = dataset(shared, tenant, file, hyper).await {
            checked = Err(format!("invalid {param}: {e}"));
        }
    }
    let jobs = &shared.jobs;
    let (events, result) = match checked {
        Ok(()) => (
            vec![event(
                "Files validated, moving job to queued state",
                "info",
                None,
            )],
            jobs.update(tenant, id, &mut |job| {
                if job["status"] == VALIDATING {
                    job["status"] = json!(QUEUED);
                }
                job["svfit"]["lease"] = Value::Null;
                Ok(())
            })
            .await,
        ),
        Err(message) => (
            vec![event(&message, "error", None)],
            set_failed(jobs, tenant, id, "invalid_training_file", &message).await,
        ),
    };
    jobs.append_events(tenant, id, events, None).await?;
    jobs.wake();
    result.map(|_| ())
}

/// Fails a job (unless it was cancelled meanwhile).
async fn set_failed(
    jobs: &Jobs,
    tenant: &str,
    id: &str,
    code: &str,
    message: &str,
) -> Result<Value, Status> {
    let failed = jobs
        .update(tenant, id, &mut |job| {
            if job["status"] != CANCELLED {
                job["status"] = json!(FAILED);
                job["error"] = json!({"code": code, "message": message, "param": null});
                job["finished_at"] = json!(unix_now());
            }
            job["svfit"]["lease"] = Value::Null;
            Ok(())
        })
        .await?;
    jobs.closed(tenant, id).await;
    Ok(failed)
}

/// What one claimed job shares between its trainer, its observer and its
/// lease thread.
struct Running<'a> {
    shared: &'a Shared,
    handle: &'a Handle,
    tenant: &'a str,
    id: &'a str,
    me: &'a str,
    /// Why the job stops early (`GOING`: it does not).
    why: AtomicU8,
    step: AtomicU64,
    done: AtomicBool,
}

/// Trains a claimed job to its end (or until it stops) and records the
/// outcome.
fn run(shared: &Shared, handle: &Handle, me: &str, tenant: &str, job: &Value) {
    let id = job["id"].as_str().unwrap_or("");
    let running = Running {
        shared,
        handle,
        tenant,
        id,
        me,
        why: AtomicU8::new(GOING),
        step: AtomicU64::new(0),
        done: AtomicBool::new(false),
    };
    let work = shared
        .config
        .home
        .join("jobs")
        .join(format!("{tenant}.{id}"));
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| running.keep_lease());
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| running.train(job, &work)))
                .unwrap_or_else(|_| {
                    Err("internal error: the trainer panicked (the server log has it)".into())
                });
        running.done.store(true, SeqCst);
        shared.jobs.set_progress(id, None);
        outcome
    });
    if let Err(e) = handle.block_on(running.finish(job, outcome)) {
        tracing::warn!(job = id, error = %e.message(), "recording a job's end");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// How a job's training ended: the adapter file, or why not.
type Trained = Result<Option<PathBuf>, String>;

impl Running<'_> {
    fn jobs(&self) -> &Jobs {
        &self.shared.jobs
    }

    /// Renews the lease every third of its length until the job is done;
    /// learns of a cancel or of the lease lost to another replica.
    fn keep_lease(&self) {
        let lease = self.jobs().config.lease;
        let mut renewed = Instant::now();
        while !self.done.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if self.jobs().stopping.load(SeqCst) {
                let _ = self.why.compare_exchange(GOING, SHUTDOWN, SeqCst, SeqCst);
            }
            if self.jobs().cancelled_here(self.id) {
                let _ = self.why.compare_exchange(GOING, CANCEL, SeqCst, SeqCst);
            }
            if renewed.elapsed() < lease / 3 {
                continue;
            }
            renewed = Instant::now();
            let step = self.step.load(SeqCst);
            let until = unix_ms() + lease.as_millis() as u64;
            let me = self.me;
            let mut renew = |job: &mut Value| {
                if job["status"] == CANCELLED {
                    return Err(Status::cancelled("cancelled"));
                }
                if job["svfit"]["lease"]["owner"] != me {
                    return Err(Status::aborted("lost"));
                }
                job["svfit"]["lease"]["until"] = json!(until);
                job["svfit"]["step"] = json!(step);
                Ok(())
            };
            let renewed_job = self.jobs().update(self.tenant, self.id, &mut renew);
            let why = match self.handle.block_on(renewed_job) {
                Ok(_) => continue,
                Err(e) if e.code() == tonic::Code::Cancelled => CANCEL,
                Err(e) if e.code() == tonic::Code::Aborted => LOST,
                Err(e) => {
                    // The store is unreachable: keep training; the lease
                    // is renewed when it answers again.
                    tracing::warn!(job = self.id, error = %e.message(), "renewing a job's lease");
                    continue;
                }
            };
            let _ = self.why.compare_exchange(GOING, why, SeqCst, SeqCst);
        }
    }

    /// The job's files and checkpoint into `work`, then the session.
    fn train(&self, job: &Value, work: &Path) -> Trained {
        let shared = self.shared;
        let hyper = hyper_of(job)?;
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
        let fetch = |file: &Value, name: &str| -> Result<Option<PathBuf>, String> {
            let Some(file) = file.as_str() else {
                return Ok(None);
            };
            let bytes = self
                .handle
                .block_on(dataset(shared, self.tenant, file, &hyper))?;
            let path = work.join(name);
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Some(path))
        };
        let data =
            fetch(&job["training_file"], "train.jsonl")?.ok_or("the job names no training_file")?;
        let eval = fetch(&job["validation_file"], "validation.jsonl")?;
        let out = work.join("adapter.safetensors");
        let checkpoint_path = session::sidecar(&out, "ckpt");
        let stored = self
            .handle
            .block_on(self.jobs().checkpoint(self.tenant, self.id))
            .map_err(|e| e.message().to_string())?;
        let resume = match stored {
            Some(bytes) => {
                std::fs::write(&checkpoint_path, bytes).map_err(|e| e.to_string())?;
                Some(Checkpoint::read(&checkpoint_path).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let init = match job["svfit"]["init"]["adapter"].as_str() {
            Some(id) if resume.is_none() => {
                let stored = self
                    .handle
                    .block_on(shared.store.get(self.tenant, id))
                    .map_err(|e| format!("the adapter to start from: {e}"))?;
                let from = format!("Starting from adapter {id} v{}", stored.version);
                let first = vec![event(&from, "info", None)];
                self.handle
                    .block_on(self.jobs().append_events(self.tenant, self.id, first, None))
                    .map_err(|e| e.message().to_string())?;
                Some(stored.adapter.clone())
            }
            _ => None,
        };
        let at = resume.as_ref().map_or(0, |c| c.state.step);
        self.step.store(at, SeqCst);
        let started = match at {
            0 => "Fine-tuning job started".to_string(),
            step => format!("Fine-tuning job resumed from its checkpoint at step {step}"),
        };
        let first = vec![event(&started, "info", None)];
        self.handle
            .block_on(
                self.jobs()
                    .append_events(self.tenant, self.id, first, Some(at)),
            )
            .map_err(|e| e.message().to_string())?;
        let config = &shared.config;
        let mut load = config.load.clone();
        load.weights = WeightFormat::Keep;
        let options = Options {
            model: config.model.clone(),
            load,
            gemm: true,
            full_rank: true,
            frozen: Frozen::Auto,
            targets: config.factors.targets.clone(),
            rank: config.factors.policy,
            data,
            eval,
            eval_split: 0.0,
            strict: true,
            out,
            hyper,
            default_warmup: true,
            stop_after: None,
            home: config.home.clone(),
            init,
        };
        let engine = shared.engine.clone();
        let pace = JobPace {
            running: self,
            pacer: Pacer::new(
                shared.engine.gate(),
                self.jobs().config.share,
                Box::new(move || engine.load() > 0),
            ),
        };
        let mut observer = JobObserver {
            running: self,
            checkpoint: checkpoint_path,
            total: job["svfit"]["total_steps"].as_u64().unwrap_or(0),
            pending: Vec::new(),
            flushed: Instant::now(),
            last_loss: None,
        };
        let result = session::run(&options, resume, &pace, &mut observer);
        observer.flush();
        match result {
            Ok(summary) if summary.outcome == Outcome::Finished => Ok(summary.adapter),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Records how the job ended: the adapter stored and the job
    /// `succeeded`, `failed` with the reason, or (stopped early) cancelled,
    /// left for the next runner, or left to the replica that took it.
    async fn finish(&self, job: &Value, trained: Trained) -> Result<(), Status> {
        let (jobs, tenant, id) = (self.jobs(), self.tenant, self.id);
        let adapter = match trained {
            Err(message) => {
                tracing::warn!(job = id, error = message, "fine-tuning job failed");
                set_failed(jobs, tenant, id, "training_failed", &message).await?;
                let failed = event(&format!("Job failed: {message}"), "error", None);
                return jobs.append_events(tenant, id, vec![failed], None).await;
            }
            Ok(adapter) => adapter,
        };
        let Some(adapter) = adapter else {
            let step = self.step.load(SeqCst);
            return match self.why.load(SeqCst) {
                SHUTDOWN => {
                    jobs.update(tenant, id, &mut |job| {
                        if job["svfit"]["lease"]["owner"] == self.me {
                            job["svfit"]["lease"] = Value::Null;
                        }
                        Ok(())
                    })
                    .await?;
                    let paused = format!("Paused at step {step}: the server stopped; the job resumes from its last checkpoint");
                    jobs.append_events(tenant, id, vec![event(&paused, "warn", None)], None)
                        .await
                }
                CANCEL => {
                    jobs.update(tenant, id, &mut |job| {
                        job["svfit"]["step"] = json!(step);
                        job["svfit"]["lease"] = Value::Null;
                        Ok(())
                    })
                    .await?;
                    let stopped = format!("Stopped after step {step}");
                    jobs.append_events(tenant, id, vec![event(&stopped, "info", None)], None)
                        .await?;
                    jobs.drop_checkpoint(tenant, id).await
                }
                _ => Ok(()),
            };
        };
        let model = model_id(id, job["suffix"].as_str());
        let bytes = std::fs::read(&adapter)
            .map_err(|e| Status::internal(format!("{}: {e}", adapter.display())))?;
        if let Err(e) = self.shared.store.put(tenant, &model, bytes).await {
            let message = format!("storing the trained adapter: {e}");
            set_failed(jobs, tenant, id, "training_failed", &message).await?;
            return Ok(());
        }
        let events = jobs.events(tenant, id).await.unwrap_or_default();
        let tokens: u64 = events
            .iter()
            .filter_map(|e| e["data"]["tokens"].as_u64())
            .sum();
        let step = self.step.load(SeqCst);
        jobs.update(tenant, id, &mut |job| {
            if job["status"] != CANCELLED {
                job["status"] = json!(SUCCEEDED);
                job["fine_tuned_model"] = json!(model);
                job["finished_at"] = json!(unix_now());
                job["trained_tokens"] = json!(tokens);
            }
            job["svfit"]["step"] = json!(step);
            job["svfit"]["lease"] = Value::Null;
            Ok(())
        })
        .await?;
        jobs.closed(tenant, id).await;
        let done = [
            format!("New fine-tuned model created: {model}"),
            "The job has successfully completed".to_string(),
        ];
        let done = done.iter().map(|m| event(m, "info", None)).collect();
        jobs.append_events(tenant, id, done, None).await?;
        jobs.drop_checkpoint(tenant, id).await
    }
}

/// A job's pace: stops when cancelled, the server stops or the lease is
/// lost; turns at the engine's gate.
struct JobPace<'a> {
    running: &'a Running<'a>,
    pacer: Pacer,
}

impl Pace for JobPace<'_> {
    fn stop(&self, _step: u64) -> bool {
        let r = self.running;
        if r.jobs().cancelled_here(r.id) {
            let _ = r.why.compare_exchange(GOING, CANCEL, SeqCst, SeqCst);
        }
        if r.jobs().stopping.load(SeqCst) {
            let _ = r.why.compare_exchange(GOING, SHUTDOWN, SeqCst, SeqCst);
        }
        r.why.load(SeqCst) != GOING
    }
    fn begin(&self) {
        self.pacer.begin();
    }
    fn end(&self) {
        self.pacer.end();
    }
}
