//! The engine's front door: submit requests from any thread (async or not) and receive
//! each request's events on its own channel.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{EngineError, Result};
use crate::generator::TokenPicker;
use crate::request::{Event, Request};
use crate::sequence::{SeqId, Sequence, StopConditions};
use crate::stats::{EngineStats, StatsSnapshot};

/// What the engine accepts, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most tokens a sequence may hold (prompt + generated): the smallest of the model's
    /// `max_position_embeddings`, the configured limit and the cache's capacity.
    pub max_model_len: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Most requests queued (submitted, not yet admitted) before new ones are refused.
    pub max_waiting: usize,
}

/// A message to the engine thread.
pub(crate) enum Command {
    Submit(Box<Submission>),
    Cancel(SeqId),
    /// Stop admitting; finish what was accepted, then exit (aborting whatever is left
    /// at the deadline).
    Drain {
        deadline: Instant,
    },
}

/// A validated request on its way to the engine thread.
pub(crate) struct Submission {
    pub seq: Sequence,
    pub events: UnboundedSender<Event>,
    pub picker: Box<dyn TokenPicker + Send>,
    pub logprobs: Option<usize>,
}

/// State shared by every handle and the engine thread.
pub(crate) struct Shared {
    pub commands: Sender<Command>,
    pub limits: EngineLimits,
    pub stats: EngineStats,
    /// Submitted requests not yet admitted by the scheduler (the waiting queue's limit).
    pub pending: AtomicUsize,
    pub accepting: AtomicBool,
    pub next_id: AtomicU64,
}

/// A cloneable, thread-safe handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("limits", &self.shared.limits)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        EngineHandle { shared }
    }

    /// The engine's limits.
    pub fn limits(&self) -> EngineLimits {
        self.shared.limits
    }

    /// The engine's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Requests submitted but not yet admitted.
    pub fn num_pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// True until [`drain`](Self::drain) is called.
    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Relaxed)
    }

    /// Validates a request and queues it; never blocks.
    ///
    /// # Errors
    /// [`EngineError::Request`] for an empty prompt, a token id outside the vocabulary or
    /// `max_tokens` of 0; [`EngineError::PromptTooLong`]; [`EngineError::QueueFull`]
    /// when `max_waiting` requests are queued; [`EngineError::ShuttingDown`] after
    /// [`drain`](Self::drain); [`EngineError::Stopped`] if the engine thread is gone.
    pub fn submit(&self, req: Request) -> Result<RequestStream> {
        let limits = self.shared.limits;
        let max_tokens = self.validate(&req)?;
        if !self.is_accepting() {
            return Err(EngineError::ShuttingDown);
        }
        let pending = &self.shared.pending;
        if pending.fetch_add(1, Ordering::AcqRel) >= limits.max_waiting {
            pending.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull {
                max_waiting: limits.max_waiting,
            });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = StopConditions {
            max_tokens,
            stop_token_ids: req.stop_token_ids,
        };
        let (events, rx) = unbounded_channel();
        let submission = Submission {
            seq: Sequence::new(id, req.prompt, stop, limits.max_model_len),
            events,
            picker: req.picker,
            logprobs: req.logprobs,
        };
        if self
            .shared
            .commands
            .send(Command::Submit(Box::new(submission)))
            .is_err()
        {
            pending.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream {
            id,
            rx,
            shared: Arc::clone(&self.shared),
            done: false,
        })
    }

    /// Checks a request against the limits; returns its effective `max_tokens`.
    fn validate(&self, req: &Request) -> Result<usize> {
        let limits = self.shared.limits;
        if req.prompt.is_empty() {
            return Err(EngineError::Request("the prompt is empty".into()));
        }
        if let Some(&bad) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= limits.vocab_size)
        {
            return Err(EngineError::Request(format!(
                "token id {bad} is out of range: the vocabulary has {} tokens",
                limits.vocab_size
            )));
        }
        if req.prompt.len() >= limits.max_model_len {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: req.prompt.len(),
                max_model_len: limits.max_model_len,
            });
        }
        let room = limits.max_model_len - req.prompt.len();
        match req.max_tokens {
            Some(0) => Err(EngineError::Request("max_tokens must be at least 1".into())),
            Some(n) => Ok(n.min(room)),
            None => Ok(room),
        }
    }

    /// Cancels a request by id (also done by dropping its [`RequestStream`]).
    pub fn cancel(&self, id: SeqId) {
        let _ = self.shared.commands.send(Command::Cancel(id));
    }

    /// Stops accepting requests; the engine finishes those it has, aborts whatever is
    /// still running at `deadline`, then its [`run`](crate::Engine::run) returns.
    pub fn drain(&self, deadline: Instant) {
        self.shared.accepting.store(false, Ordering::Relaxed);
        let _ = self.shared.commands.send(Command::Drain { deadline });
    }
}

/// The events of one request. Dropping it cancels the request: the engine frees its
/// sequence at its next step.
pub struct RequestStream {
    id: SeqId,
    rx: UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    done: bool,
}

impl std::fmt::Debug for RequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl RequestStream {
    /// The request's id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event; `None` after the last one (or if the engine stopped).
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let event = self.rx.recv().await;
        self.note(&event);
        event
    }

    /// The next event, blocking the thread (for callers outside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let event = self.rx.blocking_recv();
        self.note(&event);
        event
    }

    fn note(&mut self, event: &Option<Event>) {
        if event.as_ref().is_none_or(Event::is_terminal) {
            self.done = true;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            // Wake the engine at once; it would also notice the closed channel.
            let _ = self.shared.commands.send(Command::Cancel(self.id));
        }
    }
}
