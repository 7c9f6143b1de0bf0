//! Every op of the CUDA backend against the CPU backend (the reference) on random inputs,
//! in f32 and bf16. Skipped without a GPU unless DSV2_REQUIRE_GPU is set.

mod common;

use common::*;
use dsv2_backend::{
    AttentionPath, Backend, Batch, CacheSpec, ComputeDtype, LogitsWanted, MlaAttention, MlaDims,
    Mlp, MoeWeights, RopeAngles, Routing,
};
use dsv2_cpu::CpuBackend;
use dsv2_cuda::CudaBackend;

const DTYPES: [ComputeDtype; 2] = [ComputeDtype::F32, ComputeDtype::Bf16];

/// Runs `f` for each dtype with both backends.
fn each_dtype(mut f: impl FnMut(ComputeDtype, &CpuBackend, &CudaBackend)) {
    for dtype in DTYPES {
        let Some(gpu) = cuda(dtype) else { return };
        f(dtype, &CpuBackend::new(dtype), &gpu);
    }
}

fn check(what: &str, dtype: ComputeDtype, got: &[f32], want: &[f32]) {
    let err = rel_err(got, want);
    eprintln!("{what} ({dtype:?}): relative error {err:.2e}");
    assert!(
        err <= op_tolerance(dtype),
        "{what} ({dtype:?}): relative error {err:.3e}"
    );
}

/// The same weight tensor loaded on both backends.
fn weights(
    cpu: &CpuBackend,
    gpu: &CudaBackend,
    t: &dsv2_core::TensorView,
) -> (
    <CpuBackend as Backend>::Weight,
    <CudaBackend as Backend>::Weight,
) {
    (cpu.load_weight(t).unwrap(), gpu.load_weight(t).unwrap())
}

/// Same input on both backends (rounded to bf16 so that both see identical values).
fn inputs(gpu: &CudaBackend, values: &[f32]) -> (Vec<f32>, dsv2_cuda::CudaBuffer) {
    (values.to_vec(), gpu.upload(values).unwrap())
}

#[test]
fn rms_norm_linear_add_embed() {
    each_dtype(|dtype, cpu, gpu| {
        let (rows, d, n, vocab) = (37, 300, 257, 500);
        let x = bf16_values(rows * d, 1, 2.0);
        let norm = norm_tensor("norm", d, 2);
        let w = tensor("w", &[n, d], 3, 0.1);
        let table = tensor("embed", &[vocab, d], 4, 1.0);
        let (xc, xg) = inputs(gpu, &x);
        // RMSNorm.
        let (nc, ng) = weights(cpu, gpu, &norm);
        let mut oc = cpu.alloc(rows * d).unwrap();
        let mut og = gpu.alloc(rows * d).unwrap();
        cpu.rms_norm(&xc, &nc, 1e-6, rows, &mut oc).unwrap();
        gpu.rms_norm(&xg, &ng, 1e-6, rows, &mut og).unwrap();
        check("rms_norm", dtype, &gpu.download(&og).unwrap(), &oc);
        // Linear, on the normed rows.
        let (wc, wg) = weights(cpu, gpu, &w);
        let mut lc = cpu.alloc(rows * n).unwrap();
        let mut lg = gpu.alloc(rows * n).unwrap();
        cpu.linear(&oc, rows, &wc, &mut lc).unwrap();
        gpu.linear(&og, rows, &wg, &mut lg).unwrap();
        check("linear", dtype, &gpu.download(&lg).unwrap(), &lc);
        // Residual add.
        let (mut ac, mut ag) = inputs(gpu, &x);
        cpu.add_assign(&mut ac, &oc, rows * d).unwrap();
        gpu.add_assign(&mut ag, &og, rows * d).unwrap();
        check("add_assign", dtype, &gpu.download(&ag).unwrap(), &ac);
        // Embedding lookup through a step.
        let mut batch = Batch::default();
        let ids: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 131 + 7) % vocab as u32)
            .collect();
        batch.push_seq(&ids, 0, &[0, 1, 2], 16, LogitsWanted::Last);
        let half = 4;
        let (cos, sin) = (values(rows * half, 5, 1.0), values(rows * half, 6, 1.0));
        let angles = RopeAngles {
            cos: &cos,
            sin: &sin,
        };
        let (mut sc, mut sg) = (cpu.alloc_step(rows).unwrap(), gpu.alloc_step(rows).unwrap());
        cpu.prepare_step(&batch, angles, &mut sc).unwrap();
        gpu.prepare_step(&batch, angles, &mut sg).unwrap();
        let (tc, tg) = weights(cpu, gpu, &table);
        cpu.embed(&tc, &sc, &mut oc).unwrap();
        gpu.embed(&tg, &sg, &mut og).unwrap();
        assert_eq!(gpu.download(&og).unwrap(), oc, "embed ({dtype:?})");
        // An out-of-vocabulary id is an error, not a read out of bounds.
        batch.clear();
        batch.push_seq(&[1, vocab as u32], 0, &[0], 16, LogitsWanted::Last);
        gpu.prepare_step(&batch, angles, &mut sg).unwrap();
        let e = gpu.embed(&tg, &sg, &mut og).unwrap_err().to_string();
        assert!(e.contains("token id 500"), "{e}");
    });
}

