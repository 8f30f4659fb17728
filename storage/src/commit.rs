//! Group commit: many appenders, one `fdatasync`.
//!
//! An appender writes its frames (under the log's lock), then registers the files it dirtied
//! and a waiter tagged with a write sequence number. A sync round snapshots the dirty files and
//! the highest sequence written so far, syncs those files (outside every lock but the round
//! lock), then completes every waiter up to that sequence. Writes registered while a round
//! is syncing are covered by the next round, so N concurrent appenders share one sync.
//!
//! Rounds are run by a background thread (`FlushPolicy::Always`: as soon as there is work;
//! `FlushPolicy::Interval`: every interval, with waiters completed right after their write) or
//! by the owner through [`GroupCommit::sync_round`] (`FlushPolicy::Manual`, used by
//! deterministic crash simulations and on close). A failed sync fails the log: every pending
//! and later waiter gets an error (a failed `fdatasync` may have dropped dirty pages, so
//! retrying it would lie).

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{LogError, Result};
use crate::fs::FileHandle;
use crate::metrics::StorageMetrics;

/// When appends become durable and their callbacks fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Callbacks fire after an `fdatasync` covering the entry (default).
    Always,
    /// Callbacks fire right after the write; a background sync runs every interval. An
    /// explicit opt-out of durability: a crash loses up to one interval of acknowledged work.
    Interval(Duration),
    /// Callbacks fire only when the owner calls `flush()`.
    Manual,
}

/// Called once per append: `Ok` when durable per the policy, `Err` if the log failed first.
pub type DurableCallback = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Default)]
struct State {
    written_seq: u64,
    synced_seq: u64,
    dirty_files: Vec<Arc<dyn FileHandle>>,
    waiters: VecDeque<(u64, DurableCallback)>,
    failed: Option<String>,
    shutdown: bool,
}

