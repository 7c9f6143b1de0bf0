//! Shared foundations of dsv2: the model configuration, checkpoint reading and the
//! tensor inventory a configuration implies.
//!
//! - [`ModelConfig`] parses and validates a `config.json` of the DeepSeek-V2 family.
//! - [`Checkpoint`] memory-maps `model.safetensors` or the shards of
//!   `model.safetensors.index.json` and hands out [`TensorView`]s.
//! - [`quant`] defines the `q8`/`q4` block formats and quantizes dense tensors.
//! - [`expected_tensors`] lists the tensors a config implies, so a checkpoint is checked
//!   for presence, shape and dtype before any compute.
//!
//! ```no_run
//! use dsv2_core::{Checkpoint, ModelConfig, expected_tensors};
//! let dir = std::path::Path::new("DeepSeek-V2-Lite");
//! let config = ModelConfig::from_file(&dir.join("config.json"))?;
//! let checkpoint = Checkpoint::open(dir)?;
//! checkpoint.validate(&expected_tensors(&config))?;
//! # Ok::<(), dsv2_core::CoreError>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod inventory;
pub mod quant;

pub use checkpoint::{Bytes, Checkpoint, DType, ExpectedTensor, TensorView, Weight};
pub use config::{ModelConfig, MoeConfig, TopkMethod, YarnScaling};
pub use error::{CoreError, Result};
pub use inventory::expected_tensors;
pub use quant::{QuantFormat, QuantizedTensor};