/// Attention shapes: (heads, nope, rope, v, latent).
const SHAPES: [(usize, usize, usize, usize, usize); 2] =
    [(4, 16, 8, 16, 32), (16, 128, 64, 128, 512)];

/// A batch of a prompt continued after a cached past, a decode token, and a fresh prompt,
/// with paged, interleaved block tables; and the batch that wrote the pasts.
fn attention_batches(block: usize) -> (Batch, Batch, usize) {
    let tables: [Vec<u32>; 3] = [vec![5, 0, 7], vec![2, 8, 1, 9], vec![4]];
    let pasts = [13usize, 40, 0];
    let news = [20usize, 1, 7];
    let mut history = Batch::default();
    let mut step = Batch::default();
    for i in 0..3 {
        let toks: Vec<u32> = (0..pasts[i] as u32).collect();
        if !toks.is_empty() {
            history.push_seq(&toks, 0, &tables[i], block, LogitsWanted::None);
        }
        let toks: Vec<u32> = (0..news[i] as u32).collect();
        step.push_seq(&toks, pasts[i], &tables[i], block, LogitsWanted::Last);
    }
    (history, step, 10)
}

#[test]
fn rope_cache_write_and_attention_paths() {
    each_dtype(|dtype, cpu, gpu| {
        for &(h, dn, dr, dv, c) in &SHAPES {
            let block = 16;
            let (history, batch, num_blocks) = attention_batches(block);
            let spec = CacheSpec {
                num_layers: 2,
                num_blocks,
                block_size: block,
                kv_lora_rank: c,
                rope_dim: dr,
            };
            let mut cc = cpu.alloc_cache(spec).unwrap();
            let mut cg = gpu.alloc_cache(spec).unwrap();
            let kv_norm = norm_tensor("kv_norm", c, 11);
            let (nc, ng) = weights(cpu, gpu, &kv_norm);
            let dims = MlaDims {
                num_heads: h,
                nope_dim: dn,
                rope_dim: dr,
                v_dim: dv,
                kv_lora_rank: c,
                softmax_scale: 0.1147,
            };
            let qd = dn + dr;
            // Write the pasts, then the step's tokens, to layer 1.
            for (i, b) in [&history, &batch].into_iter().enumerate() {
                let t = b.num_tokens();
                let cos: Vec<f32> = values(t * dr / 2, 20 + i as u64, 1.0);
                let sin: Vec<f32> = cos.iter().map(|v| (1.0 - v * v).sqrt()).collect();
                let angles = RopeAngles {
                    cos: &cos,
                    sin: &sin,
                };
                let (mut sc, mut sg) = (cpu.alloc_step(t).unwrap(), gpu.alloc_step(t).unwrap());
                cpu.prepare_step(b, angles, &mut sc).unwrap();
                gpu.prepare_step(b, angles, &mut sg).unwrap();
                let kv_a = bf16_values(t * (c + dr), 30 + i as u64, 2.0);
                let (kc, kg) = inputs(gpu, &kv_a);
                cpu.mla_write_cache(&kc, &nc, 1e-6, &sc, 1, &mut cc)
                    .unwrap();
                gpu.mla_write_cache(&kg, &ng, 1e-6, &sg, 1, &mut cg)
                    .unwrap();
                if i == 0 {
                    continue;
                }
                // The cache rows of every written slot.
                let all = gpu.download_cache(&cg).unwrap();
                let w = c + dr;
                let slots = num_blocks * block;
                let (mut got, mut want) = (Vec::new(), Vec::new());
                for b2 in [&history, &batch] {
                    for &slot in &b2.slots {
                        let at = (slots + slot as usize) * w;
                        got.extend_from_slice(&all[at..at + w]);
                        want.extend_from_slice(&cc.row(1, slot as usize));
                    }
                }
                check(&format!("mla_write_cache h{h} c{c}"), dtype, &got, &want);
                // RoPE on queries.
                let q = bf16_values(t * h * qd, 40, 1.0);
                let (mut qc, mut qg) = inputs(gpu, &q);
                cpu.rope_queries(&mut qc, dims, &sc).unwrap();
                gpu.rope_queries(&mut qg, dims, &sg).unwrap();
                check(
                    &format!("rope_queries h{h}"),
                    dtype,
                    &gpu.download(&qg).unwrap(),
                    &qc,
                );
                // Attention, all three path choices.
                let kv_b = tensor("kv_b", &[h * (dn + dv), c], 50, 0.15);
                let (bc, bg) = weights(cpu, gpu, &kv_b);
                for path in [
                    AttentionPath::Auto,
                    AttentionPath::Expanded,
                    AttentionPath::Absorbed,
                ] {
                    let mut oc = cpu.alloc(t * h * dv).unwrap();
                    let mut og = gpu.alloc(t * h * dv).unwrap();
                    cpu.mla_attention(
                        MlaAttention {
                            q: &qc,
                            kv_b_proj: &bc,
                            cache: &cc,
                            layer: 1,
                            step: &sc,
                            dims,
                            path,
                        },
                        &mut oc,
                    )
                    .unwrap();
                    gpu.mla_attention(
                        MlaAttention {
                            q: &qg,
                            kv_b_proj: &bg,
                            cache: &cg,
                            layer: 1,
                            step: &sg,
                            dims,
                            path,
                        },
                        &mut og,
                    )
                    .unwrap();
                    check(
                        &format!("mla_attention {path:?} h{h} c{c}"),
                        dtype,
                        &gpu.download(&og).unwrap(),
                        &oc,
                    );
                }
            }
        }
    });
}

