//! `generation_config.json`: the model's default decoding settings (DeepSeek-V2-Lite-Chat:
//! `do_sample: true, temperature: 0.3, top_p: 0.95`, EOS 100001). [`SamplingParams`]
//! turns them into defaults that explicit options override.
//!
//! [`SamplingParams`]: crate::sampling::SamplingParams

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CoreError, Result};

/// The keys of `generation_config.json` that decoding uses; absent keys are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Sample (true) or decode greedily (false / absent, as in transformers).
    pub do_sample: Option<bool>,
    /// Softmax temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// HF repetition penalty (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Limit on generated tokens.
    pub max_new_tokens: Option<usize>,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `Ok(None)` when the file does not exist.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_file(&path).map(Some)
    }

    /// Reads and parses a `generation_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(&value)
    }

    /// Parses the JSON text of a `generation_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| CoreError::GenerationConfig {
            key: "(file)".into(),
            problem: format!("invalid JSON: {e}"),
        })?;
        Self::from_value(&value)
    }

    fn from_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| err("(file)", "not a JSON object"))?;
        Ok(GenerationConfig {
            do_sample: opt_bool(obj, "do_sample")?,
            temperature: opt_f32(obj, "temperature")?,
            top_p: opt_f32(obj, "top_p")?,
            top_k: opt_u64(obj, "top_k")?.map(|v| v as usize),
            min_p: opt_f32(obj, "min_p")?,
            repetition_penalty: opt_f32(obj, "repetition_penalty")?,
            max_new_tokens: opt_u64(obj, "max_new_tokens")?.map(|v| v as usize),
            bos_token_id: opt_id(obj, "bos_token_id")?,
            eos_token_ids: ids(obj, "eos_token_id")?,
            pad_token_id: opt_id(obj, "pad_token_id")?,
        })
    }
}

fn err(key: &str, problem: impl Into<String>) -> CoreError {
    CoreError::GenerationConfig {
        key: key.to_string(),
        problem: problem.into(),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(err(key, format!("expected true or false, got {v}"))),
    }
}

fn opt_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(|f| Some(f as f32))
            .ok_or_else(|| err(key, format!("expected a finite number, got {n}"))),
        Some(v) => Err(err(key, format!("expected a number, got {v}"))),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| err(key, format!("expected a non-negative integer, got {n}"))),
        Some(v) => Err(err(
            key,
            format!("expected a non-negative integer, got {v}"),
        )),
    }
}

fn opt_id(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>> {
    opt_u64(obj, key)?
        .map(|v| u32::try_from(v).map_err(|_| err(key, format!("token id {v} out of range"))))
        .transpose()
}

fn ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| err(key, format!("expected token ids, got {v}")))
            })
            .collect(),
        Some(_) => Ok(opt_id(obj, key)?.into_iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_lite_chat() {
        let g = GenerationConfig::from_json_str(
            r#"{"_from_model_config": true, "bos_token_id": 100000, "eos_token_id": 100001,
                "do_sample": true, "temperature": 0.3, "top_p": 0.95, "transformers_version": "4.39.3"}"#,
        )
        .unwrap();
        assert_eq!(g.do_sample, Some(true));
        assert_eq!(g.temperature, Some(0.3));
        assert_eq!(g.top_p, Some(0.95));
        assert_eq!(g.top_k, None);
        assert_eq!(g.bos_token_id, Some(100000));
        assert_eq!(g.eos_token_ids, vec![100001]);
    }

    #[test]
    fn reads_the_reference_file() {
        let dir = Path::new("/work/shared/reference/deepseek-v2-lite");
        if let Some(g) = GenerationConfig::from_dir(dir).unwrap() {
            assert_eq!(g.eos_token_ids, vec![100001]);
        }
        assert_eq!(
            GenerationConfig::from_dir(Path::new("/nonexistent")).unwrap(),
            None
        );
    }

    #[test]
    fn eos_list_and_errors() {
        let g = GenerationConfig::from_json_str(
            r#"{"eos_token_id": [1, 2], "top_k": 40, "max_new_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![1, 2]);
        assert_eq!(g.top_k, Some(40));
        assert_eq!(g.max_new_tokens, Some(7));
        for (text, key) in [
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"do_sample": 1}"#, "do_sample"),
            (r#"{"eos_token_id": ["x"]}"#, "eos_token_id"),
            (r#"[1]"#, "(file)"),
        ] {
            let e = GenerationConfig::from_json_str(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
