//! The error type of `dsv2-core`: every variant names the key, tensor or file at fault.

use std::path::PathBuf;

/// Errors from reading configs and checkpoints.
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
}

impl CoreError {
    pub(crate) fn config(key: &str, problem: impl Into<String>) -> Self {
        CoreError::Config {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

/// Result alias for `dsv2-core`.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