/// Long paged contexts at the real V2-Lite attention shape, against the CPU: decode tokens
/// (the split-KV decode kernel with several 32-row tiles per split, and splits of one
/// tile) for batches of 1 and 3 sequences, and prompts of over 64 new tokens after a
/// cached past and from scratch (the prefill kernel with several key blocks and query
/// blocks), on both paths.
#[test]
fn long_context_attention() {
    each_dtype(|dtype, cpu, gpu| {
        let (h, dn, dr, dv, c) = (16, 128, 64, 128, 512);
        let block = 16;
        let cases: [(Vec<usize>, Vec<usize>, &[AttentionPath]); 3] = [
            (vec![1499], vec![1], &[AttentionPath::Auto]),
            (vec![1099, 36, 2599], vec![1, 1, 1], &[AttentionPath::Auto]),
            (
                vec![100, 0, 3],
                vec![150, 130, 1],
                &[AttentionPath::Auto, AttentionPath::Expanded],
            ),
        ];
        for (pasts, news, paths) in cases {
            let contexts: Vec<usize> = pasts.iter().zip(&news).map(|(p, n)| p + n).collect();
            let blocks: Vec<usize> = contexts.iter().map(|&x| x.div_ceil(block)).collect();
            let num_blocks: usize = blocks.iter().sum::<usize>() + 3;
            // Interleaved tables: sequence i takes blocks i, i + n, i + 2n, ... where free.
            let mut tables: Vec<Vec<u32>> = vec![Vec::new(); contexts.len()];
            let mut next = 0u32;
            while tables.iter().zip(&blocks).any(|(t, &b)| t.len() < b) {
                for (t, &b) in tables.iter_mut().zip(&blocks) {
                    if t.len() < b {
                        t.push(next);
                        next += 1;
                    }
                }
            }
            let spec = CacheSpec {
                num_layers: 1,
                num_blocks,
                block_size: block,
                kv_lora_rank: c,
                rope_dim: dr,
            };
            let mut cc = cpu.alloc_cache(spec).unwrap();
            let mut cg = gpu.alloc_cache(spec).unwrap();
            let kv_norm = norm_tensor("kv_norm", c, 12);
            let (nc, ng) = weights(cpu, gpu, &kv_norm);
            let dims = MlaDims {
                num_heads: h,
                nope_dim: dn,
                rope_dim: dr,
                v_dim: dv,
                kv_lora_rank: c,
                softmax_scale: 0.1147,
            };
            // The pasts, then the new tokens of every sequence.
            let mut history = Batch::default();
            let mut step = Batch::default();
            for i in 0..contexts.len() {
                if pasts[i] > 0 {
                    let toks: Vec<u32> = (0..pasts[i] as u32).collect();
                    history.push_seq(&toks, 0, &tables[i], block, LogitsWanted::None);
                }
                let toks: Vec<u32> = (0..news[i] as u32).collect();
                step.push_seq(&toks, pasts[i], &tables[i], block, LogitsWanted::Last);
            }
            for (i, b) in [&history, &step].into_iter().enumerate() {
                let t = b.num_tokens();
                let cos: Vec<f32> = values(t * dr / 2, 70 + i as u64, 1.0);
                let sin: Vec<f32> = cos.iter().map(|v| (1.0 - v * v).sqrt()).collect();
                let angles = RopeAngles {
                    cos: &cos,
                    sin: &sin,
                };
                let (mut sc, mut sg) = (cpu.alloc_step(t).unwrap(), gpu.alloc_step(t).unwrap());
                cpu.prepare_step(b, angles, &mut sc).unwrap();
                gpu.prepare_step(b, angles, &mut sg).unwrap();
                let kv_a = bf16_values(t * (c + dr), 80 + i as u64, 2.0);
                let (kc, kg) = inputs(gpu, &kv_a);
                cpu.mla_write_cache(&kc, &nc, 1e-6, &sc, 0, &mut cc)
                    .unwrap();
                gpu.mla_write_cache(&kg, &ng, 1e-6, &sg, 0, &mut cg)
                    .unwrap();
                if i == 0 {
                    continue;
                }
                let q = bf16_values(t * h * (dn + dr), 90, 1.0);
                let (qc, qg) = inputs(gpu, &q);
                let kv_b = tensor("kv_b", &[h * (dn + dv), c], 91, 0.15);
                let (bc, bg) = weights(cpu, gpu, &kv_b);
                for &path in paths {
                    let mut oc = cpu.alloc(t * h * dv).unwrap();
                    let mut og = gpu.alloc(t * h * dv).unwrap();
                    cpu.mla_attention(
                        MlaAttention {
                            q: &qc,
                            kv_b_proj: &bc,
                            cache: &cc,
                            layer: 0,
                            step: &sc,
                            dims,
                            path,
                        },
                        &mut oc,
                    )
                    .unwrap();
                    gpu.mla_attention(
                        MlaAttention {
                            q: &qg,
                            kv_b_proj: &bg,
                            cache: &cg,
                            layer: 0,
                            step: &sg,
                            dims,
                            path,
                        },
                        &mut og,
                    )
                    .unwrap();
                    check(
                        &format!("attention {path:?}, pasts {pasts:?}, new tokens {news:?}"),
                        dtype,
                        &gpu.download(&og).unwrap(),
                        &oc,
                    );
                }
            }
        }
    });
}

