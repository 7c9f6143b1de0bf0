//! One request's token sequence as the scheduler sees it: its tokens, how many of them
//! are in the cache, its block table and its stop conditions.

use std::time::Instant;

use crate::block_manager::BlockHash;

/// Identifies a sequence (one request choice) for its whole life.
pub type SeqId = u64;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// Cancelled: the client went away, a deadline passed, or the step failed.
    Abort,
}

impl FinishReason {
    /// The OpenAI spelling (`stop`, `length`, `abort`).
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceStatus {
    /// Queued: not admitted yet, or preempted and waiting to be recomputed.
    Waiting,
    /// Holds cache blocks and is scheduled every step.
    Running,
    /// Done; its blocks are returned when the scheduler removes it.
    Finished(FinishReason),
}

/// When generation of a sequence stops, besides a cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation (EOS and any extra stop ids); the stopping token is
    /// kept in the output, as vLLM and HF `generate` do.
    pub stop_token_ids: Vec<u32>,
}

/// A sequence: prompt plus generated tokens, and its share of the paged cache.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Unique for the engine's lifetime.
    pub id: SeqId,
    /// Waiting, running or finished.
    pub status: SequenceStatus,
    /// Prompt then generated tokens.
    pub token_ids: Vec<u32>,
    /// Leading tokens of `token_ids` that are the prompt.
    pub num_prompt_tokens: usize,
    /// Leading tokens whose latents are in the cache (computed or found by prefix
    /// caching). Reset to 0 by a preemption.
    pub num_computed_tokens: usize,
    /// Prompt tokens found in the prefix cache at the first admission (`None` until
    /// then): reported in `usage` as cached tokens.
    pub num_cached_prompt_tokens: Option<usize>,
    /// Physical cache block of each logical block.
    pub block_table: Vec<u32>,
    /// Prefix-cache hash of each full, computed block, in order.
    pub block_hashes: Vec<BlockHash>,
    /// When generation stops.
    pub stop: StopConditions,
    /// Tokens the sequence may hold at most (the context limit).
    pub max_model_len: usize,
    /// When the request arrived.
    pub arrival: Instant,
    /// Times this sequence was preempted.
    pub num_preemptions: u32,
}

impl Sequence {
    /// A waiting sequence for `prompt`.
    pub fn new(id: SeqId, prompt: Vec<u32>, stop: StopConditions, max_model_len: usize) -> Self {
        Sequence {
            id,
            status: SequenceStatus::Waiting,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            num_cached_prompt_tokens: None,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            stop,
            max_model_len,
            arrival: Instant::now(),
            num_preemptions: 0,
        }
    }

    /// Tokens in the sequence (prompt + generated).
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    /// True if the sequence holds no tokens (never the case for a valid request).
    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Generated tokens so far.
    pub fn num_completion_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// The generated tokens.
    pub fn completion_tokens(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Tokens not yet in the cache (the rest of a prompt, or the last sampled token).
    pub fn num_uncomputed_tokens(&self) -> usize {
        self.token_ids.len() - self.num_computed_tokens
    }

    /// True once finished.
    pub fn is_finished(&self) -> bool {
        matches!(self.status, SequenceStatus::Finished(_))
    }

    /// Appends a sampled token; returns why generation stops now, if it does.
    pub fn append_token(&mut self, token: u32) -> Option<FinishReason> {
        self.token_ids.push(token);
        if self.stop.stop_token_ids.contains(&token) {
            return Some(FinishReason::Stop);
        }
        if self.num_completion_tokens() >= self.stop.max_tokens
            || self.token_ids.len() >= self.max_model_len
        {
            return Some(FinishReason::Length);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(max_tokens: usize, max_len: usize) -> Sequence {
        let stop = StopConditions {
            max_tokens,
            stop_token_ids: vec![9],
        };
        Sequence::new(1, vec![1, 2, 3], stop, max_len)
    }

    #[test]
    fn stops_on_stop_token_max_tokens_and_context() {
        let mut s = seq(3, 100);
        assert_eq!(s.append_token(4), None);
        assert_eq!(s.append_token(9), Some(FinishReason::Stop));
        assert_eq!(s.completion_tokens(), &[4, 9]);

        let mut s = seq(2, 100);
        assert_eq!(s.append_token(4), None);
        assert_eq!(s.append_token(5), Some(FinishReason::Length));

        let mut s = seq(10, 5);
        assert_eq!(s.append_token(4), None);
        assert_eq!(s.append_token(5), Some(FinishReason::Length));
    }
}
