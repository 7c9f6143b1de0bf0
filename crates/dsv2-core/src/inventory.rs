//! The tensors a config implies, with the hub checkpoint's names and shapes.
//!
//! Shapes are PyTorch `[out, in]`. Used to validate a checkpoint before any compute and
//! to build in-memory models with exactly the shapes of a real one.

use crate::checkpoint::ExpectedTensor;
use crate::config::ModelConfig;

fn t(name: String, shape: &[usize]) -> ExpectedTensor {
    ExpectedTensor {
        name,
        shape: shape.to_vec(),
    }
}

/// Every tensor that `config` implies, in a stable order.
pub fn expected_tensors(config: &ModelConfig) -> Vec<ExpectedTensor> {
    let d = config.hidden_size;
    let h = config.num_attention_heads;
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        &[config.vocab_size, d],
    )];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push(t(format!("{p}.input_layernorm.weight"), &[d]));
        out.push(t(format!("{p}.post_attention_layernorm.weight"), &[d]));
        let q_out = h * config.q_head_dim();
        match config.q_lora_rank {
            None => out.push(t(format!("{p}.self_attn.q_proj.weight"), &[q_out, d])),
            Some(r) => {
                out.push(t(format!("{p}.self_attn.q_a_proj.weight"), &[r, d]));
                out.push(t(format!("{p}.self_attn.q_a_layernorm.weight"), &[r]));
                out.push(t(format!("{p}.self_attn.q_b_proj.weight"), &[q_out, r]));
            }
        }
        out.push(t(
            format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            &[config.latent_cache_width(), d],
        ));
        out.push(t(
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            &[config.kv_lora_rank],
        ));
        out.push(t(
            format!("{p}.self_attn.kv_b_proj.weight"),
            &[
                h * (config.qk_nope_head_dim + config.v_head_dim),
                config.kv_lora_rank,
            ],
        ));
        out.push(t(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, h * config.v_head_dim],
        ));
        match (&config.moe, config.is_moe_layer(i)) {
            (Some(moe), true) => {
                let im = moe.moe_intermediate_size;
                out.push(t(
                    format!("{p}.mlp.gate.weight"),
                    &[moe.n_routed_experts, d],
                ));
                for e in 0..moe.n_routed_experts {
                    push_mlp(&mut out, &format!("{p}.mlp.experts.{e}"), d, im);
                }
                if moe.n_shared_experts > 0 {
                    push_mlp(
                        &mut out,
                        &format!("{p}.mlp.shared_experts"),
                        d,
                        im * moe.n_shared_experts,
                    );
                }
            }
            _ => push_mlp(&mut out, &format!("{p}.mlp"), d, config.intermediate_size),
        }
    }
    out.push(t("model.norm.weight".into(), &[d]));
    if !config.tie_word_embeddings {
        out.push(t("lm_head.weight".into(), &[config.vocab_size, d]));
    }
    out
}

fn push_mlp(out: &mut Vec<ExpectedTensor>, prefix: &str, d: usize, inter: usize) {
    out.push(t(format!("{prefix}.gate_proj.weight"), &[inter, d]));
    out.push(t(format!("{prefix}.up_proj.weight"), &[inter, d]));
    out.push(t(format!("{prefix}.down_proj.weight"), &[d, inter]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_lite_inventory_matches_the_real_index() {
        let config =
            ModelConfig::from_json_str(include_str!("../testdata/deepseek-v2-lite-config.json"))
                .unwrap();
        let expected = expected_tensors(&config);
        let index: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/deepseek-v2-lite-index.json")).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(expected.len(), map.len());
        for e in &expected {
            assert!(
                map.contains_key(&e.name),
                "{} not in the real index",
                e.name
            );
        }
        // Parameter count of V2-Lite = total_size / 2 bytes (bf16).
        let params: usize = expected
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            params * 2,
            index["metadata"]["total_size"].as_u64().unwrap() as usize
        );
    }
}