/// `linear` at 1 to 8 rows (the small-batch GEMV kernel in bf16) and 9 rows (cuBLAS),
/// with an odd output width.
#[test]
fn small_batch_linear() {
    each_dtype(|dtype, cpu, gpu| {
        let (k, n) = (512, 259);
        let w = tensor("w_small", &[n, k], 3, 0.2);
        let (wc, wg) = weights(cpu, gpu, &w);
        for rows in [1usize, 3, 8, 9] {
            let x = bf16_values(rows * k, 40 + rows as u64, 1.0);
            let (xc, xg) = inputs(gpu, &x);
            let mut lc = cpu.alloc(rows * n).unwrap();
            let mut lg = gpu.alloc(rows * n).unwrap();
            cpu.linear(&xc, rows, &wc, &mut lc).unwrap();
            gpu.linear(&xg, rows, &wg, &mut lg).unwrap();
            check(
                &format!("linear rows {rows}"),
                dtype,
                &gpu.download(&lg).unwrap(),
                &lc,
            );
        }
    });
}

/// Long GEMV rows (K 10,944, as V2-Lite's dense down projection), the dense MLP up to 4
/// rows (gate and up in one GEMV launch) and the small-batch MoE at V2-Lite's top-6 with
/// shared experts (`moe_small_up` at its default rows per warp), each against the CPU.
#[test]
fn long_rows_dense_mlp_and_top6_moe() {
    each_dtype(|dtype, cpu, gpu| {
        let k = 10_944;
        for n in [64usize, 67] {
            let w = tensor(&format!("w_long{n}"), &[n, k], 5, 0.05);
            let (wc, wg) = weights(cpu, gpu, &w);
            for rows in [1usize, 3, 8] {
                let x = bf16_values(rows * k, 70 + rows as u64, 1.0);
                let (xc, xg) = inputs(gpu, &x);
                let mut lc = cpu.alloc(rows * n).unwrap();
                let mut lg = gpu.alloc(rows * n).unwrap();
                cpu.linear(&xc, rows, &wc, &mut lc).unwrap();
                gpu.linear(&xg, rows, &wg, &mut lg).unwrap();
                check(
                    &format!("linear n {n} k {k} rows {rows}"),
                    dtype,
                    &gpu.download(&lg).unwrap(),
                    &lc,
                );
            }
        }
        let d = 256;
        let (mc, mg) = (
            mlp_weights(cpu, "dense", d, 8_256, 11),
            mlp_weights(gpu, "dense", d, 8_256, 11),
        );
        let lite = Routing {
            top_k: 6,
            groups: None,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        };
        let (ec, eg) = (
            moe_weights(cpu, d, 64, 16, true, lite),
            moe_weights(gpu, d, 64, 16, true, lite),
        );
        for rows in [1usize, 2, 4] {
            let x = bf16_values(rows * d, 90 + rows as u64, 2.0);
            let (xc, xg) = inputs(gpu, &x);
            let mut oc = cpu.alloc(rows * d).unwrap();
            let mut og = gpu.alloc(rows * d).unwrap();
            cpu.mlp(&xc, rows, &mc, &mut oc).unwrap();
            gpu.mlp(&xg, rows, &mg, &mut og).unwrap();
            check(
                &format!("dense mlp inter 8256 rows {rows}"),
                dtype,
                &gpu.download(&og).unwrap(),
                &oc,
            );
            cpu.moe(&xc, rows, &ec, &mut oc).unwrap();
            gpu.moe(&xg, rows, &eg, &mut og).unwrap();
            check(
                &format!("moe top-6 + shared rows {rows}"),
                dtype,
                &gpu.download(&og).unwrap(),
                &oc,
            );
        }
    });
}

