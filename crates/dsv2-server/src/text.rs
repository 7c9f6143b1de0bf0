//! The text side of the served model: tokenizer, chat template, sampling defaults, and
//! the names the model answers to.

use dsv2_core::{CoreError, GenerationConfig, SamplingOverrides, SamplingParams, Tokenizer};

use crate::error::ApiError;
use crate::protocol::CommonParams;

/// The model name DeepSeek's API uses; always accepted.
pub const DEEPSEEK_CHAT: &str = "deepseek-chat";

/// Everything the server needs to turn text into token ids and back.
#[derive(Debug, Clone)]
pub struct TextModel {
    /// Encodes prompts, renders chats, decodes output.
    pub tokenizer: Tokenizer,
    /// Defaults for options a request leaves out (from `generation_config.json`).
    pub defaults: SamplingParams,
    /// The served model's own name.
    pub name: String,
}

impl TextModel {
    /// Sampling defaults in the API's sense: the generation config's when it asks for
    /// sampling (V2-Lite-Chat: temperature 0.3, top_p 0.95), greedy when it says
    /// `do_sample: false`, and OpenAI's temperature 1 otherwise.
    pub fn new(
        tokenizer: Tokenizer,
        generation: Option<&GenerationConfig>,
        eos_token_ids: &[u32],
        name: String,
    ) -> Self {
        let mut defaults = SamplingParams::from_generation_config(generation, eos_token_ids);
        if generation.and_then(|g| g.do_sample).is_none() {
            defaults.temperature = 1.0;
        }
        // The request (or the context limit) decides the length, not the config.
        defaults.max_tokens = None;
        if let Some(eos) = tokenizer.eos() {
            if !defaults.eos_token_ids.contains(&eos.id) {
                defaults.eos_token_ids.push(eos.id);
            }
        }
        TextModel {
            tokenizer,
            defaults,
            name,
        }
    }

    /// The model names this server answers to.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = vec![DEEPSEEK_CHAT.to_string()];
        if self.name != DEEPSEEK_CHAT {
            names.push(self.name.clone());
        }
        names
    }

    /// 404 unless `model` is one of [`model_names`](Self::model_names).
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == DEEPSEEK_CHAT || model == self.name {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model, &self.model_names()))
        }
    }

    /// The request's sampling parameters over the defaults; choice `index` of a request
    /// with a seed gets `seed + index`, so the `n` choices differ but are reproducible.
    pub fn sampling_params(
        &self,
        p: &CommonParams,
        index: usize,
    ) -> Result<SamplingParams, ApiError> {
        let overrides = SamplingOverrides {
            temperature: p.temperature,
            top_k: p.top_k,
            // top_p 0 (allowed by OpenAI) keeps only the most likely token.
            top_p: p.top_p.map(|t| t.max(f32::MIN_POSITIVE)),
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed.map(|s| s.wrapping_add(index as u64)),
            max_tokens: p.max_tokens,
            stop: p.stop.clone(),
        };
        let mut params = self.defaults.clone().apply(&overrides);
        if p.ignore_eos {
            params.eos_token_ids.clear();
        }
        params.validate().map_err(|e| match e {
            CoreError::Sampling { param, problem } => {
                ApiError::invalid(&param, format!("`{param}` {problem}"))
            }
            other => ApiError::bad_request(other.to_string()),
        })?;
        Ok(params)
    }

    /// Encodes a completion prompt (BOS added as the tokenizer config says).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    }

    /// Renders and encodes a conversation with the chat template.
    pub fn encode_chat(&self, messages: &[serde_json::Value]) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode_chat(messages, true)
            .map(|(_, ids)| ids)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))
    }

    /// The text of one token, for log-probability entries (lossy for partial characters).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// The text of a token-id prompt (for `echo`), special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
