//! Shared foundations of dsv2: the model configuration, checkpoint reading and the
//! tensor inventory a configuration implies.
//!
//! - [`ModelConfig`] parses and validates a `config.json` of the DeepSeek-V2 family.
//! - [`Checkpoint`] memory-maps `model.safetensors` or the shards of
//!   `model.safetensors.index.json` and hands out [`TensorView`]s.
//! - [`quant`] defines the `q8`/`q4` block formats and quantizes dense tensors.
//! - [`isa`] says which instruction sets the CPU kernels may use (`DSV2_CPU_ISA`).
//! - [`expected_tensors`] lists the tensors a config implies, so a checkpoint is checked
//!   for presence, shape and dtype before any compute.
//!
//!
//! The text side:
//! - [`Tokenizer`] loads `tokenizer.json` + `tokenizer_config.json` (or the built-in
//!   DeepSeek-V2 tokenizer) and encodes like transformers 4.x's `LlamaTokenizerFast`;
//!   [`ChatTemplate`] renders chats as transformers' `apply_chat_template` does.
//! - [`StreamDecoder`] / [`TextStream`] turn generated ids into text pieces.
//! - [`Sampler`] picks tokens by [`SamplingParams`] (defaults from [`GenerationConfig`]);
//!   [`StopMatcher`] finds stop strings across token boundaries.
//! - [`resolve_model`] turns `--model owner/name` into a folder in the HF cache.
//!
//! ```no_run
//! use dsv2_core::{Checkpoint, ModelConfig, expected_tensors};
//! let dir = std::path::Path::new("DeepSeek-V2-Lite");
//! let config = ModelConfig::from_file(&dir.join("config.json"))?;
//! let checkpoint = Checkpoint::open(dir)?;
//! checkpoint.validate(&expected_tensors(&config))?;
//! # Ok::<(), dsv2_core::CoreError>(())
//! ```

pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod detokenize;
pub mod error;
pub mod generation_config;
pub mod hub;
pub mod hugemem;
pub mod inventory;
pub mod isa;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

pub use checkpoint::{Bytes, Checkpoint, DType, ExpectedTensor, TensorView, Weight};
pub use config::{ModelConfig, MoeConfig, TopkMethod, YarnScaling};
pub use error::{CoreError, Result};
pub use inventory::expected_tensors;
pub use quant::{QuantFormat, QuantizedTensor};

pub use chat_template::ChatTemplate;
pub use detokenize::{FinishReason, StreamDecoder, StreamStep, TextStream};
pub use generation_config::GenerationConfig;
pub use hub::{download, resolve_model, resolve_model_with, HubOptions, ModelFiles, ModelSource};
pub use sampling::{Sampler, SamplingOverrides, SamplingParams, StopMatcher, StopOutput};
pub use tokenizer::{ChatMessage, SpecialToken, Tokenizer};
