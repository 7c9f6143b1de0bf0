//! `config.json` of a DeepSeek-V2 checkpoint, parsed and validated.
//!
//! Keys follow the checkpoint exactly (`q_lora_rank`, `kv_lora_rank`, ...). Keys whose
//! meaning cannot be guessed are required; keys with a harmless HF default
//! (`rope_theta`, `attention_bias`, `moe_layer_freq`, ...) take that default. Options the
//! engine does not implement (another `scoring_func`, a non-YaRN `rope_scaling`, ...) are
//! errors naming the key, never silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CoreError, Result};

/// How the router picks experts (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (`greedy`, legacy spelling `gready`).
    Greedy,
    /// Top-k within the `topk_group` best of `n_group` contiguous expert groups, groups
    /// scored by their best expert (`group_limited_greedy`).
    GroupLimitedGreedy { n_group: usize, topk_group: usize },
}

/// YaRN RoPE scaling parameters (`rope_scaling` with `type`/`rope_type` = `yarn`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Numerator of the cos/sin amplitude ratio.
    pub mscale: f64,
    /// Denominator of the amplitude ratio, and squared into the softmax scale when non-zero.
    pub mscale_all_dim: f64,
}

/// Mixture-of-experts settings; absent for an all-dense model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// A validated DeepSeek-V2 model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Intermediate size of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: queries come from a plain `q_proj` (V2-Lite); `Some(r)`: `q_a_proj` to rank
    /// `r`, `q_a_layernorm`, `q_b_proj` (V2).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<YarnScaling>,
    pub moe: Option<MoeConfig>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            CoreError::Json { source, .. } => CoreError::Json {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| CoreError::Json {
            path: "config.json".into(),
            source,
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| CoreError::config("(root)", "expected a JSON object"))?;
        Self::from_map(obj)
    }

    fn from_map(obj: &Map<String, Value>) -> Result<Self> {
        let model_type = req_str(obj, "model_type")?;
        if model_type != "deepseek_v2" {
            return Err(CoreError::config(
                "model_type",
                format!("`{model_type}` is not supported; dsv2 runs `deepseek_v2` checkpoints"),
            ));
        }
        let hidden_act = opt_str(obj, "hidden_act")?.unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(CoreError::config(
                "hidden_act",
                format!("`{hidden_act}` is not supported (only `silu`)"),
            ));
        }
        if opt_bool(obj, "attention_bias")?.unwrap_or(false) {
            return Err(CoreError::config(
                "attention_bias",
                "`true` is not supported (DeepSeek-V2 has no attention biases)",
            ));
        }
        if let Some(tp) = opt_usize(obj, "pretraining_tp")? {
            if tp != 1 {
                return Err(CoreError::config(
                    "pretraining_tp",
                    format!("{tp} is not supported (only 1)"),
                ));
            }
        }

        let (rope_theta_nested, rope_scaling) = parse_rope(obj)?;
        let rope_theta = match rope_theta_nested {
            Some(theta) => theta,
            None => opt_f64(obj, "rope_theta")?.unwrap_or(10000.0),
        };

        let num_hidden_layers = req_usize(obj, "num_hidden_layers")?;
        let config = ModelConfig {
            vocab_size: req_usize(obj, "vocab_size")?,
            hidden_size: req_usize(obj, "hidden_size")?,
            intermediate_size: req_usize(obj, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: req_usize(obj, "num_attention_heads")?,
            q_lora_rank: req_nullable_usize(obj, "q_lora_rank")?,
            kv_lora_rank: req_usize(obj, "kv_lora_rank")?,
            qk_nope_head_dim: req_usize(obj, "qk_nope_head_dim")?,
            qk_rope_head_dim: req_usize(obj, "qk_rope_head_dim")?,
            v_head_dim: req_usize(obj, "v_head_dim")?,
            max_position_embeddings: req_usize(obj, "max_position_embeddings")?,
            rms_norm_eps: req_f64(obj, "rms_norm_eps")?,
            rope_theta,
            rope_scaling,
            moe: parse_moe(obj, num_hidden_layers)?,
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: opt_u32(obj, "bos_token_id")?,
            eos_token_ids: parse_token_ids(obj, "eos_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(CoreError::config(key, "must be greater than 0"));
            }
        }
        if self.qk_rope_head_dim == 0 || !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(CoreError::config(
                "qk_rope_head_dim",
                format!("must be even and > 0, got {}", self.qk_rope_head_dim),
            ));
        }
        if self.q_lora_rank == Some(0) {
            return Err(CoreError::config(
                "q_lora_rank",
                "must be null or greater than 0",
            ));
        }
        if !is_positive(self.rms_norm_eps) {
            return Err(CoreError::config("rms_norm_eps", "must be greater than 0"));
        }
        if !is_positive(self.rope_theta) {
            return Err(CoreError::config("rope_theta", "must be greater than 0"));
        }
        Ok(())
    }

    /// Width of one query/key head: `qk_nope_head_dim + qk_rope_head_dim` (192 in V2).
    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the latent plus the RoPE key (576 in V2).
    pub fn latent_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// True if layer `layer` uses the MoE block rather than the dense MLP.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(moe) => {
                layer >= moe.first_k_dense_replace && layer.is_multiple_of(moe.moe_layer_freq)
            }
            None => false,
        }
    }

    /// The softmax scale of attention: `q_head_dim^-0.5`, times `mscale(factor,
    /// mscale_all_dim)^2` under YaRN when `mscale_all_dim` is non-zero.
    pub fn softmax_scale(&self) -> f64 {
        let mut scale = (self.q_head_dim() as f64).powf(-0.5);
        if let Some(yarn) = &self.rope_scaling {
            if yarn.mscale_all_dim != 0.0 {
                let m = yarn_get_mscale(yarn.factor, yarn.mscale_all_dim);
                scale *= m * m;
            }
        }
        scale
    }
}

