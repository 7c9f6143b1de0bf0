//! The whole forward pass on the GPU against the CPU backend, on synthetic models of the
//! three DeepSeek-V2 shapes (V2-Lite-like, V2-like with query LoRA and group-limited
//! routing, plain RoPE with renormalized routing) and one with the real attention widths
//! (the tensor-core attention kernels; decode steps replayed from CUDA graphs): prompts of several lengths in one
//! batch, then batched decode steps of sequences with different context lengths, and
//! greedy tokens on the device. Skipped without a GPU unless DSV2_REQUIRE_GPU is set.

mod common;

use common::*;
use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::{DType, ModelConfig};
use dsv2_cpu::CpuBackend;
use dsv2_model::synthetic::synthetic_checkpoint;
use dsv2_model::Model;

const BLOCK: usize = 16;

fn config(variant: &str) -> ModelConfig {
    let mut v = serde_json::json!({
        "model_type": "deepseek_v2", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "q_lora_rank": null, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
        "topk_method": "greedy", "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 128,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "eos_token_id": 1
    });
    let m = v.as_object_mut().unwrap();
    match variant {
        "lite" => {}
        "v2" => {
            m.insert("q_lora_rank".into(), 24.into());
            m.insert("topk_method".into(), "group_limited_greedy".into());
            m.insert("n_routed_experts".into(), 16.into());
            m.insert("n_group".into(), 4.into());
            m.insert("topk_group".into(), 2.into());
            m.insert("routed_scaling_factor".into(), 16.0.into());
        }
        "plain" => {
            m.insert("rope_scaling".into(), serde_json::Value::Null);
            m.insert("first_k_dense_replace".into(), 0.into());
            m.insert("norm_topk_prob".into(), true.into());
        }
        "mla" => {
            // The attention widths of the real models (the kernels built for them).
            m.insert("num_attention_heads".into(), 16.into());
            m.insert("kv_lora_rank".into(), 512.into());
            m.insert("qk_nope_head_dim".into(), 128.into());
            m.insert("qk_rope_head_dim".into(), 64.into());
            m.insert("v_head_dim".into(), 128.into());
        }
        _ => unreachable!(),
    }
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 300)
        .collect()
}

/// Runs the same schedule on a backend: one batch of prompts (logits of every position),
/// then `steps` decode steps of all sequences together (logits of each), feeding each
/// sequence a fixed token stream. Returns the logits of every step, and the device's
/// greedy tokens of the last step.
fn schedule<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    steps: usize,
    path: AttentionPath,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let vocab = model.config.vocab_size;
    let max_len = prompts.iter().map(Vec::len).max().unwrap() + steps;
    let per_seq = max_len.div_ceil(BLOCK);
    // Interleaved, reversed block tables: sequence i owns blocks i, i+n, i+2n, ... backwards.
    let n = prompts.len();
    let tables: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..per_seq).rev().map(|b| (i + b * n) as u32).collect())
        .collect();
    let mut cache = be
        .alloc_cache(model.cache_spec(n * per_seq, BLOCK))
        .unwrap();
    let total: usize = prompts.iter().map(Vec::len).sum();
    let mut ws = model.workspace(be, total).unwrap();
    let mut batch = Batch::default();
    for (p, t) in prompts.iter().zip(&tables) {
        batch.push_seq(p, 0, t, BLOCK, LogitsWanted::All);
    }
    let mut out = Vec::new();
    let mut logits = vec![0.0; total * vocab];
    model
        .forward(be, &batch, &mut cache, &mut ws, path, &mut logits)
        .unwrap();
    out.push(logits);
    let mut ids = vec![0u32; n];
    for s in 0..steps {
        batch.clear();
        for (i, (p, t)) in prompts.iter().zip(&tables).enumerate() {
            batch.push_seq(
                &[((s * 31 + i * 7) % 300) as u32],
                p.len() + s,
                t,
                BLOCK,
                LogitsWanted::Last,
            );
        }
        let mut logits = vec![0.0; n * vocab];
        if s + 1 == steps {
            // The last step through greedy sampling on the device, then again for its
            // logits (rerunning a step rewrites its slots with the same values).
            model
                .forward_greedy(be, &batch, &mut cache, &mut ws, path, &mut ids)
                .unwrap();
        }
        model
            .forward(be, &batch, &mut cache, &mut ws, path, &mut logits)
            .unwrap();
        out.push(logits);
    }
    (out, ids)
}

