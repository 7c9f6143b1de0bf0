//! Errors of loading and running the model.

use dsv2_backend::BackendError;
use dsv2_core::CoreError;

/// Why a model could not be loaded or a step could not run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The config or checkpoint is wrong (names the key, tensor or file).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The backend failed (names the op or weight).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The batch cannot run (bad token id, position past the context, ...).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result alias for `dsv2-model`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