/// `linear_pair` (one GEMV launch for both products up to 8 rows) and
/// `rope_and_write_cache` (one kernel) against the CPU's unfused defaults.
#[test]
fn fused_projection_pair_and_cache_write() {
    each_dtype(|dtype, cpu, gpu| {
        let (k, na, nb) = (256, 200, 72);
        let wa = tensor("wa", &[na, k], 5, 0.2);
        let wb = tensor("wb", &[nb, k], 6, 0.2);
        let (wac, wag) = weights(cpu, gpu, &wa);
        let (wbc, wbg) = weights(cpu, gpu, &wb);
        for rows in [1usize, 3, 9] {
            let x = bf16_values(rows * k, 60 + rows as u64, 1.0);
            let (xc, xg) = inputs(gpu, &x);
            let (mut ac, mut bc) = (cpu.alloc(rows * na).unwrap(), cpu.alloc(rows * nb).unwrap());
            let (mut ag, mut bg) = (gpu.alloc(rows * na).unwrap(), gpu.alloc(rows * nb).unwrap());
            cpu.linear_pair(&xc, rows, &wac, &mut ac, &wbc, &mut bc)
                .unwrap();
            gpu.linear_pair(&xg, rows, &wag, &mut ag, &wbg, &mut bg)
                .unwrap();
            check(
                &format!("linear_pair a rows {rows}"),
                dtype,
                &gpu.download(&ag).unwrap(),
                &ac,
            );
            check(
                &format!("linear_pair b rows {rows}"),
                dtype,
                &gpu.download(&bg).unwrap(),
                &bc,
            );
        }
        // RoPE of the queries and the cache write of a paged batch, fused on the GPU.
        let (h, dn, dr, c) = (16, 128, 64, 512);
        let block = 16;
        let (_, batch, num_blocks) = attention_batches(block);
        let spec = CacheSpec {
            num_layers: 2,
            num_blocks,
            block_size: block,
            kv_lora_rank: c,
            rope_dim: dr,
        };
        let (mut cc, mut cg) = (
            cpu.alloc_cache(spec).unwrap(),
            gpu.alloc_cache(spec).unwrap(),
        );
        let kv_norm = norm_tensor("kv_norm", c, 13);
        let (nc, ng) = weights(cpu, gpu, &kv_norm);
        let dims = MlaDims {
            num_heads: h,
            nope_dim: dn,
            rope_dim: dr,
            v_dim: 128,
            kv_lora_rank: c,
            softmax_scale: 0.1,
        };
        let t = batch.num_tokens();
        let cos: Vec<f32> = values(t * dr / 2, 21, 1.0);
        let sin: Vec<f32> = cos.iter().map(|v| (1.0 - v * v).sqrt()).collect();
        let angles = RopeAngles {
            cos: &cos,
            sin: &sin,
        };
        let (mut sc, mut sg) = (cpu.alloc_step(t).unwrap(), gpu.alloc_step(t).unwrap());
        cpu.prepare_step(&batch, angles, &mut sc).unwrap();
        gpu.prepare_step(&batch, angles, &mut sg).unwrap();
        let kv_a = bf16_values(t * (c + dr), 31, 2.0);
        let (kc, kg) = inputs(gpu, &kv_a);
        let q = bf16_values(t * h * (dn + dr), 41, 1.0);
        let (mut qc, mut qg) = inputs(gpu, &q);
        cpu.rope_and_write_cache(&mut qc, dims, &kc, &nc, 1e-6, &sc, 1, &mut cc)
            .unwrap();
        gpu.rope_and_write_cache(&mut qg, dims, &kg, &ng, 1e-6, &sg, 1, &mut cg)
            .unwrap();
        check(
            "rope_and_write_cache q",
            dtype,
            &gpu.download(&qg).unwrap(),
            &qc,
        );
        let all = gpu.download_cache(&cg).unwrap();
        let w = c + dr;
        let slots = num_blocks * block;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for &slot in &batch.slots {
            let at = (slots + slot as usize) * w;
            got.extend_from_slice(&all[at..at + w]);
            want.extend_from_slice(&cc.row(1, slot as usize));
        }
        check("rope_and_write_cache cache", dtype, &got, &want);
    });
}

fn mlp_weights<B: Backend>(
    be: &B,
    prefix: &str,
    d: usize,
    inter: usize,
    seed: u64,
) -> Mlp<B::Weight> {
    Mlp {
        gate_proj: be
            .load_weight(&tensor(&format!("{prefix}.gate"), &[inter, d], seed, 0.2))
            .unwrap(),
        up_proj: be
            .load_weight(&tensor(&format!("{prefix}.up"), &[inter, d], seed + 1, 0.2))
            .unwrap(),
        down_proj: be
            .load_weight(&tensor(
                &format!("{prefix}.down"),
                &[d, inter],
                seed + 2,
                0.2,
            ))
            .unwrap(),
    }
}

fn moe_weights<B: Backend>(
    be: &B,
    d: usize,
    inter: usize,
    experts: usize,
    shared: bool,
    routing: Routing,
) -> MoeWeights<B::Weight> {
    MoeWeights {
        gate: be
            .load_weight(&tensor("router", &[experts, d], 60, 0.5))
            .unwrap(),
        experts: (0..experts)
            .map(|e| mlp_weights(be, &format!("e{e}"), d, inter, 100 + 3 * e as u64))
            .collect(),
        shared_experts: shared.then(|| mlp_weights(be, "shared", d, 2 * inter, 90)),
        routing,
    }
}

