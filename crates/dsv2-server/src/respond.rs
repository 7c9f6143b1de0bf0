//! Response bodies in OpenAI's exact shapes: whole responses and SSE chunks for chat
//! and text completions.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant as TokioInstant;

use crate::error::ApiError;
use crate::generate::{ChoiceEvent, ChoiceOutput, ChoiceUsage, LogprobEntry};

/// Reported as `system_fingerprint`.
pub const FINGERPRINT: &str = concat!("dsv2-", env!("CARGO_PKG_VERSION"));

/// Which API a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// Shared fields of every chunk and response of one request.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Chat or text completion.
    pub kind: Kind,
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model name the client asked for.
    pub model: String,
    /// Whether `logprobs` were asked for.
    pub logprobs: bool,
    /// Whether to add `token_ids` (vLLM extension).
    pub return_token_ids: bool,
    /// Whether to send the usage chunk.
    pub include_usage: bool,
}

/// A fresh response id (`chatcmpl-…` / `cmpl-…`).
pub fn new_id(kind: Kind) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{:016x}", h.finish())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `usage` object of a request's choices (the prompt counted once per prompt).
pub fn usage_json(choices: &[ChoiceUsage], n: usize) -> Value {
    let mut prompt = 0;
    let mut cached = 0;
    let mut completion = 0;
    for (i, u) in choices.iter().enumerate() {
        if i % n.max(1) == 0 {
            prompt += u.prompt_tokens;
            cached += u.cached_tokens;
        }
        completion += u.completion_tokens;
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt - cached,
    })
}

fn chat_logprobs(entries: &[LogprobEntry]) -> Value {
    let item = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(&e.token, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|(t, l)| item(t, *l)).collect();
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn completion_logprobs(entries: &[LogprobEntry], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut at = offset;
    for e in entries {
        text_offset.push(at);
        at += e.token.len();
    }
    let top: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert(e.token.clone(), json!(e.logprob));
            for (t, l) in &e.top {
                m.entry(t.clone()).or_insert(json!(l));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

impl Shape {
    fn logprobs_json(&self, entries: &[LogprobEntry], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => chat_logprobs(entries),
            Kind::Completion => completion_logprobs(entries, offset),
        }
    }

    /// The whole (non-streamed) response.
    pub fn response(&self, outputs: &[ChoiceOutput], n: usize, echo: &[String]) -> Value {
        let choices: Vec<Value> = outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let mut c = match self.kind {
                    Kind::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": o.text},
                        "logprobs": self.logprobs_json(&o.logprobs, 0),
                        "finish_reason": o.finish_reason,
                    }),
                    Kind::Completion => {
                        let prefix = echo.get(i / n.max(1)).map_or("", String::as_str);
                        json!({
                            "index": i,
                            "text": format!("{prefix}{}", o.text),
                            "logprobs": self.logprobs_json(&o.logprobs, prefix.len()),
                            "finish_reason": o.finish_reason,
                        })
                    }
                };
                if self.return_token_ids {
                    c["token_ids"] = json!(o.token_ids);
                }
                c
            })
            .collect();
        let usage: Vec<ChoiceUsage> = outputs.iter().map(|o| o.usage).collect();
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion",
                Kind::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage_json(&usage, n),
        })
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn choice_chunk(
        &self,
        index: usize,
        text: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
        token_ids: Option<&[u32]>,
    ) -> Value {
        let mut c = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        if let (true, Some(ids)) = (self.return_token_ids, token_ids) {
            c["token_ids"] = json!(ids);
        }
        self.chunk(vec![c])
    }
}

/// Turns choice events into SSE events: the role chunks (chat), content deltas, finish
/// chunks, the usage chunk when asked, then `[DONE]`.
pub struct SseWriter {
    shape: Shape,
    rx: UnboundedReceiver<ChoiceEvent>,
    pending: VecDeque<SseEvent>,
    usage: Vec<ChoiceUsage>,
    /// Text emitted so far per choice (completion logprobs' `text_offset`).
    offsets: Vec<usize>,
    n: usize,
    remaining: usize,
    deadline: Option<TokioInstant>,
    timeout_secs: f64,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl SseWriter {
    /// A writer for `num_choices` choices (`n` per prompt); `echo` holds each prompt's
    /// text when a completion echoes it.
    pub fn new(
        shape: Shape,
        rx: UnboundedReceiver<ChoiceEvent>,
        num_choices: usize,
        n: usize,
        deadline: Option<TokioInstant>,
        timeout_secs: f64,
        echo: &[String],
    ) -> Self {
        let mut pending = VecDeque::new();
        let mut offsets = vec![0; num_choices];
        for (index, offset) in offsets.iter_mut().enumerate() {
            match shape.kind {
                Kind::Chat => pending.push_back(data(&shape.chunk(vec![json!({
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })]))),
                Kind::Completion => {
                    if let Some(prefix) = echo.get(index / n.max(1)) {
                        *offset = prefix.len();
                        pending.push_back(data(&shape.choice_chunk(
                            index,
                            Some(prefix),
                            Value::Null,
                            None,
                            Some(&[]),
                        )));
                    }
                }
            }
        }
        SseWriter {
            shape,
            rx,
            pending,
            usage: vec![ChoiceUsage::default(); num_choices],
            offsets,
            n,
            remaining: num_choices,
            deadline,
            timeout_secs,
            done: false,
        }
    }

    /// The next SSE event; `None` after `[DONE]`.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            if self.remaining == 0 {
                self.finish_stream();
                continue;
            }
            let event = match self.deadline {
                Some(d) => match tokio::time::timeout_at(d, self.rx.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        self.fail(ApiError::timeout(self.timeout_secs));
                        continue;
                    }
                },
                None => self.rx.recv().await,
            };
            match event {
                Some(e) => self.on_event(e),
                None => self.fail(ApiError::internal("generation ended unexpectedly")),
            }
        }
    }

    fn on_event(&mut self, event: ChoiceEvent) {
        match event {
            ChoiceEvent::Delta {
                index,
                text,
                token_ids,
                logprobs,
            } => {
                // Held-back text produces no chunk unless there is something else to say.
                if text.is_empty() && logprobs.is_empty() && !self.shape.return_token_ids {
                    return;
                }
                let lp = if logprobs.is_empty() {
                    Value::Null
                } else {
                    self.shape.logprobs_json(&logprobs, self.offsets[index])
                };
                self.offsets[index] += text.len();
                let chunk = self
                    .shape
                    .choice_chunk(index, Some(&text), lp, None, Some(&token_ids));
                self.pending.push_back(data(&chunk));
            }
            ChoiceEvent::Finish {
                index,
                reason,
                usage,
            } => {
                self.usage[index] = usage;
                self.remaining -= 1;
                let chunk = self
                    .shape
                    .choice_chunk(index, None, Value::Null, Some(reason), None);
                self.pending.push_back(data(&chunk));
            }
            ChoiceEvent::Error(e) => self.fail(e),
        }
    }

    fn finish_stream(&mut self) {
        if self.shape.include_usage {
            let mut chunk = self.shape.chunk(vec![]);
            chunk["usage"] = usage_json(&self.usage, self.n);
            self.pending.push_back(data(&chunk));
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    /// Ends the stream with an error event (the status line was sent long ago).
    fn fail(&mut self, e: ApiError) {
        self.pending.push_back(data(&e.body()));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
        // Dropping the receiver stops the choices' tasks, which cancel their requests.
        self.rx.close();
    }
}
