//! Counters the engine thread publishes for metrics, readable from any thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Live engine counters, updated by the engine thread after each step.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub(crate) num_running: AtomicUsize,
    pub(crate) num_waiting: AtomicUsize,
    pub(crate) blocks_used: AtomicUsize,
    pub(crate) blocks_total: AtomicUsize,
    pub(crate) prefix_queries: AtomicU64,
    pub(crate) prefix_hits: AtomicU64,
    pub(crate) num_preemptions: AtomicU64,
    pub(crate) num_steps: AtomicU64,
    pub(crate) num_step_failures: AtomicU64,
}

/// A copy of [`EngineStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Sequences holding cache blocks.
    pub num_running: usize,
    /// Sequences queued (new or preempted).
    pub num_waiting: usize,
    /// Cache blocks held by sequences.
    pub blocks_used: usize,
    /// Cache blocks in total.
    pub blocks_total: usize,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Of those, tokens found.
    pub prefix_hits: u64,
    /// Preemptions so far.
    pub num_preemptions: u64,
    /// Forward steps run.
    pub num_steps: u64,
    /// Forward steps that failed (their requests ended with an error).
    pub num_step_failures: u64,
}

impl EngineStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            num_running: self.num_running.load(Relaxed),
            num_waiting: self.num_waiting.load(Relaxed),
            blocks_used: self.blocks_used.load(Relaxed),
            blocks_total: self.blocks_total.load(Relaxed),
            prefix_queries: self.prefix_queries.load(Relaxed),
            prefix_hits: self.prefix_hits.load(Relaxed),
            num_preemptions: self.num_preemptions.load(Relaxed),
            num_steps: self.num_steps.load(Relaxed),
            num_step_failures: self.num_step_failures.load(Relaxed),
        }
    }
}
