//! The engine loop: one thread owns the model's cache and buffers and runs steps.
//!
//! A step is three calls, as in nano-vllm's `LLMEngine.step`: [`Scheduler::schedule`]
//! picks the work, `Engine::run_model` runs one forward pass over it, and
//! `Engine::postprocess` samples, reports tokens and retires finished sequences.
//! Between steps the loop takes commands (new requests, cancels, drain) and drops the
//! sequences of clients that went away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use dsv2_backend::{AttentionPath, Backend, Batch, LogitsWanted};
use dsv2_model::{Model, Workspace};
use tokio::sync::mpsc::UnboundedSender;

use crate::block_manager::BlockManager;
use crate::error::{EngineError, Result};
use crate::generator::TokenPicker;
use crate::handle::{Command, EngineHandle, EngineLimits, Shared, Submission};
use crate::logprobs::token_logprobs;
use crate::request::{Event, Usage};
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, SeqId, Sequence};
use crate::stats::EngineStats;

/// How the engine is sized; everything is allocated once, at start-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Most sequences running at once (also the most logits rows of a step).
    pub max_num_seqs: usize,
    /// Most tokens per forward pass (the prefill chunk budget); sizes the workspace.
    pub max_num_batched_tokens: usize,
    /// Most requests waiting for admission before new ones are refused.
    pub max_waiting: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Memory budget of the paged latent cache, in bytes.
    pub kv_cache_bytes: usize,
    /// Optional cap on prompt + generated tokens (below the model's own limit).
    pub max_model_len: Option<usize>,
    /// Reuse full cache blocks across requests with equal prefixes.
    pub enable_prefix_caching: bool,
    /// Attention formulation (auto: expanded for prompts, absorbed for decode).
    pub attention: AttentionPath,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_waiting: 256,
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            max_model_len: None,
            enable_prefix_caching: true,
            attention: AttentionPath::Auto,
        }
    }
}

/// Per-request state that does not concern the scheduler.
struct RequestState {
    events: UnboundedSender<Event>,
    picker: Box<dyn TokenPicker + Send>,
    logprobs: Option<usize>,
}

/// The engine: model, paged cache, scheduler and the requests in flight.
pub struct Engine<'m, B: Backend> {
    backend: &'m B,
    model: &'m Model<B>,
    cache: B::Cache,
    workspace: Workspace<B>,
    /// `[max_num_seqs, V]` logits of one step's sampled rows.
    logits: Vec<f32>,
    batch: Batch,
    plan: Vec<ScheduledSeq>,
    finished: Vec<Sequence>,
    closed: Vec<SeqId>,
    /// `Finished` events of this step, sent once its blocks are free and the metrics
    /// published, so a client that got its answer sees the cache as it now is.
    finishing: Vec<(UnboundedSender<Event>, Event)>,
    scheduler: Scheduler,
    requests: HashMap<SeqId, RequestState>,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    attention: AttentionPath,
    drain_deadline: Option<Instant>,
}

