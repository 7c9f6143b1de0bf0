//! Single-sequence generation: prefill once, then extend the latent cache one token per
//! step. (The batching engine of the server builds on the same model interface.)

use dsv2_backend::{AttentionPath, Backend, Batch, LogitsWanted};
use dsv2_model::{Model, Workspace};

use crate::block_allocator::BlockAllocator;
use crate::error::{EngineError, Result};
use crate::sequence::FinishReason;

/// Chooses the next token from a row of logits.
pub trait TokenPicker {
    /// `logits` `[V]` of the last position; `generated` holds the tokens emitted so far.
    fn pick(&mut self, logits: &[f32], generated: &[u32]) -> u32;
}

impl TokenPicker for dsv2_core::Sampler {
    fn pick(&mut self, logits: &[f32], _generated: &[u32]) -> u32 {
        // The sampler records each id it returns for its penalties.
        self.sample(logits)
    }
}

/// Greedy decoding: the highest logit, ties to the lowest id.
#[derive(Debug, Default, Clone, Copy)]
pub struct Greedy;

impl TokenPicker for Greedy {
    fn pick(&mut self, logits: &[f32], _generated: &[u32]) -> u32 {
        argmax(logits)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated ids (an EOS that stopped generation is not included).
    pub token_ids: Vec<u32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
}

/// Tokens per cache block.
pub const BLOCK_SIZE: usize = 64;

/// Owns a cache and buffers for generating one sequence at a time with a model.
pub struct Generator<'m, B: Backend> {
    backend: &'m B,
    model: &'m Model<B>,
    cache: B::Cache,
    blocks: BlockAllocator,
    workspace: Workspace<B>,
    batch: Batch,
    logits: Vec<f32>,
    /// Attention formulation (auto: expanded prefill, absorbed decode).
    pub path: AttentionPath,
}

impl<'m, B: Backend> Generator<'m, B> {
    /// A generator whose cache holds `max_context` tokens.
    pub fn new(backend: &'m B, model: &'m Model<B>, max_context: usize) -> Result<Self> {
        let max_context = max_context.min(model.config.max_position_embeddings);
        let num_blocks = max_context.div_ceil(BLOCK_SIZE).max(1);
        let cache = backend.alloc_cache(model.cache_spec(num_blocks, BLOCK_SIZE))?;
        Ok(Generator {
            backend,
            model,
            cache,
            blocks: BlockAllocator::new(num_blocks),
            workspace: model.workspace(backend, 1)?,
            batch: Batch::default(),
            logits: vec![0.0; model.config.vocab_size],
            path: AttentionPath::Auto,
        })
    }

    /// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` with each,
    /// stopping early at any of `eos_ids` or when `on_token` returns false (a stop
    /// string, a user interrupt); both finish with [`FinishReason::Stop`].
    ///
    /// # Errors
    /// An empty prompt, a prompt plus `max_tokens` longer than the cache, or a model error.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos_ids: &[u32],
        picker: &mut dyn TokenPicker,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(EngineError::Request("the prompt is empty".into()));
        }
        let capacity = self.blocks.num_blocks() * BLOCK_SIZE;
        // The last generated token is never fed back, so it needs no cache slot.
        let needed = prompt.len() + max_tokens.saturating_sub(1);
        if needed > capacity {
            return Err(EngineError::Request(format!(
                "prompt ({} tokens) plus max tokens ({max_tokens}) exceeds the context \
                 length ({capacity} tokens)",
                prompt.len()
            )));
        }
        let table = self
            .blocks
            .allocate(needed.div_ceil(BLOCK_SIZE).max(1))
            .ok_or_else(|| EngineError::Request("not enough free cache blocks".into()))?;
        let result = self.run(prompt, max_tokens, eos_ids, &table, picker, on_token);
        self.blocks.release(&table);
        result
    }

    fn run(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos_ids: &[u32],
        table: &[u32],
        picker: &mut dyn TokenPicker,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let mut generated = Vec::with_capacity(max_tokens);
        let mut finish_reason = FinishReason::Length;
        let mut past = 0;
        let mut next_input: Vec<u32> = prompt.to_vec();
        if self.workspace.capacity() < prompt.len() {
            self.workspace = self.model.workspace(self.backend, prompt.len())?;
        }
        while generated.len() < max_tokens {
            self.batch.clear();
            self.batch
                .push_seq(&next_input, past, table, BLOCK_SIZE, LogitsWanted::Last);
            self.model.forward(
                self.backend,
                &self.batch,
                &mut self.cache,
                &mut self.workspace,
                self.path,
                &mut self.logits,
            )?;
            past += next_input.len();
            let token = picker.pick(&self.logits, &generated);
            if eos_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            generated.push(token);
            if !on_token(token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            next_input.clear();
            next_input.push(token);
        }
        Ok(Generation {
            token_ids: generated,
            finish_reason,
            prompt_tokens: prompt.len(),
        })
    }
}
