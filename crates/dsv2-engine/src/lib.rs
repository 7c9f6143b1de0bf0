//! Running the model on requests: sequences, the paged latent cache's blocks,
//! continuous batching and the engine loop.
//!
//! - [`Sequence`]: one request's tokens, block table and stop conditions.
//! - [`BlockManager`]: fixed-size cache blocks with a free list, reference counts and
//!   prefix caching (full blocks keyed by their content, shared across requests,
//!   evicted least recently used).
//! - [`Scheduler`]: iteration-level batching: each step runs one decode token per
//!   running sequence plus prompt chunks within a token budget, preempting (and later
//!   recomputing) sequences when blocks run out.
//! - [`Engine`]: owns the cache and buffers on its own thread and runs steps
//!   (schedule → run → postprocess); [`EngineHandle`] submits [`Request`]s from any
//!   thread and returns a [`RequestStream`] of [`Event`]s.
//! - [`Generator`]: the simple one-sequence loop behind `dsv2 generate`, with a
//!   [`TokenPicker`] choosing each token.
//!
//! ```no_run
//! use dsv2_backend::ComputeDtype;
//! use dsv2_engine::{Engine, EngineConfig, Event, Greedy, Request};
//! let backend = dsv2_cpu::CpuBackend::new(ComputeDtype::F32);
//! let config = dsv2_model::synthetic::builtin_config();
//! let checkpoint = dsv2_model::synthetic::synthetic_checkpoint(
//!     &config, dsv2_model::synthetic::BUILTIN_SEED, dsv2_core::DType::BF16);
//! let model = dsv2_model::Model::load(&backend, config, &checkpoint)?;
//! let (engine, handle) = Engine::new(&backend, &model, EngineConfig::default())?;
//! std::thread::scope(|s| {
//!     s.spawn(move || engine.run());
//!     let mut stream = handle.submit(Request {
//!         prompt: vec![1, 2, 3],
//!         max_tokens: Some(8),
//!         stop_token_ids: vec![],
//!         picker: Box::new(Greedy),
//!         logprobs: None,
//!     })?;
//!     while let Some(event) = stream.blocking_next() {
//!         if let Event::Token { token_id, .. } = event {
//!             println!("{token_id}");
//!         }
//!     }
//!     handle.drain(std::time::Instant::now());
//!     Ok::<(), dsv2_engine::EngineError>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod block_allocator;
pub mod block_manager;
pub mod engine;
pub mod error;
pub mod generator;
pub mod handle;
pub mod logprobs;
pub mod request;
pub mod scheduler;
pub mod sequence;
pub mod stats;

pub use block_allocator::BlockAllocator;
pub use block_manager::{BlockHash, BlockManager, PrefixCacheStats};
pub use engine::{Engine, EngineConfig};
pub use error::{EngineError, Result};
pub use generator::{argmax, Generation, Generator, Greedy, TokenPicker, BLOCK_SIZE};
pub use handle::{EngineHandle, EngineLimits, RequestStream};
pub use logprobs::log_normalizer;
pub use request::{Event, Request, TokenLogprobs, Usage};
pub use scheduler::{ScheduledSeq, Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, SeqId, Sequence, SequenceStatus, StopConditions};
pub use stats::{EngineStats, StatsSnapshot};
