//! From engine events to text: one task per choice turns a request's token stream into
//! text deltas (streaming detokenization, stop strings) and records latency metrics.
//!
//! The tasks send [`ChoiceEvent`]s to the response writer over a channel. When the writer
//! goes away (the client disconnected, or the request timed out) the tasks' sends fail,
//! they drop their engine streams, and the engine frees the sequences at its next step.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use dsv2_core::{FinishReason as TextFinish, Sampler, SamplingParams, TextStream};
use dsv2_engine::{EngineHandle, Event, FinishReason, Request, RequestStream, TokenLogprobs};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant as TokioInstant;

use crate::error::{from_engine, ApiError};
use crate::metrics::Metrics;
use crate::text::TextModel;

/// One choice to generate.
#[derive(Debug, Clone)]
pub struct ChoiceJob {
    /// The choice's `index` in the response.
    pub index: usize,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling options (defaults already applied).
    pub params: SamplingParams,
    /// Extra stop ids besides EOS (`stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// `Some(k)`: log-probabilities with `k` alternatives.
    pub logprobs: Option<usize>,
}

/// Log-probability of one generated token, with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    /// The token's id.
    pub token_id: u32,
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives: (text, log-probability).
    pub top: Vec<(String, f32)>,
}

/// Token counts of one choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChoiceUsage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens found in the prefix cache.
    pub cached_tokens: usize,
}

/// What a choice's task reports to the response writer.
#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceEvent {
    /// New output of choice `index` (text may be empty while held back).
    Delta {
        /// The choice.
        index: usize,
        /// Text now safe to show.
        text: String,
        /// Token ids behind it.
        token_ids: Vec<u32>,
        /// Their log-probabilities, when asked.
        logprobs: Vec<LogprobEntry>,
    },
    /// Choice `index` is complete.
    Finish {
        /// The choice.
        index: usize,
        /// `stop`, `length` or `abort`.
        reason: &'static str,
        /// Token counts.
        usage: ChoiceUsage,
    },
    /// The engine failed the request.
    Error(ApiError),
}

/// Submits every choice to the engine, then starts one task per choice; returns the
/// channel their events arrive on. Nothing is submitted if any choice is refused.
///
/// # Errors
/// The engine's refusal of a choice (invalid or over-long prompt, full queue, shutdown).
pub fn start(
    engine: &EngineHandle,
    text: &Arc<TextModel>,
    metrics: &Arc<Metrics>,
    jobs: Vec<ChoiceJob>,
    arrival: Instant,
) -> Result<UnboundedReceiver<ChoiceEvent>, ApiError> {
    let mut submitted = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut sampler =
            Sampler::new(job.params.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
        sampler.add_prompt(&job.prompt);
        let mut stop_token_ids = job.params.eos_token_ids.clone();
        stop_token_ids.extend(&job.stop_token_ids);
        let request = Request {
            prompt: job.prompt.clone(),
            max_tokens: job.params.max_tokens,
            stop_token_ids,
            picker: Box::new(sampler),
            logprobs: job.logprobs,
        };
        // On error the streams submitted so far are dropped, which cancels them.
        let stream = engine.submit(request).map_err(from_engine)?;
        submitted.push((job, stream));
    }
    let (tx, rx) = unbounded_channel();
    for (job, stream) in submitted {
        metrics
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, Relaxed);
        let ctx = ChoiceTask {
            text: Arc::clone(text),
            metrics: Arc::clone(metrics),
            tx: tx.clone(),
            arrival,
        };
        tokio::spawn(ctx.run(job, stream));
    }
    Ok(rx)
}

struct ChoiceTask {
    text: Arc<TextModel>,
    metrics: Arc<Metrics>,
    tx: UnboundedSender<ChoiceEvent>,
    arrival: Instant,
}

