//! An OpenAI- and DeepSeek-compatible HTTP API over the dsv2 engine.
//!
//! - [`Server::start`] binds the port and answers at once (`/health` is 503 while the
//!   model loads) on its own thread with a tokio runtime.
//! - [`Server::run_engine`] starts the [`dsv2_engine::Engine`] on the calling thread (the
//!   engine thread owns the model's cache and buffers; handlers talk to it through an
//!   [`dsv2_engine::EngineHandle`]) and returns once the server has drained.
//! - Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, the
//!   same without `/v1` (DeepSeek's paths), `GET /health` and `GET /metrics`
//!   (Prometheus). [`protocol`] parses requests, [`generate`] turns engine events into
//!   text, [`respond`] writes OpenAI's response and SSE chunk shapes.
//! - SIGTERM (or Ctrl-C) drains: new requests get 503, running ones finish up to the
//!   drain deadline, then the process exits; a second signal exits at once.
//!
//! ```no_run
//! # fn demo<B: dsv2_backend::Backend>(backend: &B, model: &dsv2_model::Model<B>,
//! #     text: dsv2_server::TextModel) -> anyhow::Result<()> {
//! let server = dsv2_server::Server::start(dsv2_server::ServerConfig::default())?;
//! server.run_engine(backend, model, text, dsv2_engine::EngineConfig::default())?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod generate;
pub mod metrics;
pub mod protocol;
pub mod respond;
pub mod routes;
pub mod state;
pub mod text;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use dsv2_backend::Backend;
use dsv2_engine::{Engine, EngineConfig};
use dsv2_model::Model;
use tokio::sync::watch;

pub use error::ApiError;
pub use state::{AppState, Ready, ServerConfig};
pub use text::TextModel;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 32 << 20;
/// How long to wait for open connections once the engine has drained.
const HTTP_STOP_GRACE: Duration = Duration::from_secs(10);

/// The application's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/models/{id}", get(routes::model))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            routes::require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            routes::count_errors,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A running HTTP server, waiting for (or running) its engine.
pub struct Server {
    state: Arc<AppState>,
    addr: SocketAddr,
    stop_http: watch::Sender<bool>,
    http_done: std::sync::mpsc::Receiver<Result<()>>,
}

impl Server {
    /// Binds `host:port` and starts answering on a thread of its own; generation
    /// requests get 503 until [`run_engine`](Self::run_engine) attaches the model.
    ///
    /// # Errors
    /// The address cannot be bound, or the runtime cannot start.
    pub fn start(config: ServerConfig) -> Result<Server> {
        let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
            .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AppState::new(config));
        let (stop_http, stop_rx) = watch::channel(false);
        let (done_tx, http_done) = std::sync::mpsc::channel();
        let st = Arc::clone(&state);
        std::thread::Builder::new()
            .name("dsv2-http".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("dsv2-http")
                    .enable_all()
                    .build()
                    .context("starting the async runtime")
                    .and_then(|rt| rt.block_on(serve(listener, st, stop_rx)));
                let _ = done_tx.send(result);
            })
            .context("spawning the HTTP thread")?;
        eprintln!("dsv2: listening on http://{addr}");
        Ok(Server {
            state,
            addr,
            stop_http,
            http_done,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state the handlers share (to drain the server without a signal, e.g. in tests).
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Starts the engine on this thread and serves until drained (SIGTERM), then stops
    /// the HTTP server and returns.
    ///
    /// # Errors
    /// The engine cannot start (limits, cache budget) or the HTTP server failed.
    pub fn run_engine<B: Backend>(
        self,
        backend: &B,
        model: &Model<B>,
        text: TextModel,
        config: EngineConfig,
    ) -> Result<()> {
        let (engine, handle) =
            Engine::new(backend, model, config).context("starting the engine")?;
        let limits = handle.limits();
        let stats = handle.stats();
        eprintln!(
            "dsv2: serving `{}` (also as `{}`) on {}: context {} tokens, {} KV-cache blocks \
             of {} tokens, {}",
            text.name,
            text::DEEPSEEK_CHAT,
            self.addr,
            limits.max_model_len,
            stats.blocks_total,
            config.block_size,
            backend.describe()
        );
        let _ = self.state.ready.set(Ready {
            engine: handle.clone(),
            text: Arc::new(text),
        });
        if self.state.is_draining() {
            handle.drain(Instant::now() + self.state.config.drain_timeout);
        }
        engine.run();
        eprintln!("dsv2: engine drained; stopping the HTTP server");
        let _ = self.stop_http.send(true);
        match self.http_done.recv_timeout(HTTP_STOP_GRACE) {
            Ok(result) => result,
            Err(_) => {
                eprintln!("dsv2: connections still open after {HTTP_STOP_GRACE:?}; exiting");
                Ok(())
            }
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(watch_signals(Arc::clone(&state)));
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("HTTP server")
}

/// First SIGTERM / SIGINT: drain. Second: exit now.
async fn watch_signals(state: Arc<AppState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("dsv2: cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    let mut signals = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals += 1;
        if signals > 1 {
            eprintln!("dsv2: second signal: exiting now");
            std::process::exit(1);
        }
        if state.drain() {
            eprintln!(
                "dsv2: draining: no new requests; running ones get up to {:?}",
                state.config.drain_timeout
            );
        } else {
            eprintln!("dsv2: stopped while loading the model");
            std::process::exit(0);
        }
    }
}
