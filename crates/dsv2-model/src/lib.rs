//! The DeepSeek-V2 forward pass, written once over [`dsv2_backend::Backend`].
//!
//! - [`Model`] holds a layer stack loaded from a validated [`dsv2_core::Checkpoint`]
//!   and runs [`Model::forward`] on a [`dsv2_backend::Batch`] of several sequences
//!   against a paged latent cache the caller owns.
//! - [`Rope`] computes the (YaRN) RoPE angles; [`synthetic`] makes in-memory models (the
//!   built-in default model, random weights of any config).
//!
//! ```no_run
//! use dsv2_backend::{AttentionPath, Batch, Backend, ComputeDtype, LogitsWanted};
//! use dsv2_model::Model;
//! let backend = dsv2_cpu::CpuBackend::new(ComputeDtype::F32);
//! let config = dsv2_model::synthetic::builtin_config();
//! let checkpoint = dsv2_model::synthetic::synthetic_checkpoint(
//!     &config, dsv2_model::synthetic::BUILTIN_SEED, dsv2_core::DType::BF16);
//! let model = Model::load(&backend, config, &checkpoint)?;
//! let mut cache = backend.alloc_cache(model.cache_spec(1, 64))?;
//! let mut ws = model.workspace(&backend, 64)?;
//! let mut batch = Batch::default();
//! batch.push_seq(&[1, 2, 3], 0, &[0], 64, LogitsWanted::Last);
//! let mut logits = vec![0.0; model.config.vocab_size];
//! model.forward(&backend, &batch, &mut cache, &mut ws, AttentionPath::Auto, &mut logits)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod model;
pub mod rope;
pub mod synthetic;

pub use error::{ModelError, Result};
pub use model::{Attention, FeedForward, Layer, LoadOptions, Model, QueryProj, Workspace};
pub use rope::Rope;
