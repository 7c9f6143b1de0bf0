//! What every handler shares: settings, the engine once loaded, metrics, drain state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dsv2_engine::EngineHandle;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::text::TextModel;

/// Settings of the HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port to listen on (0 picks a free one).
    pub port: u16,
    /// When set, API routes require `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// A request still running after this long is cancelled (504, or an error event).
    pub request_timeout: Option<Duration>,
    /// On SIGTERM, how long running requests may take to finish before they are aborted.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            request_timeout: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The loaded model's side of the server.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Submits requests to the engine thread.
    pub engine: EngineHandle,
    /// Tokenizer, chat template and sampling defaults.
    pub text: Arc<TextModel>,
}

/// State shared by the handlers.
#[derive(Debug)]
pub struct AppState {
    /// The server's settings.
    pub config: ServerConfig,
    /// Set once the model is loaded and the engine runs.
    pub ready: OnceLock<Ready>,
    draining: AtomicBool,
    /// Latency histograms and counters.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// A server still loading its model.
    pub fn new(config: ServerConfig) -> Self {
        AppState {
            config,
            ready: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// True once shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops admitting requests (health turns 503).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Begins shutdown: new requests get 503 and health turns 503; running requests get
    /// `drain_timeout` to finish, then the engine loop ends. Returns false while the
    /// model is still loading (there is nothing to drain).
    pub fn drain(&self) -> bool {
        self.start_draining();
        match self.ready.get() {
            Some(ready) => {
                ready
                    .engine
                    .drain(std::time::Instant::now() + self.config.drain_timeout);
                true
            }
            None => false,
        }
    }

    /// The engine, for a request that generates: 503 while loading or draining.
    pub fn ready(&self) -> Result<Ready, ApiError> {
        if self.is_draining() {
            return Err(ApiError::unavailable(
                "The server is shutting down and accepts no new requests",
                5,
            ));
        }
        self.ready_or_loading()
    }

    /// The engine, for a read-only request: 503 only while loading.
    pub fn ready_or_loading(&self) -> Result<Ready, ApiError> {
        self.ready
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("The model is still loading", 5))
    }
}
