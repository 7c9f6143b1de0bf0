//! The memory-bandwidth floor of a decode step: the bytes it cannot avoid reading.
//!
//! A decode step of `B` sequences reads, at least once each: every layer's attention
//! weights and norms, the dense MLPs, each MoE layer's router and shared experts and the
//! routed experts its tokens chose, `lm_head`, `B` embedding rows, and each sequence's
//! latent cache (`context × layers × (C + Dr)` values). Divided by the memory's read
//! bandwidth, that is the shortest time a step can take.

use dsv2_core::{expected_tensors, ExpectedTensor, ModelConfig};

/// The shape of one decode step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeStep {
    /// Sequences in the step (one new token each).
    pub batch: usize,
    /// Cached tokens the step's attention reads, summed over its sequences (each reads
    /// its whole context, the new token included).
    pub cache_tokens: usize,
    /// Distinct routed experts each MoE layer runs (see [`expected_distinct_experts`]).
    pub distinct_experts: f64,
}

/// Bytes one decode step reads, by part of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepBytes {
    /// Attention weights and both norms of every layer.
    pub attention: f64,
    /// The dense MLP layers.
    pub dense_mlp: f64,
    /// The MoE routers.
    pub router: f64,
    /// The shared experts of every MoE layer.
    pub shared_experts: f64,
    /// The routed experts chosen in every MoE layer.
    pub routed_experts: f64,
    /// The output projection (the embedding when tied).
    pub lm_head: f64,
    /// The batch's embedding rows and the final norm.
    pub other: f64,
    /// The latent cache read by attention.
    pub latent_cache: f64,
}

impl StepBytes {
    /// All weight bytes.
    pub fn weights(&self) -> f64 {
        self.attention
            + self.dense_mlp
            + self.router
            + self.shared_experts
            + self.routed_experts
            + self.lm_head
            + self.other
    }

    /// Weights and cache.
    pub fn total(&self) -> f64 {
        self.weights() + self.latent_cache
    }
}

/// Expected number of distinct experts `batch` tokens choose when each picks `top_k` of
/// `num_experts` uniformly: `E · (1 − (1 − k/E)^B)`. Exactly `k` for one token; the real
/// count of a step depends on the router (the CPU backend does not report it).
pub fn expected_distinct_experts(batch: usize, top_k: usize, num_experts: usize) -> f64 {
    if num_experts == 0 {
        return 0.0;
    }
    let e = num_experts as f64;
    e * (1.0 - (1.0 - top_k as f64 / e).powi(batch as i32))
}

/// The bytes a decode step of `config` reads at least, given the stored size in bytes of
/// each tensor (`tensor_bytes`) and of one cached token across all layers
/// (`kv_bytes_per_token`).
pub fn decode_step_bytes(
    config: &ModelConfig,
    step: &DecodeStep,
    kv_bytes_per_token: usize,
    tensor_bytes: impl Fn(&ExpectedTensor) -> f64,
) -> StepBytes {
    let routed_share = match &config.moe {
        Some(moe) => (step.distinct_experts / moe.n_routed_experts as f64).min(1.0),
        None => 0.0,
    };
    let rows_share = (step.batch as f64 / config.vocab_size as f64).min(1.0);
    let mut bytes = StepBytes {
        latent_cache: (step.cache_tokens * kv_bytes_per_token) as f64,
        ..StepBytes::default()
    };
    for tensor in expected_tensors(config) {
        let b = tensor_bytes(&tensor);
        let name = tensor.name.as_str();
        let part = if name == "model.embed_tokens.weight" {
            if config.tie_word_embeddings {
                bytes.lm_head += b; // the tied head reads the whole table
            }
            bytes.other += b * rows_share;
            continue;
        } else if name == "lm_head.weight" {
            &mut bytes.lm_head
        } else if name.contains(".self_attn.") || name.ends_with("layernorm.weight") {
            &mut bytes.attention
        } else if name.ends_with(".mlp.gate.weight") {
            &mut bytes.router
        } else if name.contains(".mlp.shared_experts.") {
            &mut bytes.shared_experts
        } else if name.contains(".mlp.experts.") {
            bytes.routed_experts += b * routed_share;
            continue;
        } else if name.contains(".mlp.") {
            &mut bytes.dense_mlp
        } else {
            &mut bytes.other
        };
        *part += b;
    }
    bytes
}

