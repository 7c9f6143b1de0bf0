//! Running the model on requests: cache blocks and generation loops.
//!
//! - [`BlockAllocator`] hands out fixed-size blocks of the paged latent cache.
//! - [`Generator`] generates one sequence at a time: one prefill, then one cached
//!   decode step per token, with a [`TokenPicker`] choosing each token.

pub mod block_allocator;
pub mod error;
pub mod generator;

pub use block_allocator::BlockAllocator;
pub use error::{EngineError, Result};
pub use generator::{argmax, FinishReason, Generation, Generator, Greedy, TokenPicker, BLOCK_SIZE};
