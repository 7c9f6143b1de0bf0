//! Errors of the engine.

use dsv2_backend::BackendError;
use dsv2_model::ModelError;

/// Why a request could not be served or the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request itself is invalid (empty prompt, token id outside the vocabulary, ...).
    #[error("{0}")]
    Request(String),
    /// The prompt leaves no room for a generated token.
    #[error(
        "the prompt has {prompt_tokens} tokens but this model's context limit is \
         {max_model_len} tokens (prompt plus at least one generated token); shorten the prompt"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The context limit (see `EngineLimits::max_model_len`).
        max_model_len: usize,
    },
    /// The waiting queue is full; try again later.
    #[error("the server is busy: {max_waiting} requests are already waiting; retry later")]
    QueueFull {
        /// The configured limit.
        max_waiting: usize,
    },
    /// The engine is draining and accepts no new requests.
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// Inconsistent engine settings (names the setting).
    #[error("engine configuration: {0}")]
    Config(String),
    /// The forward pass failed (names the op or input).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The backend failed (allocation, device).
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Result alias for `dsv2-engine`.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