#[test]
fn mlp_and_moe_routing_variants() {
    each_dtype(|dtype, cpu, gpu| {
        let (d, inter) = (64, 32);
        let greedy = Routing {
            top_k: 3,
            groups: None,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        };
        let grouped = Routing {
            top_k: 4,
            groups: Some((4, 2)),
            norm_topk_prob: false,
            routed_scaling_factor: 16.0,
        };
        let renorm = Routing {
            top_k: 2,
            groups: None,
            norm_topk_prob: true,
            routed_scaling_factor: 16.0,
        };
        for rows in [1usize, 3, 5, 70, 300] {
            let x = bf16_values(rows * d, rows as u64, 2.0);
            let (xc, xg) = inputs(gpu, &x);
            let (mc, mg) = (
                mlp_weights(cpu, "mlp", d, 96, 7),
                mlp_weights(gpu, "mlp", d, 96, 7),
            );
            let mut oc = cpu.alloc(rows * d).unwrap();
            let mut og = gpu.alloc(rows * d).unwrap();
            cpu.mlp(&xc, rows, &mc, &mut oc).unwrap();
            gpu.mlp(&xg, rows, &mg, &mut og).unwrap();
            check(
                &format!("mlp rows {rows}"),
                dtype,
                &gpu.download(&og).unwrap(),
                &oc,
            );
            for (name, routing, experts, shared) in [
                ("greedy", greedy, 8, true),
                ("group-limited", grouped, 16, true),
                ("renormalized", renorm, 8, false),
            ] {
                let wc = moe_weights(cpu, d, inter, experts, shared, routing);
                let wg = moe_weights(gpu, d, inter, experts, shared, routing);
                cpu.moe(&xc, rows, &wc, &mut oc).unwrap();
                gpu.moe(&xg, rows, &wg, &mut og).unwrap();
                check(
                    &format!("moe {name} rows {rows}"),
                    dtype,
                    &gpu.download(&og).unwrap(),
                    &oc,
                );
            }
        }
    });
}

#[test]
fn logits_and_greedy_tokens() {
    each_dtype(|dtype, cpu, gpu| {
        let (t, d, vocab) = (9, 128, 3000);
        let x = bf16_values(t * d, 70, 1.0);
        let head = tensor("lm_head", &[vocab, d], 71, 0.3);
        let (hc, hg) = weights(cpu, gpu, &head);
        let (xc, xg) = inputs(gpu, &x);
        let mut batch = Batch::default();
        batch.push_seq(&[1, 2, 3, 4], 0, &[0], 16, LogitsWanted::All);
        batch.push_seq(&[5, 6, 7, 8, 9], 0, &[1], 16, LogitsWanted::Last);
        let cos = vec![1.0; t * 4];
        let sin = vec![0.0; t * 4];
        let angles = RopeAngles {
            cos: &cos,
            sin: &sin,
        };
        let (mut sc, mut sg) = (cpu.alloc_step(t).unwrap(), gpu.alloc_step(t).unwrap());
        cpu.prepare_step(&batch, angles, &mut sc).unwrap();
        gpu.prepare_step(&batch, angles, &mut sg).unwrap();
        let rows = batch.logits_rows.len();
        let mut lc = vec![0.0; rows * vocab];
        let mut lg = vec![f32::NAN; rows * vocab];
        cpu.logits(&xc, &sc, &hc, &mut lc).unwrap();
        gpu.logits(&xg, &sg, &hg, &mut lg).unwrap();
        check("logits", dtype, &lg, &lc);
        let mut ids = vec![u32::MAX; rows];
        gpu.greedy_tokens(&xg, &sg, &hg, &mut ids).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            // The device's argmax of its own logits, ties to the lowest id.
            assert_eq!(
                id as usize,
                argmax(&lg[r * vocab..(r + 1) * vocab]),
                "row {r} ({dtype:?})"
            );
        }
    });
}

/// The fused layer inputs against the CPU's unfused defaults: the residual add and
/// The residual add and RMSNorm (`add_rms_norm`) at widths of the 16-byte kernel (d % 8
/// == 0, up to two chunks a thread: 2048, 4096) and of the scalar one (300, 4104).
#[test]
fn add_rms_norm_widths() {
    each_dtype(|dtype, cpu, gpu| {
        for d in [2048usize, 4096, 300, 4104] {
            let norm = norm_tensor(&format!("arn{d}"), d, 18);
            let (nc, ng) = weights(cpu, gpu, &norm);
            for rows in [1usize, 37] {
                let seed = (d + rows) as u64;
                let (mut accc, mut accg) = inputs(gpu, &bf16_values(rows * d, seed, 1.0));
                let (xc, xg) = inputs(gpu, &bf16_values(rows * d, seed + 1, 1.0));
                let (mut oc, mut og) = (cpu.alloc(rows * d).unwrap(), gpu.alloc(rows * d).unwrap());
                cpu.add_rms_norm(&mut accc, &xc, &nc, 1e-6, rows, d, &mut oc)
                    .unwrap();
                gpu.add_rms_norm(&mut accg, &xg, &ng, 1e-6, rows, d, &mut og)
                    .unwrap();
                let residual = gpu.download(&accg).unwrap();
                assert_eq!(
                    residual, accc,
                    "add_rms_norm residual d {d} rows {rows} ({dtype:?})"
                );
                check(
                    &format!("add_rms_norm d {d} rows {rows}"),
                    dtype,
                    &gpu.download(&og).unwrap(),
                    &oc,
                );
            }
        }
    });
}