impl ChoiceTask {
    async fn run(self, job: ChoiceJob, mut stream: RequestStream) {
        // Stop strings and EOS are matched on text here; the engine enforces the length.
        let mut text_params = job.params.clone();
        text_params.max_tokens = None;
        // Extra stop ids end the text like EOS does: their own text is not shown.
        text_params.eos_token_ids.extend(&job.stop_token_ids);
        let mut text = TextStream::new(&self.text.tokenizer, &text_params);
        let mut usage = ChoiceUsage {
            prompt_tokens: job.prompt.len(),
            ..Default::default()
        };
        let mut last_token: Option<Instant> = None;
        loop {
            let Some(event) = stream.next().await else {
                let _ = self.tx.send(ChoiceEvent::Error(ApiError::internal(
                    "the engine stopped before the request finished",
                )));
                return;
            };
            match event {
                Event::Started { cached_tokens } => usage.cached_tokens = cached_tokens,
                Event::Token { token_id, logprobs } => {
                    usage.completion_tokens += 1;
                    self.observe_token(&mut last_token);
                    let step = text.push(token_id).unwrap_or_default();
                    let delta = ChoiceEvent::Delta {
                        index: job.index,
                        text: step.text,
                        token_ids: vec![token_id],
                        logprobs: logprobs
                            .map(|lp| vec![self.entry(token_id, &lp)])
                            .unwrap_or_default(),
                    };
                    if self.tx.send(delta).is_err() {
                        return; // the client is gone: dropping `stream` cancels
                    }
                    if let Some(finish) = step.finished {
                        let reason = match finish {
                            TextFinish::Eos | TextFinish::Stop(_) => "stop",
                            TextFinish::MaxTokens => "length",
                        };
                        return self.finish(job.index, reason, usage);
                    }
                }
                Event::Finished { reason, .. } => {
                    let rest = text.finish().unwrap_or_default();
                    if !rest.is_empty() {
                        let _ = self.tx.send(ChoiceEvent::Delta {
                            index: job.index,
                            text: rest,
                            token_ids: vec![],
                            logprobs: vec![],
                        });
                    }
                    let reason = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => "abort",
                    };
                    return self.finish(job.index, reason, usage);
                }
                Event::Error { message } => {
                    self.metrics.record_finished("error");
                    let _ = self
                        .tx
                        .send(ChoiceEvent::Error(ApiError::internal(message)));
                    return;
                }
            }
        }
    }

    fn observe_token(&self, last: &mut Option<Instant>) {
        let now = Instant::now();
        match last {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - self.arrival).as_secs_f64()),
            Some(prev) => self
                .metrics
                .inter_token_latency
                .observe((now - *prev).as_secs_f64()),
        }
        *last = Some(now);
        self.metrics.generation_tokens.fetch_add(1, Relaxed);
    }

    fn entry(&self, token_id: u32, lp: &TokenLogprobs) -> LogprobEntry {
        LogprobEntry {
            token_id,
            token: self.text.token_text(token_id),
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(id, l)| (self.text.token_text(id), l))
                .collect(),
        }
    }

    fn finish(&self, index: usize, reason: &'static str, usage: ChoiceUsage) {
        self.metrics
            .e2e_request_latency
            .observe(self.arrival.elapsed().as_secs_f64());
        self.metrics.record_finished(reason);
        let _ = self.tx.send(ChoiceEvent::Finish {
            index,
            reason,
            usage,
        });
    }
}

/// The complete output of one choice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChoiceOutput {
    /// The generated text (stop strings excluded).
    pub text: String,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// Per-token log-probabilities, when asked.
    pub logprobs: Vec<LogprobEntry>,
    /// `stop`, `length` or `abort`.
    pub finish_reason: &'static str,
    /// Token counts.
    pub usage: ChoiceUsage,
}

/// Waits for every choice to finish (non-streaming responses).
///
/// # Errors
/// An engine failure, or the deadline passing (504).
pub async fn collect(
    mut rx: UnboundedReceiver<ChoiceEvent>,
    num_choices: usize,
    deadline: Option<TokioInstant>,
    timeout_secs: f64,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let mut outputs = vec![ChoiceOutput::default(); num_choices];
    let mut remaining = num_choices;
    while remaining > 0 {
        let event = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv())
                .await
                .map_err(|_| ApiError::timeout(timeout_secs))?,
            None => rx.recv().await,
        };
        match event {
            Some(ChoiceEvent::Delta {
                index,
                text,
                token_ids,
                logprobs,
            }) => {
                let out = &mut outputs[index];
                out.text.push_str(&text);
                out.token_ids.extend(token_ids);
                out.logprobs.extend(logprobs);
            }
            Some(ChoiceEvent::Finish {
                index,
                reason,
                usage,
            }) => {
                outputs[index].finish_reason = reason;
                outputs[index].usage = usage;
                remaining -= 1;
            }
            Some(ChoiceEvent::Error(e)) => return Err(e),
            None => return Err(ApiError::internal("generation ended unexpectedly")),
        }
    }
    Ok(outputs)
}
