//! HTTP handlers: chat and text completions, models, health and metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::generate::{self, ChoiceJob};
use crate::protocol::{self, CommonParams, Prompt};
use crate::respond::{new_id, unix_now, Kind, Shape, SseWriter};
use crate::state::{AppState, Ready};

type Shared = State<Arc<AppState>>;

/// `POST /v1/chat/completions`
pub async fn chat(State(st): Shared, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req = protocol::parse_chat(&body)?;
    let ready = st.ready()?;
    ready.text.check_model(&req.common.model)?;
    let prompt = ready.text.encode_chat(&req.messages)?;
    let logprobs = req.logprobs.then_some(req.top_logprobs);
    let jobs = jobs(&ready, &req.common, &[prompt], logprobs)?;
    let reply = Reply {
        shape: shape(Kind::Chat, &req.common, req.logprobs),
        echo: Vec::new(),
        prompt_param: "messages",
        arrival,
    };
    reply.send(&st, &ready, &req.common, jobs).await
}

/// `POST /v1/completions`
pub async fn completions(State(st): Shared, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req = protocol::parse_completion(&body)?;
    let ready = st.ready()?;
    ready.text.check_model(&req.common.model)?;
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` together with `logprobs` is not supported",
        ));
    }
    let prompts = req
        .prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => ready.text.encode_prompt(t),
            Prompt::Tokens(ids) => Ok(ids.clone()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let echo = if req.echo {
        req.prompts
            .iter()
            .zip(&prompts)
            .map(|(given, ids)| match given {
                Prompt::Text(t) => t.clone(),
                Prompt::Tokens(_) => ready.text.decode(ids),
            })
            .collect()
    } else {
        Vec::new()
    };
    let jobs = jobs(&ready, &req.common, &prompts, req.logprobs)?;
    let reply = Reply {
        shape: shape(Kind::Completion, &req.common, req.logprobs.is_some()),
        echo,
        prompt_param: "prompt",
        arrival,
    };
    reply.send(&st, &ready, &req.common, jobs).await
}

fn shape(kind: Kind, p: &CommonParams, logprobs: bool) -> Shape {
    Shape {
        kind,
        id: new_id(kind),
        created: unix_now(),
        model: p.model.clone(),
        logprobs,
        return_token_ids: p.return_token_ids,
        include_usage: p.include_usage,
    }
}

/// `n` choices per prompt, with the request's sampling parameters.
fn jobs(
    ready: &Ready,
    p: &CommonParams,
    prompts: &[Vec<u32>],
    logprobs: Option<usize>,
) -> Result<Vec<ChoiceJob>, ApiError> {
    let mut jobs = Vec::with_capacity(prompts.len() * p.n);
    for prompt in prompts {
        for j in 0..p.n {
            jobs.push(ChoiceJob {
                index: jobs.len(),
                prompt: prompt.clone(),
                params: ready.text.sampling_params(p, j)?,
                stop_token_ids: p.stop_token_ids.clone(),
                logprobs,
            });
        }
    }
    Ok(jobs)
}

/// How to answer one request.
struct Reply {
    shape: Shape,
    /// Each prompt's text when a completion echoes it.
    echo: Vec<String>,
    /// The field errors about the prompt name (`messages` or `prompt`).
    prompt_param: &'static str,
    arrival: Instant,
}

impl Reply {
    /// Submits the choices and answers with one JSON response or an SSE stream.
    async fn send(
        self,
        st: &AppState,
        ready: &Ready,
        p: &CommonParams,
        jobs: Vec<ChoiceJob>,
    ) -> Result<Response, ApiError> {
        let num_choices = jobs.len();
        let rx = generate::start(&ready.engine, &ready.text, &st.metrics, jobs, self.arrival)
            .map_err(|mut e| {
                if matches!(e.param.as_deref(), Some("messages" | "prompt")) {
                    e.param = Some(self.prompt_param.to_string());
                }
                e
            })?;
        let timeout = st.config.request_timeout;
        let deadline = timeout.map(|t| tokio::time::Instant::from_std(self.arrival + t));
        let timeout_secs = timeout.map_or(0.0, |t| t.as_secs_f64());
        if p.stream {
            let writer = SseWriter::new(
                self.shape,
                rx,
                num_choices,
                p.n,
                deadline,
                timeout_secs,
                &self.echo,
            );
            let events = stream::unfold(writer, |mut w| async move {
                w.next_event()
                    .await
                    .map(|e| (Ok::<_, std::convert::Infallible>(e), w))
            });
            Ok(Sse::new(events).into_response())
        } else {
            let outputs = generate::collect(rx, num_choices, deadline, timeout_secs).await?;
            Ok(Json(self.shape.response(&outputs, p.n, &self.echo)).into_response())
        }
    }
}

fn model_card(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "dsv2"})
}

/// `GET /v1/models`
pub async fn models(State(st): Shared) -> Result<Response, ApiError> {
    let ready = st.ready_or_loading()?;
    let data: Vec<_> = ready
        .text
        .model_names()
        .iter()
        .map(|m| model_card(m))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{id}`
pub async fn model(State(st): Shared, Path(id): Path<String>) -> Result<Response, ApiError> {
    let ready = st.ready_or_loading()?;
    ready.text.check_model(&id)?;
    Ok(Json(model_card(&id)).into_response())
}

/// `GET /health`: 200 when ready, 503 while loading or draining.
pub async fn health(State(st): Shared) -> Response {
    let (status, state) = if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if st.ready.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ok")
    };
    (status, Json(json!({"status": state}))).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): Shared) -> Response {
    let engine = st.ready.get().map(|r| r.engine.stats());
    let ready = st.ready.get().is_some() && !st.is_draining();
    let text = st.metrics.render(engine, ready);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Unknown paths.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(req.uri().path())
}

/// Known paths with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Requires `Authorization: Bearer KEY` when the server has a key; compares in constant
/// time (for keys of the same length).
pub async fn require_api_key(State(st): Shared, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())));
        if !ok {
            let message = if given.is_none() {
                "Missing API key: send `Authorization: Bearer YOUR_KEY`"
            } else {
                "Incorrect API key provided"
            };
            return ApiError::unauthorized(message).into_response();
        }
    }
    next.run(req).await
}

/// Counts error answers by status.
pub async fn count_errors(State(st): Shared, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        st.metrics.record_error(resp.status().as_u16());
    }
    resp
}
