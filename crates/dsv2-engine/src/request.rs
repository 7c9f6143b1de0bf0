//! What a client hands the engine and what it gets back.

use crate::generator::TokenPicker;
use crate::sequence::FinishReason;

/// A generation request on token ids (text is the server's business).
pub struct Request {
    /// Prompt token ids (no BOS is added).
    pub prompt: Vec<u32>,
    /// Most tokens to generate; `None` (or more than fits) means up to the context limit.
    pub max_tokens: Option<usize>,
    /// Tokens that end generation (EOS ids, extra stop ids).
    pub stop_token_ids: Vec<u32>,
    /// Chooses each next token from its logits (greedy, or a seeded sampler).
    pub picker: Box<dyn TokenPicker + Send>,
    /// `Some(k)`: report each token's log-probability and the `k` most likely
    /// alternatives (from the model's raw distribution).
    pub logprobs: Option<usize>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("prompt_tokens", &self.prompt.len())
            .field("max_tokens", &self.max_tokens)
            .field("stop_token_ids", &self.stop_token_ids)
            .field("logprobs", &self.logprobs)
            .finish_non_exhaustive()
    }
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (a final stop token included).
    pub completion_tokens: usize,
    /// Prompt tokens whose latents came from the prefix cache.
    pub cached_tokens: usize,
}

/// What the engine reports about a request, in order: `Started`, then one `Token` per
/// generated token, then `Finished` (or `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request was admitted; `cached_tokens` prompt tokens were found in the prefix
    /// cache.
    Started {
        /// Prompt tokens found in the prefix cache.
        cached_tokens: usize,
    },
    /// A generated token (an EOS that ends generation is reported too).
    Token {
        /// The token.
        token_id: u32,
        /// Its log-probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// Generation ended.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The step running this request failed; the request is over.
    Error {
        /// What went wrong.
        message: String,
    },
}

impl Event {
    /// True for the last event of a request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Error { .. })
    }
}