/// True for a number greater than zero (false for NaN).
fn is_positive(x: f64) -> bool {
    x > 0.0
}

/// `0.1 * mscale * ln(scale) + 1` for `scale > 1`, else 1 (the reference's `yarn_get_mscale`).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_rope(obj: &Map<String, Value>) -> Result<(Option<f64>, Option<YarnScaling>)> {
    // Newer transformers write `rope_parameters` (with `rope_theta` inside); the hub
    // checkpoints write `rope_scaling` with the legacy key `type`.
    let (key, section) = match (obj.get("rope_scaling"), obj.get("rope_parameters")) {
        (Some(v), _) if !v.is_null() => ("rope_scaling", v),
        (_, Some(v)) if !v.is_null() => ("rope_parameters", v),
        _ => return Ok((None, None)),
    };
    let map = section
        .as_object()
        .ok_or_else(|| CoreError::config(key, "expected an object or null"))?;
    let sub = |name: &str| format!("{key}.{name}");
    let theta = match map.get("rope_theta") {
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| CoreError::config(&sub("rope_theta"), "expected a number"))?,
        ),
        None => None,
    };
    let kind = match (map.get("rope_type"), map.get("type")) {
        (Some(v), _) => v
            .as_str()
            .ok_or_else(|| CoreError::config(&sub("rope_type"), "expected a string"))?,
        (None, Some(v)) => v
            .as_str()
            .ok_or_else(|| CoreError::config(&sub("type"), "expected a string"))?,
        (None, None) => {
            return Err(CoreError::config(
                &sub("type"),
                "missing (expected `yarn` or `rope_type: default`)",
            ))
        }
    };
    match kind {
        "default" => Ok((theta, None)),
        "yarn" => {
            let num = |name: &str, default: Option<f64>| -> Result<f64> {
                match map.get(name) {
                    Some(v) if !v.is_null() => v
                        .as_f64()
                        .ok_or_else(|| CoreError::config(&sub(name), "expected a number")),
                    _ => default.ok_or_else(|| CoreError::config(&sub(name), "missing")),
                }
            };
            let factor = num("factor", None)?;
            if !is_positive(factor) {
                return Err(CoreError::config(&sub("factor"), "must be greater than 0"));
            }
            let original = num("original_max_position_embeddings", Some(4096.0))?;
            if original < 1.0 || original.fract() != 0.0 {
                return Err(CoreError::config(
                    &sub("original_max_position_embeddings"),
                    "must be a positive integer",
                ));
            }
            let yarn = YarnScaling {
                factor,
                original_max_position_embeddings: original as usize,
                beta_fast: num("beta_fast", Some(32.0))?,
                beta_slow: num("beta_slow", Some(1.0))?,
                mscale: num("mscale", Some(1.0))?,
                mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
            };
            Ok((theta, Some(yarn)))
        }
        other => Err(CoreError::config(
            &sub(if map.contains_key("rope_type") {
                "rope_type"
            } else {
                "type"
            }),
            format!("`{other}` is not supported (only `yarn`, or no scaling)"),
        )),
    }
}