pub(crate) struct GroupCommit {
    state: Mutex<State>,
    work: Condvar,
    round: Mutex<()>,
    metrics: Arc<StorageMetrics>,
    policy: FlushPolicy,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    pub fn new(metrics: Arc<StorageMetrics>, policy: FlushPolicy) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            round: Mutex::new(()),
            metrics,
            policy,
        })
    }

    /// Starts the background sync thread for the `Always` and `Interval` policies.
    pub fn spawn(self: &Arc<Self>) -> Option<JoinHandle<()>> {
        let me = Arc::clone(self);
        let run = move || me.run();
        match self.policy {
            FlushPolicy::Manual => None,
            _ => std::thread::Builder::new()
                .name("aq-log-sync".into())
                .spawn(run)
                .ok(),
        }
    }

    /// The error the log failed with, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state.lock().failed.clone()
    }

    /// Registers a completed write to `file` and the callback to fire once it is durable per
    /// the policy. Must be called in write order (under the log's lock). Never runs a
    /// callback itself: under `Interval` it hands the callback back, to be called with `Ok`
    /// once the caller has released its locks.
    #[must_use]
    pub fn register(
        &self,
        file: &Arc<dyn FileHandle>,
        cb: Option<DurableCallback>,
    ) -> Option<DurableCallback> {
        let mut st = self.state.lock();
        st.written_seq += 1;
        let seq = st.written_seq;
        if !st.dirty_files.iter().any(|f| Arc::ptr_eq(f, file)) {
            st.dirty_files.push(Arc::clone(file));
        }
        let cb = cb?;
        if matches!(self.policy, FlushPolicy::Interval(_)) && st.failed.is_none() {
            return Some(cb);
        }
        st.waiters.push_back((seq, cb));
        drop(st);
        self.work.notify_one();
        None
    }

    /// Registers a callback for an append that wrote nothing: it fires once everything written
    /// before it is durable, in order with the other callbacks. Like [`GroupCommit::register`]
    /// it may hand the callback back to be called with `Ok` at once.
    #[must_use]
    pub fn register_nothing(&self, cb: Option<DurableCallback>) -> Option<DurableCallback> {
        let cb = cb?;
        let mut st = self.state.lock();
        if st.failed.is_none()
            && st.waiters.is_empty()
            && (st.written_seq <= st.synced_seq || matches!(self.policy, FlushPolicy::Interval(_)))
        {
            return Some(cb);
        }
        let seq = st.written_seq;
        st.waiters.push_back((seq, cb));
        drop(st);
        self.work.notify_one();
        None
    }

    /// Makes everything registered so far durable and completes its waiters, on the caller's
    /// thread. Returns the error that failed the log, if any. Callbacks run here, in order;
    /// they must not call back into `flush`, `append_durable` or `close` of the same log.
    pub fn sync_round(&self) -> Result<()> {
        self.sync_round_counted().map(|_| ())
    }

    /// A sync round that also says how many waiters it completed and how long the syncs took.
    fn sync_round_counted(&self) -> Result<(usize, Duration)> {
        let _round = self.round.lock();
        let started = Instant::now();
        let (target, files, failed) = {
            let mut st = self.state.lock();
            let files = std::mem::take(&mut st.dirty_files);
            (st.written_seq, files, st.failed.clone())
        };
        let mut failure = failed;
        if failure.is_none() {
            for f in &files {
                let t0 = Instant::now();
                if let Err(e) = f.sync_data() {
                    failure = Some(format!("fdatasync failed: {e}"));
                    break;
                }
                StorageMetrics::add(&self.metrics.fsyncs, 1);
                StorageMetrics::add(&self.metrics.fsync_micros, t0.elapsed().as_micros() as u64);
            }
        }
        let done: Vec<_> = {
            let mut st = self.state.lock();
            if let Some(why) = &failure {
                st.failed.get_or_insert_with(|| why.clone());
                st.waiters.drain(..).collect()
            } else {
                st.synced_seq = st.synced_seq.max(target);
                let n = st.waiters.iter().take_while(|(s, _)| *s <= target).count();
                st.waiters.drain(..n).collect()
            }
        };
        let completed = done.len();
        let took = started.elapsed();
        StorageMetrics::add(&self.metrics.group_commit_waiters, completed as u64);
        for (_, cb) in done {
            cb(match &failure {
                None => Ok(()),
                Some(why) => Err(LogError::Failed(why.clone())),
            });
        }
        match failure {
            None => Ok((completed, took)),
            Some(why) => Err(LogError::Failed(why)),
        }
    }

    /// Marks the log failed (after a write error) so that no later append is acknowledged.
    /// Pending callbacks get the error from the next round (the sync thread's, or the owner's
    /// `flush` under `Manual`), never from the caller's thread while it holds the log's lock.
    pub fn fail(&self, why: String) {
        self.state.lock().failed.get_or_insert(why);
        self.work.notify_one();
    }

    /// Stops the background thread after a final round.
    pub fn shutdown(&self) {
        self.state.lock().shutdown = true;
        self.work.notify_all();
    }

    fn run(&self) {
        // Waiters completed by the previous round and how long its syncs took: appenders woken
        // by a round usually append again at once, so the next round briefly waits for as many
        // of them as it just completed (at most a quarter of a sync, capped at 500 µs; waiting
        // longer makes every sync cover all appenders but loses the overlap of writing and syncing). Without
        // that, concurrent appenders split into cohorts that alternate, each sync covering half
        // of them.
        let mut last = (0usize, Duration::ZERO);
        loop {
            {
                let mut st = self.state.lock();
                match self.policy {
                    FlushPolicy::Interval(every) => {
                        if !st.shutdown {
                            self.work.wait_for(&mut st, every);
                        }
                    }
                    _ => {
                        // After a failure only waiters (to be failed) are work: dirty files
                        // will never be synced again.
                        while !st.shutdown
                            && st.waiters.is_empty()
                            && (st.dirty_files.is_empty() || st.failed.is_some())
                        {
                            self.work.wait(&mut st);
                        }
                        if last.0 > 1 {
                            let deadline =
                                Instant::now() + (last.1 / 4).min(Duration::from_micros(500));
                            while !st.shutdown
                                && st.waiters.len() < last.0
                                && !self.work.wait_until(&mut st, deadline).timed_out()
                            {
                            }
                        }
                    }
                }
                if st.shutdown && st.dirty_files.is_empty() && st.waiters.is_empty() {
                    return;
                }
            }
            match self.sync_round_counted() {
                Ok(done) => last = done,
                Err(_) if self.state.lock().shutdown => return,
                Err(_) => last = (0, Duration::ZERO),
            }
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let waiters: Vec<_> = self.state.get_mut().waiters.drain(..).collect();
        for (_, cb) in waiters {
            cb(Err(LogError::Closed));
        }
    }
}