/// RMSNorm computed inside the query/latent GEMV (`add_rms_norm_linear_pair`) and inside
/// the MoE router launch (`add_rms_norm_moe`), up to the GEMV's 8 rows and past them.
#[test]
fn fused_norm_into_projections_and_moe() {
    each_dtype(|dtype, cpu, gpu| {
        let (d, na, nb) = (256, 200, 72);
        let wa = tensor("fa", &[na, d], 15, 0.2);
        let wb = tensor("fb", &[nb, d], 16, 0.2);
        let norm = norm_tensor("fnorm", d, 17);
        let (wac, wag) = weights(cpu, gpu, &wa);
        let (wbc, wbg) = weights(cpu, gpu, &wb);
        let (nc, ng) = weights(cpu, gpu, &norm);
        for rows in [1usize, 3, 8, 9] {
            let (mut accc, mut accg) = inputs(gpu, &bf16_values(rows * d, 80 + rows as u64, 1.0));
            let (xc, xg) = inputs(gpu, &bf16_values(rows * d, 90 + rows as u64, 1.0));
            let (mut normc, mut normg) =
                (cpu.alloc(rows * d).unwrap(), gpu.alloc(rows * d).unwrap());
            let (mut ac, mut bc) = (cpu.alloc(rows * na).unwrap(), cpu.alloc(rows * nb).unwrap());
            let (mut ag, mut bg) = (gpu.alloc(rows * na).unwrap(), gpu.alloc(rows * nb).unwrap());
            cpu.add_rms_norm_linear_pair(
                &mut accc, &xc, &nc, 1e-6, rows, d, &mut normc, &wac, &mut ac, &wbc, &mut bc,
            )
            .unwrap();
            gpu.add_rms_norm_linear_pair(
                &mut accg, &xg, &ng, 1e-6, rows, d, &mut normg, &wag, &mut ag, &wbg, &mut bg,
            )
            .unwrap();
            for (what, got, want) in [
                ("residual", gpu.download(&accg).unwrap(), accc.to_vec()),
                ("normed", gpu.download(&normg).unwrap(), normc.to_vec()),
                ("a", gpu.download(&ag).unwrap(), ac.to_vec()),
                ("b", gpu.download(&bg).unwrap(), bc.to_vec()),
            ] {
                check(
                    &format!("add_rms_norm_linear_pair {what} rows {rows}"),
                    dtype,
                    &got,
                    &want,
                );
            }
        }
        let d = 64;
        let norm = norm_tensor("mnorm", d, 18);
        let (nc, ng) = weights(cpu, gpu, &norm);
        let routings = [
            (
                "greedy",
                Routing {
                    top_k: 3,
                    groups: None,
                    norm_topk_prob: false,
                    routed_scaling_factor: 1.0,
                },
                8,
                true,
            ),
            (
                "group-limited",
                Routing {
                    top_k: 4,
                    groups: Some((4, 2)),
                    norm_topk_prob: false,
                    routed_scaling_factor: 16.0,
                },
                16,
                true,
            ),
            (
                "renormalized",
                Routing {
                    top_k: 2,
                    groups: None,
                    norm_topk_prob: true,
                    routed_scaling_factor: 16.0,
                },
                8,
                false,
            ),
        ];
        for rows in [1usize, 3, 4, 5] {
            for (name, routing, experts, shared) in routings {
                let wc = moe_weights(cpu, d, 32, experts, shared, routing);
                let wg = moe_weights(gpu, d, 32, experts, shared, routing);
                let (mut accc, mut accg) =
                    inputs(gpu, &bf16_values(rows * d, 100 + rows as u64, 1.0));
                let (mut xc, mut xg) = inputs(gpu, &bf16_values(rows * d, 110 + rows as u64, 1.0));
                let (mut normc, mut normg) =
                    (cpu.alloc(rows * d).unwrap(), gpu.alloc(rows * d).unwrap());
                cpu.add_rms_norm_moe(&mut accc, &mut xc, &nc, 1e-6, rows, d, &mut normc, &wc)
                    .unwrap();
                gpu.add_rms_norm_moe(&mut accg, &mut xg, &ng, 1e-6, rows, d, &mut normg, &wg)
                    .unwrap();
                for (what, got, want) in [
                    ("residual", gpu.download(&accg).unwrap(), accc.to_vec()),
                    ("normed", gpu.download(&normg).unwrap(), normc.to_vec()),
                    ("output", gpu.download(&xg).unwrap(), xc.to_vec()),
                ] {
                    check(
                        &format!("add_rms_norm_moe {name} {what} rows {rows}"),
                        dtype,
                        &got,
                        &want,
                    );
                }
            }
        }
    });
}