fn parse_moe(obj: &Map<String, Value>, num_layers: usize) -> Result<Option<MoeConfig>> {
    let Some(n_routed_experts) = opt_nullable_usize(obj, "n_routed_experts")? else {
        return Ok(None);
    };
    if n_routed_experts == 0 {
        return Err(CoreError::config(
            "n_routed_experts",
            "must be null or greater than 0",
        ));
    }
    let scoring = opt_str(obj, "scoring_func")?.unwrap_or("softmax");
    if scoring != "softmax" {
        return Err(CoreError::config(
            "scoring_func",
            format!("`{scoring}` is not supported (only `softmax`)"),
        ));
    }
    let num_experts_per_tok = req_usize(obj, "num_experts_per_tok")?;
    if num_experts_per_tok == 0 || num_experts_per_tok > n_routed_experts {
        return Err(CoreError::config(
            "num_experts_per_tok",
            format!("must be in 1..={n_routed_experts}, got {num_experts_per_tok}"),
        ));
    }
    let method = req_str(obj, "topk_method")?;
    let topk_method = match method {
        "greedy" | "gready" => TopkMethod::Greedy,
        "group_limited_greedy" => {
            let n_group = req_usize(obj, "n_group")?;
            let topk_group = req_usize(obj, "topk_group")?;
            if n_group == 0 || n_routed_experts % n_group != 0 {
                return Err(CoreError::config(
                    "n_group",
                    format!("must divide n_routed_experts ({n_routed_experts}), got {n_group}"),
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(CoreError::config(
                    "topk_group",
                    format!("must be in 1..={n_group}, got {topk_group}"),
                ));
            }
            if topk_group * (n_routed_experts / n_group) < num_experts_per_tok {
                return Err(CoreError::config(
                    "topk_group",
                    "the kept groups hold fewer experts than num_experts_per_tok",
                ));
            }
            TopkMethod::GroupLimitedGreedy {
                n_group,
                topk_group,
            }
        }
        other => {
            return Err(CoreError::config(
                "topk_method",
                format!(
                    "`{other}` is not supported (`greedy`, `gready` or `group_limited_greedy`)"
                ),
            ))
        }
    };
    let moe_layer_freq = opt_usize(obj, "moe_layer_freq")?.unwrap_or(1);
    if moe_layer_freq == 0 {
        return Err(CoreError::config(
            "moe_layer_freq",
            "must be greater than 0",
        ));
    }
    let first_k_dense_replace = opt_usize(obj, "first_k_dense_replace")?.unwrap_or(0);
    if first_k_dense_replace > num_layers {
        return Err(CoreError::config(
            "first_k_dense_replace",
            format!("{first_k_dense_replace} exceeds num_hidden_layers ({num_layers})"),
        ));
    }
    Ok(Some(MoeConfig {
        n_routed_experts,
        n_shared_experts: opt_nullable_usize(obj, "n_shared_experts")?.unwrap_or(0),
        num_experts_per_tok,
        moe_intermediate_size: req_usize(obj, "moe_intermediate_size")?,
        topk_method,
        norm_topk_prob: opt_bool(obj, "norm_topk_prob")?.unwrap_or(false),
        routed_scaling_factor: opt_f64(obj, "routed_scaling_factor")?.unwrap_or(1.0),
        first_k_dense_replace,
        moe_layer_freq,
    }))
}

fn parse_token_ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| value_u32(v).ok_or_else(|| CoreError::config(key, "expected token ids")))
            .collect(),
        Some(v) => Ok(vec![value_u32(v).ok_or_else(|| {
            CoreError::config(key, "expected a token id or a list of them")
        })?]),
    }
}

fn value_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

fn value_usize(v: &Value) -> Option<usize> {
    // Integers may be written as floats (`40.0`) by some exporters.
    match v.as_u64() {
        Some(x) => usize::try_from(x).ok(),
        None => v
            .as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 9.0e15)
            .map(|f| f as usize),
    }
}

fn req<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| CoreError::config(key, "missing (required for deepseek_v2)"))
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    req(obj, key)?
        .as_str()
        .ok_or_else(|| CoreError::config(key, "expected a string"))
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected a string")),
    }
}

fn req_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    value_usize(req(obj, key)?)
        .ok_or_else(|| CoreError::config(key, "expected a non-negative integer"))
}

fn opt_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    opt_nullable_usize(obj, key)
}

fn req_nullable_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match req(obj, key)? {
        Value::Null => Ok(None),
        v => value_usize(v)
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected null or a non-negative integer")),
    }
}

fn opt_nullable_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_usize(v)
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected null or a non-negative integer")),
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_u32(v)
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected a token id")),
    }
}

