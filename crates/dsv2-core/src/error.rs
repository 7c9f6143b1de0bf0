//! The error type of `dsv2-core`: every variant names the key, tensor or file at fault.

use std::path::PathBuf;

/// Errors from reading configs, checkpoints and tokenizers, rendering chat templates,
/// sampling and resolving hub models.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A config key is missing, has the wrong type, or holds a value we do not support.
    #[error("config.json: key `{key}`: {problem}")]
    Config { key: String, problem: String },

    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A checkpoint file or one of its tensors is broken or does not match the config.
    #[error("checkpoint {file}: tensor `{tensor}`: {problem}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        problem: String,
    },

    /// A checkpoint-level problem that is not about one tensor.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },

    /// A tokenizer could not be loaded (`source` names the file or "built-in"), or
    /// encoding/decoding failed.
    #[error("tokenizer ({source_name}): {problem}")]
    Tokenizer {
        source_name: String,
        problem: String,
    },

    /// A chat template is missing, does not compile or fails to render.
    #[error("chat template: {problem}")]
    ChatTemplate { problem: String },

    /// A key of `generation_config.json` has the wrong type or an invalid value.
    #[error("generation_config.json: key `{key}`: {problem}")]
    GenerationConfig { key: String, problem: String },

    /// A sampling parameter is out of range (e.g. a negative temperature).
    #[error("sampling parameter `{param}`: {problem}")]
    Sampling { param: String, problem: String },

    /// A model given as a hub id could not be resolved or downloaded.
    #[error("model `{repo}`: {problem}")]
    Hub { repo: String, problem: String },

    /// A model argument is neither an existing folder nor a hub id.
    #[error("model `{spec}`: {problem}")]
    ModelSpec { spec: String, problem: String },
}

impl CoreError {
    pub(crate) fn config(key: &str, problem: impl Into<String>) -> Self {
        CoreError::Config {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

impl CoreError {
    pub(crate) fn tokenizer(source_name: impl Into<String>, problem: impl Into<String>) -> Self {
        CoreError::Tokenizer {
            source_name: source_name.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn chat_template(problem: impl Into<String>) -> Self {
        CoreError::ChatTemplate {
            problem: problem.into(),
        }
    }

    pub(crate) fn sampling(param: &str, problem: impl Into<String>) -> Self {
        CoreError::Sampling {
            param: param.to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn hub(repo: &str, problem: impl Into<String>) -> Self {
        CoreError::Hub {
            repo: repo.to_string(),
            problem: problem.into(),
        }
    }
}

/// Result alias for `dsv2-core`.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