/// Model FLOPs of prefilling one prompt of `len` tokens: two per multiply-add of every
/// weight a token passes through (attention projections, dense MLPs, the router, shared
/// and `top_k` routed experts; not the embedding lookup), the output head for the last
/// token only, and causal attention in the expanded form (`len (len + 1) / 2` query-key
/// pairs per head, each a `Dn + Dr` dot product and a `Dv`-wide weighted sum), the
/// standard count behind an MFU figure. Re-deriving keys and values from the latents
/// (`kv_b_proj` over the context) is a weight a token passes through, so it is counted
/// once per token like the others. The last layer's output projection and feed-forward
/// block count for the last token only: the engine skips them for the others, whose
/// outputs there nothing reads (`Backend::keep_logits_rows`), so the MFU is of work done.
pub fn prefill_flops(config: &ModelConfig, len: usize) -> f64 {
    let step = DecodeStep {
        batch: 1,
        cache_tokens: 0,
        distinct_experts: config
            .moe
            .as_ref()
            .map_or(0.0, |m| m.num_experts_per_tok as f64),
    };
    // Bytes as parameter counts: one "byte" per parameter.
    let params = decode_step_bytes(config, &step, 0, |t| {
        t.shape.iter().product::<usize>() as f64
    });
    let per_token = params.weights() - params.lm_head - params.other;
    let pairs = (len * (len + 1) / 2) as f64;
    let attention = config.num_hidden_layers as f64
        * config.num_attention_heads as f64
        * pairs
        * 2.0
        * (config.q_head_dim() + config.v_head_dim) as f64;
    let skipped = 2.0 * last_layer_tail_params(config) * len.saturating_sub(1) as f64;
    2.0 * per_token * len as f64 + 2.0 * params.lm_head + attention - skipped
}

/// Weights a token passes through in the last layer after its attention: the output
/// projection and the feed-forward block (router, shared and `top_k` routed experts, or
/// the dense MLP).
fn last_layer_tail_params(config: &ModelConfig) -> f64 {
    let d = config.hidden_size as f64;
    let o_proj = (config.num_attention_heads * config.v_head_dim) as f64 * d;
    let last = config.num_hidden_layers.saturating_sub(1);
    let ffn = match &config.moe {
        Some(moe) if config.is_moe_layer(last) => {
            let expert = 3.0 * d * moe.moe_intermediate_size as f64;
            moe.n_routed_experts as f64 * d
                + (moe.n_shared_experts + moe.num_experts_per_tok) as f64 * expert
        }
        _ => 3.0 * d * config.intermediate_size as f64,
    };
    o_proj + ffn
}

#[cfg(test)]
mod tests {
    use super::*;

    const LITE: &str = include_str!("../../../dsv2-core/testdata/deepseek-v2-lite-config.json");

    fn lite() -> ModelConfig {
        ModelConfig::from_json_str(LITE).unwrap()
    }

    fn numel(t: &ExpectedTensor) -> f64 {
        t.shape.iter().product::<usize>() as f64
    }

    /// Matrices at `bits` per weight; embeddings, router and norms kept in bf16 (the
    /// rule of the quantized formats).
    fn quantized(bits: f64) -> impl Fn(&ExpectedTensor) -> f64 {
        move |t| {
            let keep = t.shape.len() == 1
                || t.name.contains("embed_tokens")
                || t.name.ends_with(".mlp.gate.weight");
            numel(t) * if keep { 2.0 } else { bits / 8.0 }
        }
    }

    #[test]
    fn v2_lite_batch_1_by_hand() {
        let config = lite();
        let step = DecodeStep {
            batch: 1,
            cache_tokens: 0,
            distinct_experts: expected_distinct_experts(1, 6, 64),
        };
        let b = decode_step_bytes(&config, &step, 0, |t| numel(t) * 2.0);
        // Per layer: q_proj 3072·2048, kv_a 576·2048, kv_a_layernorm 512, kv_b 4096·512,
        // o_proj 2048·2048, two norms of 2048; 27 layers.
        let attention =
            27.0 * (6_291_456.0 + 1_179_648.0 + 512.0 + 2_097_152.0 + 4_194_304.0 + 4096.0);
        assert_eq!(b.attention, 2.0 * attention);
        assert_eq!(b.dense_mlp, 2.0 * 3.0 * 10_944.0 * 2048.0);
        assert_eq!(b.router, 2.0 * 26.0 * 64.0 * 2048.0);
        assert_eq!(b.shared_experts, 2.0 * 26.0 * 3.0 * 2816.0 * 2048.0);
        let routed = 2.0 * 26.0 * 6.0 * 3.0 * 1408.0 * 2048.0;
        assert!((b.routed_experts - routed).abs() < 1e-3 * routed);
        assert_eq!(b.lm_head, 2.0 * 102_400.0 * 2048.0);
        assert_eq!(b.other, 2.0 * (2048.0 + 2048.0)); // one embedding row, the final norm
                                                      // 2,451,437,056 parameters touched: the "about 4.9 GB" of a bf16 step.
        assert!((b.weights() / 2.0 - 2_451_437_056.0).abs() < 1e3);
        assert_eq!(b.latent_cache, 0.0);
    }