/// `rope_cache_attention` on a decode-only batch at the real widths (the queries' RoPE,
/// the cache write and the absorbed query in one launch, then the decode kernel) against
/// the CPU's unfused ops: roped queries, cached rows and the attention output.
#[test]
fn fused_rope_cache_attention() {
    each_dtype(|dtype, cpu, gpu| {
        let (h, dn, dr, dv, c) = (16, 128, 64, 128, 512);
        let block = 16;
        let tables: [Vec<u32>; 3] = [vec![5, 0, 7], vec![2, 8, 1, 9], vec![4, 3]];
        let pasts = [37usize, 60, 20];
        let spec = CacheSpec {
            num_layers: 2,
            num_blocks: 10,
            block_size: block,
            kv_lora_rank: c,
            rope_dim: dr,
        };
        let (mut cc, mut cg) = (
            cpu.alloc_cache(spec).unwrap(),
            gpu.alloc_cache(spec).unwrap(),
        );
        let kv_norm = norm_tensor("rca_norm", c, 23);
        let (nc, ng) = weights(cpu, gpu, &kv_norm);
        let kv_b = tensor("rca_kv_b", &[h * (dn + dv), c], 24, 0.05);
        let (kbc, kbg) = weights(cpu, gpu, &kv_b);
        let dims = MlaDims {
            num_heads: h,
            nope_dim: dn,
            rope_dim: dr,
            v_dim: dv,
            kv_lora_rank: c,
            softmax_scale: 0.07,
        };
        // The pasts, then one decode token per sequence, written and attended at once.
        // Then one token alone (the batch-1 kernel rope_absorb_q_r1).
        let mut history = Batch::default();
        let mut step = Batch::default();
        let mut single = Batch::default();
        for i in 0..3 {
            let toks: Vec<u32> = (0..pasts[i] as u32).collect();
            history.push_seq(&toks, 0, &tables[i], block, LogitsWanted::None);
            step.push_seq(&[1], pasts[i], &tables[i], block, LogitsWanted::Last);
        }
        single.push_seq(&[1], pasts[1], &tables[1], block, LogitsWanted::Last);
        for (b, seed, path) in [
            (&history, 50u64, None),
            (&step, 60, Some(AttentionPath::Absorbed)),
            (&step, 70, Some(AttentionPath::Auto)),
            (&single, 80, Some(AttentionPath::Auto)),
        ] {
            let t = b.num_tokens();
            let cos: Vec<f32> = values(t * dr / 2, seed, 1.0);
            let sin: Vec<f32> = cos.iter().map(|v| (1.0 - v * v).sqrt()).collect();
            let angles = RopeAngles {
                cos: &cos,
                sin: &sin,
            };
            let (mut sc, mut sg) = (cpu.alloc_step(t).unwrap(), gpu.alloc_step(t).unwrap());
            cpu.prepare_step(b, angles, &mut sc).unwrap();
            gpu.prepare_step(b, angles, &mut sg).unwrap();
            let (kc, kg) = inputs(gpu, &bf16_values(t * (c + dr), seed + 1, 2.0));
            let (mut qc, mut qg) = inputs(gpu, &bf16_values(t * h * (dn + dr), seed + 2, 1.0));
            let Some(path) = path else {
                cpu.mla_write_cache(&kc, &nc, 1e-6, &sc, 1, &mut cc)
                    .unwrap();
                gpu.mla_write_cache(&kg, &ng, 1e-6, &sg, 1, &mut cg)
                    .unwrap();
                continue;
            };
            let (mut oc, mut og) = (
                cpu.alloc(t * h * dv).unwrap(),
                gpu.alloc(t * h * dv).unwrap(),
            );
            cpu.rope_cache_attention(
                &mut qc, dims, &kc, &nc, 1e-6, &kbc, &sc, 1, &mut cc, path, &mut oc,
            )
            .unwrap();
            gpu.rope_cache_attention(
                &mut qg, dims, &kg, &ng, 1e-6, &kbg, &sg, 1, &mut cg, path, &mut og,
            )
            .unwrap();
            check(
                &format!("rope_cache_attention {path:?} {t} tokens q"),
                dtype,
                &gpu.download(&qg).unwrap(),
                &qc,
            );
            check(
                &format!("rope_cache_attention {path:?} {t} tokens out"),
                dtype,
                &gpu.download(&og).unwrap(),
                &oc,
            );
            let all = gpu.download_cache(&cg).unwrap();
            let w = c + dr;
            let slots = spec.num_blocks * block;
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for &slot in &b.slots {
                let at = (slots + slot as usize) * w;
                got.extend_from_slice(&all[at..at + w]);
                want.extend_from_slice(&cc.row(1, slot as usize));
            }
            check(
                &format!("rope_cache_attention {path:?} {t} tokens cache"),
                dtype,
                &got,
                &want,
            );
        }
    });
}
