//! Admission's waiting room: the requests submitted but not yet running,
//! counted per tenant against the queue's and the tenant's limits, and
//! queued per tenant on the engine thread, which takes them round-robin
//! over tenants so that one tenant's flood cannot starve the others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::{EngineConfig, Job, Stats, SubmitError};

/// Requests waiting for admission, per tenant (shared by the handles,
/// which add, and the engine thread, which removes).
#[derive(Default)]
pub(super) struct Waiting(std::sync::Mutex<HashMap<String, usize>>);

impl Waiting {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Held for one map operation; a panic cannot leave it half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more request of `tenant` waiting, in its tenant's count
    /// and in `queued`, unless either is at its limit.
    pub(super) fn enter(
        &self,
        tenant: &str,
        config: &EngineConfig,
        queued: &AtomicUsize,
    ) -> Result<(), SubmitError> {
        self.join(tenant, config.tenant_queue_limit)
            .map_err(SubmitError::TenantQueueFull)?;
        let before = queued.fetch_add(1, Relaxed);
        if before >= config.queue_limit {
            self.withdraw(tenant, queued);
            return Err(SubmitError::QueueFull(before));
        }
        Ok(())
    }

    /// Undoes one [`Waiting::enter`] of `tenant`: the request never
    /// reached the engine thread.
    pub(super) fn withdraw(&self, tenant: &str, queued: &AtomicUsize) {
        queued.fetch_sub(1, Relaxed);
        self.leave(tenant, 1);
    }

    /// Counts one more waiting request of `tenant`, unless it has `limit`.
    fn join(&self, tenant: &str, limit: usize) -> Result<(), usize> {
        let mut counts = self.counts();
        let n = counts.entry(tenant.to_string()).or_default();
        if *n >= limit {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    fn leave(&self, tenant: &str, gone: usize) {
        let mut counts = self.counts();
        if let Some(n) = counts.get_mut(tenant) {
            *n = n.saturating_sub(gone);
            if *n == 0 {
                counts.remove(tenant);
            }
        }
    }
}

/// The jobs waiting on the engine thread: per tenant in arrival order, and
/// the tenants that have some in round-robin order. A job leaving the
/// queue leaves the counts of [`Waiting`] and `Stats::queued` too.
pub(super) struct Pending {
    jobs: HashMap<String, VecDeque<Box<Job>>>,
    tenants: VecDeque<String>,
    waiting: Arc<Waiting>,
    stats: Arc<Stats>,
}

impl Pending {
    pub(super) fn new(waiting: Arc<Waiting>, stats: Arc<Stats>) -> Self {
        Pending {
            jobs: HashMap::new(),
            tenants: VecDeque::new(),
            waiting,
            stats,
        }
    }

    /// Whether no job waits.
    pub(super) fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Tenants with jobs waiting.
    pub(super) fn tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Queues `job` behind its tenant's others.
    pub(super) fn push(&mut self, job: Box<Job>) {
        let tenant = job.tenant.clone();
        let queue = self.jobs.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.tenants.push_back(tenant);
        }
        queue.push_back(job);
    }

    /// The oldest job of the tenant whose turn it is. The tenant is out of
    /// the round until the job [`started`](Pending::started) or was
    /// [`put back`](Pending::put_back).
    pub(super) fn pop(&mut self) -> Option<(String, Box<Job>)> {
        let tenant = self.tenants.pop_front()?;
        let queue = self
            .jobs
            .get_mut(&tenant)
            .expect("listed tenants have jobs");
        let job = queue.pop_front().expect("listed tenants have jobs");
        Some((tenant, job))
    }

    /// `tenant`'s popped job left the queue (it runs, or it failed): the
    /// tenant's turn comes again after the others'.
    pub(super) fn started(&mut self, tenant: String) {
        self.stats.queued.fetch_sub(1, Relaxed);
        self.waiting.leave(&tenant, 1);
        if !self.jobs[&tenant].is_empty() {
            self.tenants.push_back(tenant);
        }
    }

    /// `tenant`'s popped job cannot start now: it keeps its place in its
    /// tenant's queue, and the tenant's turn comes again after the others'.
    pub(super) fn put_back(&mut self, tenant: String, job: Box<Job>) {
        self.jobs.get_mut(&tenant).expect("listed").push_front(job);
        self.tenants.push_back(tenant);
    }

    /// Drops the jobs whose client left or whose deadline passed, telling
    /// those whose client still listens.
    pub(super) fn drop_cancelled(&mut self, now: Instant) {
        for (tenant, queue) in self.jobs.iter_mut() {
            let before = queue.len();
            queue.retain(|job| {
                let cancelled = job.is_cancelled(now);
                if cancelled {
                    job.tell_cancelled();
                }
                !cancelled
            });
            let gone = before - queue.len();
            if gone > 0 {
                self.stats.queued.fetch_sub(gone, Relaxed);
                self.waiting.leave(tenant, gone);
                self.stats
                    .requests_cancelled
                    .fetch_add(gone as u64, Relaxed);
            }
        }
        self.tenants.retain(|t| !self.jobs[t].is_empty());
    }
}