    #[test]
    fn v2_lite_floor_at_8_5_and_4_5_bits() {
        // At the ~54 GB/s of a quiet development machine: ~20 tokens/s at 8.5 bits and
        // ~39 at 4.5 bits (the figures of issue #5).
        let config = lite();
        let step = DecodeStep {
            batch: 1,
            cache_tokens: 0,
            distinct_experts: 6.0,
        };
        let q8 = decode_step_bytes(&config, &step, 0, quantized(8.5)).total();
        let q4 = decode_step_bytes(&config, &step, 0, quantized(4.5)).total();
        // Bytes: 2,447,900,672 quantized parameters plus 3,536,384 kept in bf16.
        assert_eq!(q8, 2_607_967_232.0);
        assert_eq!(q4, 1_384_016_896.0);
        assert!((54e9 / q8 - 20.71).abs() < 0.01, "{}", 54e9 / q8);
        assert!((54e9 / q4 - 39.02).abs() < 0.01, "{}", 54e9 / q4);
    }

    #[test]
    fn batch_and_cache_scale_as_they_should() {
        let config = lite();
        let kv = 27 * 576 * 4;
        let step = DecodeStep {
            batch: 8,
            cache_tokens: 8 * 1025,
            distinct_experts: 64.0,
        };
        let b = decode_step_bytes(&config, &step, kv, |t| numel(t) * 2.0);
        // Every expert of every MoE layer, 8 embedding rows, 8 contexts of 1025 tokens.
        assert_eq!(b.routed_experts, 2.0 * 26.0 * 64.0 * 3.0 * 1408.0 * 2048.0);
        assert_eq!(b.other, 2.0 * (8.0 * 2048.0 + 2048.0));
        assert_eq!(b.latent_cache, (8 * 1025 * kv) as f64);
    }

    #[test]
    fn prefill_flops_of_v2_lite() {
        let config = lite();
        // 2,451,437,056 parameters touched by one token, less the head (209,715,200) and
        // the embedding row and final norm (4096): 4.48 GFLOP a token before attention.
        let per_token = 2.0 * (2_451_437_056.0 - 209_715_200.0 - 4096.0);
        let head = 2.0 * 209_715_200.0;
        let attn = |len: f64| 27.0 * 16.0 * len * (len + 1.0) / 2.0 * 2.0 * 320.0;
        // The last layer's o_proj (2048 · 2048), router (64 · 2048), 2 shared and 6
        // routed experts (3 · 2048 · 1408 each): 73,531,392 weights, skipped by every
        // token but the last.
        let tail = 2.0 * (2048.0 * 2048.0 + 64.0 * 2048.0 + 8.0 * 3.0 * 2048.0 * 1408.0);
        assert_eq!(tail, 2.0 * 73_531_392.0);
        for len in [1usize, 512, 2048] {
            let len_f = len as f64;
            let want = per_token * len_f + head + attn(len_f) - tail * (len_f - 1.0);
            let got = prefill_flops(&config, len);
            assert!((got - want).abs() < 1e-9 * want, "{len}: {got} vs {want}");
        }
    }

    #[test]
    fn distinct_experts_expectation() {
        assert!((expected_distinct_experts(1, 6, 64) - 6.0).abs() < 1e-12);
        let b8 = expected_distinct_experts(8, 6, 64);
        assert!((b8 - 64.0 * (1.0 - (58.0f64 / 64.0).powi(8))).abs() < 1e-9);
        assert!(b8 < 48.0 && b8 > 30.0, "{b8}");
        assert!(expected_distinct_experts(256, 6, 64) > 63.9);
    }
}