#[test]
fn forward_matches_cpu_on_prompts_and_batched_decode() {
    let (Some(gpu32), Some(gpu16)) = (cuda(ComputeDtype::F32), cuda(ComputeDtype::Bf16)) else {
        return;
    };
    let (cpu32, cpu16) = (
        CpuBackend::new(ComputeDtype::F32),
        CpuBackend::new(ComputeDtype::Bf16),
    );
    for variant in ["lite", "v2", "plain", "mla"] {
        let cfg = config(variant);
        let ckpt = synthetic_checkpoint(&cfg, 11, DType::BF16);
        let m_cpu32 = Model::load(&cpu32, cfg.clone(), &ckpt).unwrap();
        let m_cpu16 = Model::load(&cpu16, cfg.clone(), &ckpt).unwrap();
        let m_gpu32 = Model::load(&gpu32, cfg.clone(), &ckpt).unwrap();
        let m_gpu16 = Model::load(&gpu16, cfg, &ckpt).unwrap();
        let prompts = vec![tokens(5, 3), tokens(33, 4), tokens(1, 5), tokens(70, 6)];
        // Largest bf16 error against the f32 result over the paths and all steps.
        let (mut gpu_noise, mut cpu_noise) = (0.0f64, 0.0f64);
        for path in [
            AttentionPath::Auto,
            AttentionPath::Expanded,
            AttentionPath::Absorbed,
        ] {
            let (exact, _) = schedule(&cpu32, &m_cpu32, &prompts, 4, path);
            let (cpu_bf16, _) = schedule(&cpu16, &m_cpu16, &prompts, 4, path);
            let (got32, ids32) = schedule(&gpu32, &m_gpu32, &prompts, 4, path);
            let (got16, ids16) = schedule(&gpu16, &m_gpu16, &prompts, 4, path);
            for s in 0..exact.len() {
                // f32: the CPU's result up to summation order.
                let err32 = rel_err(&got32[s], &exact[s]);
                eprintln!(
                    "{variant} {path:?} step {s}: f32 rel err {err32:.2e}; bf16 vs f32 {:.2e} \
                     (CPU bf16 vs f32 {:.2e}, GPU vs CPU bf16 {:.2e})",
                    rel_err(&got16[s], &exact[s]),
                    rel_err(&cpu_bf16[s], &exact[s]),
                    rel_err(&got16[s], &cpu_bf16[s])
                );
                assert!(
                    err32 <= 1e-4,
                    "{variant} {path:?} step {s}: f32 {err32:.3e}"
                );
            }
            let cat = |v: &Vec<Vec<f32>>| v.concat();
            gpu_noise = gpu_noise.max(rel_err(&cat(&got16), &cat(&exact)));
            cpu_noise = cpu_noise.max(rel_err(&cat(&cpu_bf16), &cat(&exact)));
            for (got, ids, dtype) in [(&got32, &ids32, "f32"), (&got16, &ids16, "bf16")] {
                let last = got.last().unwrap();
                let vocab = last.len() / prompts.len();
                for (i, &id) in ids.iter().enumerate() {
                    assert_eq!(
                        id as usize,
                        argmax(&last[i * vocab..(i + 1) * vocab]),
                        "{variant} {dtype} greedy row {i}"
                    );
                }
            }
        }
        // bf16: no further from the f32 result than the CPU's own bf16 path (within a
        // factor 2). The noise is heavy-tailed on these tiny random models, the V2-like one
        // most (routed_scaling_factor 16): a bf16 rounding can flip an expert choice, and
        // which rows flip differs between any two bf16 implementations, so single paths
        // and steps are not compared.
        let bound = (2.0 * cpu_noise).max(2e-2);
        eprintln!("{variant}: bf16 vs f32, worst path: GPU {gpu_noise:.2e}, CPU {cpu_noise:.2e}");
        assert!(
            gpu_noise <= bound,
            "{variant}: bf16 {gpu_noise:.3e} > {bound:.3e}"
        );
    }
}