impl<'m, B: Backend> Engine<'m, B> {
    /// Sizes the cache from the memory budget, allocates it and the step buffers, and
    /// returns the engine (to [`run`](Self::run) on this thread) and its handle.
    ///
    /// # Errors
    /// Inconsistent limits, a budget too small for one sequence, or an allocation failure.
    pub fn new(
        backend: &'m B,
        model: &'m Model<B>,
        config: EngineConfig,
    ) -> Result<(Self, EngineHandle)> {
        let c = config;
        if c.max_num_seqs == 0 || c.block_size == 0 || c.max_waiting == 0 {
            return Err(EngineError::Config(
                "max_num_seqs, block_size and max_waiting must be positive".into(),
            ));
        }
        if c.max_num_batched_tokens < c.max_num_seqs {
            return Err(EngineError::Config(format!(
                "max_num_batched_tokens ({}) must be at least max_num_seqs ({}): every \
                 running sequence decodes one token per step",
                c.max_num_batched_tokens, c.max_num_seqs
            )));
        }
        let per_block = backend
            .cache_bytes(model.cache_spec(1, c.block_size))
            .max(1);
        let num_blocks = (c.kv_cache_bytes / per_block).min(u32::MAX as usize - 1);
        let max_pos = model.config.max_position_embeddings;
        let max_model_len = c
            .max_model_len
            .unwrap_or(max_pos)
            .min(max_pos)
            .min(num_blocks * c.block_size);
        if max_model_len < 2 {
            return Err(EngineError::Config(format!(
                "the KV cache budget of {} bytes holds {num_blocks} blocks of {} tokens \
                 ({per_block} bytes each): too small for a sequence; raise the budget",
                c.kv_cache_bytes, c.block_size
            )));
        }
        let cache = backend.alloc_cache(model.cache_spec(num_blocks, c.block_size))?;
        let workspace = model.workspace(backend, c.max_num_batched_tokens)?;
        let (tx, commands) = channel();
        let stats = EngineStats::default();
        stats.blocks_total.store(num_blocks, Relaxed);
        let shared = Arc::new(Shared {
            commands: tx,
            limits: EngineLimits {
                max_model_len,
                vocab_size: model.config.vocab_size,
                max_waiting: c.max_waiting,
            },
            stats,
            pending: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
        });
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: c.max_num_seqs,
                max_num_batched_tokens: c.max_num_batched_tokens,
            },
            BlockManager::new(num_blocks, c.block_size, c.enable_prefix_caching),
        );
        let engine = Engine {
            backend,
            model,
            cache,
            workspace,
            logits: vec![0.0; c.max_num_seqs * model.config.vocab_size],
            batch: Batch::default(),
            plan: Vec::with_capacity(c.max_num_seqs),
            finished: Vec::with_capacity(c.max_num_seqs),
            closed: Vec::new(),
            finishing: Vec::with_capacity(c.max_num_seqs),
            scheduler,
            requests: HashMap::new(),
            commands,
            shared: Arc::clone(&shared),
            attention: c.attention,
            drain_deadline: None,
        };
        Ok((engine, EngineHandle::new(shared)))
    }

    /// A handle to this engine.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle::new(Arc::clone(&self.shared))
    }

    /// The scheduler (for inspection in tests).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Runs steps until drained (see [`EngineHandle::drain`]) or until every handle and
    /// stream is gone. Sleeps while there is nothing to do.
    ///
    /// Steps run on the engine thread; a CPU backend spreads each of its parallel loops
    /// over its thread team from here (`dsv2_cpu::team`).
    pub fn run(mut self) {
        while self.receive_commands() {
            if !self.scheduler.is_idle() {
                self.step();
            }
        }
        self.abort_all("the server is shutting down");
        self.publish_stats();
    }

    /// Takes pending commands (blocking while idle) and drops the sequences of clients
    /// that went away. Returns false when the loop should end.
    fn receive_commands(&mut self) -> bool {
        if self.scheduler.is_idle() {
            if self.drain_deadline.is_some() {
                return false;
            }
            match self.commands.recv() {
                Ok(cmd) => self.apply(cmd),
                Err(_) => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => self.apply(cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if self.scheduler.is_idle() {
                        return false;
                    }
                    break;
                }
            }
        }
        self.reap_closed();
        self.publish_stats();
        match self.drain_deadline {
            Some(deadline) if Instant::now() >= deadline => false,
            Some(_) => !self.scheduler.is_idle(),
            None => true,
        }
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(sub) => {
                let Submission {
                    seq,
                    events,
                    picker,
                    logprobs,
                } = *sub;
                self.requests.insert(
                    seq.id,
                    RequestState {
                        events,
                        picker,
                        logprobs,
                    },
                );
                self.scheduler.add(seq);
            }
            Command::Cancel(id) => self.abort(id, None),
            Command::Drain { deadline } => self.drain_deadline = Some(deadline),
        }
    }

    /// Cancels the requests whose event receiver was dropped.
    fn reap_closed(&mut self) {
        self.closed.clear();
        self.closed.extend(
            self.requests
                .iter()
                .filter(|(_, r)| r.events.is_closed())
                .map(|(&id, _)| id),
        );
        for i in 0..self.closed.len() {
            self.abort(self.closed[i], None);
        }
    }

    /// Removes a request wherever it is; tells its client why when `message` is given.
    fn abort(&mut self, id: SeqId, message: Option<&str>) {
        if let Some(seq) = self.scheduler.abort(id) {
            if seq.num_cached_prompt_tokens.is_none() {
                self.shared.pending.fetch_sub(1, Relaxed);
            }
            if let (Some(state), Some(msg)) = (self.requests.get(&id), message) {
                let _ = state.events.send(Event::Finished {
                    reason: FinishReason::Abort,
                    usage: usage(&seq),
                });
                log_abort(id, msg);
            }
        }
        self.requests.remove(&id);
    }

    fn abort_all(&mut self, message: &str) {
        let ids: Vec<SeqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.abort(id, Some(message));
        }
    }

    /// One iteration: schedule → run → postprocess.
    pub fn step(&mut self) {
        self.scheduler.schedule(&mut self.plan);
        if self.plan.is_empty() {
            return;
        }
        self.announce_admissions();
        match self.run_model() {
            Ok(()) => {
                self.scheduler.complete(&self.plan);
                self.postprocess();
            }
            Err(e) => self.fail_step(&e),
        }
        self.shared.stats.num_steps.fetch_add(1, Relaxed);
        self.publish_stats();
        for (events, event) in self.finishing.drain(..) {
            let _ = events.send(event);
        }
    }

    /// Sends `Started` to newly admitted requests.
    fn announce_admissions(&mut self) {
        for p in &self.plan {
            if !p.is_first_admission {
                continue;
            }
            self.shared.pending.fetch_sub(1, Relaxed);
            let seq = &self.scheduler.running()[p.index];
            if let Some(state) = self.requests.get(&p.seq_id) {
                let cached_tokens = seq.num_cached_prompt_tokens.unwrap_or(0);
                let _ = state.events.send(Event::Started { cached_tokens });
            }
        }
    }

    /// Builds the batch from the plan and runs the forward pass; logits of the rows to
    /// sample land in `self.logits`.
    fn run_model(&mut self) -> Result<()> {
        let block_size = self.scheduler.block_manager().block_size();
        self.batch.clear();
        for p in &self.plan {
            let seq = &self.scheduler.running()[p.index];
            let start = seq.num_computed_tokens;
            let want = if p.wants_logits {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            self.batch.push_seq(
                &seq.token_ids[start..start + p.num_new_tokens],
                start,
                &seq.block_table,
                block_size,
                want,
            );
            if p.num_new_tokens > 1 {
                // A chunk of the prompt (or of a preempted sequence's recomputation):
                // every chunk carries the whole length.
                self.batch.set_prompt_len(seq.token_ids.len());
            }
        }
        self.model.forward(
            self.backend,
            &self.batch,
            &mut self.cache,
            &mut self.workspace,
            self.attention,
            &mut self.logits,
        )?;
        Ok(())
    }

    /// Samples the next token of each sequence whose logits were computed, reports it,
    /// and retires finished and abandoned sequences.
    fn postprocess(&mut self) {
        let vocab = self.model.config.vocab_size;
        let mut row = 0;
        for p in &self.plan {
            if !p.wants_logits {
                continue;
            }
            let logits = &self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let seq = self.scheduler.running_mut(p.index);
            let Some(state) = self.requests.get_mut(&p.seq_id) else {
                self.scheduler.finish(p.index, FinishReason::Abort);
                continue;
            };
            let token_id = state.picker.pick(logits, seq.completion_tokens());
            let logprobs = state.logprobs.map(|k| token_logprobs(logits, token_id, k));
            let finish = seq.append_token(token_id);
            let delivered = state
                .events
                .send(Event::Token { token_id, logprobs })
                .is_ok();
            match (delivered, finish) {
                (false, _) => {
                    // The client is gone.
                    self.scheduler.finish(p.index, FinishReason::Abort);
                    self.requests.remove(&p.seq_id);
                }
                (true, Some(reason)) => {
                    let usage = usage(seq);
                    self.scheduler.finish(p.index, reason);
                    if let Some(state) = self.requests.remove(&p.seq_id) {
                        self.finishing
                            .push((state.events, Event::Finished { reason, usage }));
                    }
                }
                (true, None) => {}
            }
        }
        self.scheduler.take_finished(&mut self.finished);
        self.finished.clear();
    }

    /// A failed forward pass ends the requests it carried, not the engine.
    fn fail_step(&mut self, e: &EngineError) {
        self.shared.stats.num_step_failures.fetch_add(1, Relaxed);
        let message = format!("the forward pass failed: {e}");
        eprintln!("dsv2 engine: {message}");
        let ids: Vec<SeqId> = self.plan.iter().map(|p| p.seq_id).collect();
        for id in ids {
            if let Some(state) = self.requests.get(&id) {
                let _ = state.events.send(Event::Error {
                    message: message.clone(),
                });
            }
            self.abort(id, None);
        }
    }

    fn publish_stats(&self) {
        let s = &self.shared.stats;
        let blocks = self.scheduler.block_manager();
        s.num_running.store(self.scheduler.num_running(), Relaxed);
        s.num_waiting.store(self.scheduler.num_waiting(), Relaxed);
        s.blocks_used.store(blocks.num_used(), Relaxed);
        let prefix = blocks.stats();
        s.prefix_queries.store(prefix.queries, Relaxed);
        s.prefix_hits.store(prefix.hits, Relaxed);
        s.num_preemptions
            .store(self.scheduler.num_preemptions(), Relaxed);
    }
}

fn usage(seq: &Sequence) -> Usage {
    Usage {
        prompt_tokens: seq.num_prompt_tokens,
        completion_tokens: seq.num_completion_tokens(),
        cached_tokens: seq.num_cached_prompt_tokens.unwrap_or(0),
    }
}

fn log_abort(id: SeqId, message: &str) {
    eprintln!("dsv2 engine: request {id} aborted: {message}");
}