fn req_f64(obj: &Map<String, Value>, key: &str) -> Result<f64> {
    req(obj, key)?
        .as_f64()
        .ok_or_else(|| CoreError::config(key, "expected a number"))
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected a number")),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| CoreError::config(key, "expected true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LITE: &str = include_str!("../testdata/deepseek-v2-lite-config.json");

    fn lite_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelConfig> {
        let mut value: Value = serde_json::from_str(LITE).unwrap();
        edit(value.as_object_mut().unwrap());
        ModelConfig::from_json_str(&value.to_string())
    }

    fn err_text(r: Result<ModelConfig>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn parses_real_v2_lite_config() {
        let c = ModelConfig::from_json_str(LITE).unwrap();
        assert_eq!(c.hidden_size, 2048);
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.latent_cache_width(), 576);
        let moe = c.moe.as_ref().unwrap();
        assert_eq!(moe.topk_method, TopkMethod::Greedy);
        assert_eq!((moe.n_routed_experts, moe.n_shared_experts), (64, 2));
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(26));
        let yarn = c.rope_scaling.unwrap();
        assert_eq!(yarn.factor, 40.0);
        assert_eq!(yarn.original_max_position_embeddings, 4096);
        // 192^-0.5 * (0.1 * 0.707 * ln 40 + 1)^2, from the numerics note.
        assert!((c.softmax_scale() - 0.1147213868).abs() < 1e-9);
        assert_eq!(c.eos_token_ids, vec![100001]);
    }

    #[test]
    fn parses_v2_236b_style_options() {
        let c = lite_with(|m| {
            m.insert("q_lora_rank".into(), 1536.into());
            m.insert("topk_method".into(), "group_limited_greedy".into());
            m.insert("n_group".into(), 8.into());
            m.insert("topk_group".into(), 3.into());
            m.insert("n_routed_experts".into(), 160.into());
            m.insert("routed_scaling_factor".into(), 16.0.into());
        })
        .unwrap();
        assert_eq!(c.q_lora_rank, Some(1536));
        let moe = c.moe.unwrap();
        assert_eq!(
            moe.topk_method,
            TopkMethod::GroupLimitedGreedy {
                n_group: 8,
                topk_group: 3
            }
        );
        assert_eq!(moe.routed_scaling_factor, 16.0);
    }

    #[test]
    fn accepts_legacy_and_new_spellings() {
        let c = lite_with(|m| {
            m.insert("topk_method".into(), "gready".into());
        })
        .unwrap();
        assert_eq!(c.moe.unwrap().topk_method, TopkMethod::Greedy);
        let c = lite_with(|m| {
            let rs = m.remove("rope_scaling").unwrap();
            let mut rs = rs.as_object().unwrap().clone();
            rs.remove("type");
            rs.insert("rope_type".into(), "yarn".into());
            rs.insert("factor".into(), 40.0.into());
            rs.insert("rope_theta".into(), 50000.into());
            m.remove("rope_theta");
            m.insert("rope_parameters".into(), Value::Object(rs));
        })
        .unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 40.0);
        let c = lite_with(|m| {
            m.insert("rope_scaling".into(), Value::Null);
        })
        .unwrap();
        assert!(c.rope_scaling.is_none());
        assert!((c.softmax_scale() - 192f64.powf(-0.5)).abs() < 1e-12);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err_text(lite_with(|m| {
            m.insert("model_type".into(), "llama".into());
        }))
        .contains("`model_type`"));
        assert!(err_text(lite_with(|m| {
            m.remove("kv_lora_rank");
        }))
        .contains("`kv_lora_rank`: missing"));
        assert!(err_text(lite_with(|m| {
            m.remove("q_lora_rank");
        }))
        .contains("`q_lora_rank`"));
        assert!(err_text(lite_with(|m| {
            m.insert("topk_method".into(), "noaux_tc".into());
        }))
        .contains("`topk_method`"));
        assert!(err_text(lite_with(|m| {
            m.insert("scoring_func".into(), "sigmoid".into());
        }))
        .contains("`scoring_func`"));
        assert!(err_text(lite_with(|m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"type": "linear", "factor": 2}),
            );
        }))
        .contains("`rope_scaling.type`"));
        assert!(err_text(lite_with(|m| {
            m.insert("topk_method".into(), "group_limited_greedy".into());
            m.insert("n_group".into(), 3.into());
        }))
        .contains("`n_group`"));
        assert!(err_text(lite_with(|m| {
            m.insert("hidden_size".into(), "big".into());
        }))
        .contains("`hidden_size`"));
    }
}