/// Decode steps padded to a graph bucket (3 sequences run as 4 tokens, 5 as 8: padding
/// tokens that write no latent) give the logits and greedy tokens of the unpadded steps,
/// graph-replayed or not.
#[test]
fn bucketed_decode_steps_match_exact_ones() {
    let Some(gpu) = cuda(ComputeDtype::Bf16) else {
        return;
    };
    assert_eq!(
        (1..=9).map(dsv2_cuda::decode_bucket).collect::<Vec<_>>(),
        [1, 2, 4, 4, 8, 8, 8, 8, 16]
    );
    for variant in ["lite", "mla"] {
        let cfg = config(variant);
        let ckpt = synthetic_checkpoint(&cfg, 11, DType::BF16);
        let model = Model::load(&gpu, cfg, &ckpt).unwrap();
        for n in [3usize, 5] {
            let prompts: Vec<Vec<u32>> = (0..n).map(|i| tokens(4 + 9 * i, i as u32 + 1)).collect();
            gpu.set_graph_buckets(false);
            let (exact, exact_ids) = schedule(&gpu, &model, &prompts, 5, AttentionPath::Auto);
            gpu.set_graph_buckets(true);
            let (padded, padded_ids) = schedule(&gpu, &model, &prompts, 5, AttentionPath::Auto);
            assert_eq!(
                padded_ids, exact_ids,
                "{variant} {n} sequences: greedy tokens"
            );
            for s in 0..exact.len() {
                let err = rel_err(&padded[s], &exact[s]);
                eprintln!("{variant} {n} sequences step {s}: padded vs exact {err:.2e}");
                assert!(err <= 1e-3, "{variant} {n} sequences step {s}: {err:.3e}");
            }
        }
    }
}

/// Two steps asking for each sequence's `wanted` logits: prompts of several lengths, then
/// one decoding sequence beside a new prompt (a mixed step); returns each sequence's last
/// logits row of each step.
fn last_rows_of_steps<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    wanted: LogitsWanted,
) -> Vec<Vec<f32>> {
    let vocab = model.config.vocab_size;
    let n = prompts.len() + 1;
    let per_seq = 6;
    let tables: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..per_seq).map(|b| (i * per_seq + b) as u32).collect())
        .collect();
    let mut cache = be
        .alloc_cache(model.cache_spec(n * per_seq, BLOCK))
        .unwrap();
    let mut ws = model.workspace(be, 128).unwrap();
    let late_prompt = tokens(21, 9);
    let steps: [Vec<(&[u32], usize, usize)>; 2] = [
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (&p[..], 0, i))
            .collect(),
        vec![
            (&[7][..], prompts[1].len(), 1),
            (&late_prompt[..], 0, n - 1),
        ],
    ];
    let mut out = Vec::new();
    for step in steps {
        let mut batch = Batch::default();
        for &(toks, past, seq) in &step {
            batch.push_seq(toks, past, &tables[seq], BLOCK, wanted);
        }
        let mut logits = vec![0.0; batch.logits_rows.len() * vocab];
        model
            .forward(
                be,
                &batch,
                &mut cache,
                &mut ws,
                AttentionPath::Auto,
                &mut logits,
            )
            .unwrap();
        let mut end = 0;
        for &(toks, _, _) in &step {
            end += if wanted == LogitsWanted::All {
                toks.len()
            } else {
                1
            };
            out.push(logits[(end - 1) * vocab..end * vocab].to_vec());
        }
    }
    out
}

/// The last layer's output projection and feed-forward block and the final norm run on
/// the rows whose logits are read (`Backend::keep_logits_rows`, moved to the front through
/// scratch on the device): asking for each sequence's last logits gives the last rows of
/// the logits of every position, in prompt steps and in a step mixing a decode token with a
/// prompt.
#[test]
fn the_last_rows_alone_equal_the_last_rows_of_all() {
    let (Some(gpu32), Some(gpu16)) = (cuda(ComputeDtype::F32), cuda(ComputeDtype::Bf16)) else {
        return;
    };
    let prompts = vec![tokens(5, 3), tokens(33, 4), tokens(1, 5), tokens(40, 6)];
    for variant in ["lite", "v2", "mla"] {
        let cfg = config(variant);
        let ckpt = synthetic_checkpoint(&cfg, 11, DType::BF16);
        for (be, dtype, bound) in [(&gpu32, "f32", 1e-5), (&gpu16, "bf16", 2e-2)] {
            let model = Model::load(be, cfg.clone(), &ckpt).unwrap();
            let all = last_rows_of_steps(be, &model, &prompts, LogitsWanted::All);
            let last = last_rows_of_steps(be, &model, &prompts, LogitsWanted::Last);
            for (i, (all, last)) in all.iter().zip(&last).enumerate() {
                let err = rel_err(last, all);
                eprintln!("{variant} {dtype} row {i}: last alone vs all {err:.2e}");
                assert!(err <= bound, "{variant} {dtype} row {i}: {err:.3e}");
                assert_eq!(
                    argmax(last),
                    argmax(all),
                    "{variant} {dtype} row {i}: argmax"
                );
            }
        }
    }
}
