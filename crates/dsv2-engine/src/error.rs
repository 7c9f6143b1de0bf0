//! Errors of the engine.

use dsv2_backend::BackendError;
use dsv2_model::ModelError;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request itself is invalid (empty or over-long prompt, ...).
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Result alias for `dsv2-engine`.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
