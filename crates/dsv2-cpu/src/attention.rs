//! MLA attention over the paged latent cache, in its two formulations.
//!
//! Both read only the cache: per token `C` normalized latent values and `Dr` rotated
//! RoPE key values. *Expanded* re-derives per-head keys and values with `kv_b_proj` (the
//! prefill path); *absorbed* folds `W_UK` into the query and applies `W_UV` after the
//! weighted sum of latents (the decode path). They are equal up to f32 rounding.

use dsv2_backend::{AttentionPath, MlaAttention, MlaDims, SeqSlice};
use rayon::prelude::*;

use crate::kernels::{axpy, dot, gemm_f32, round_bf16, MatRef, SyncPtr};
use crate::{with_elems, CpuBackend, CpuCache};

pub(crate) fn mla_attention(be: &CpuBackend, args: MlaAttention<'_, CpuBackend>, out: &mut [f32]) {
    for seq in &args.step.batch.seqs {
        let path = match args.path {
            AttentionPath::Auto if seq.query_len == 1 => AttentionPath::Absorbed,
            AttentionPath::Auto => AttentionPath::Expanded,
            p => p,
        };
        match path {
            AttentionPath::Absorbed => absorbed(be, &args, seq, out),
            _ => expanded(be, &args, seq, out),
        }
    }
}

/// Cache slot of position `pos` of a sequence.
fn slot(seq: &SeqSlice, block_size: usize, pos: usize) -> usize {
    seq.block_table[pos / block_size] as usize * block_size + pos % block_size
}

/// Softmax over `scores` (already scaled), with bf16 rounding of the probabilities when
/// the backend computes in bf16.
fn softmax(be: &CpuBackend, scores: &mut [f32]) {
    dsv2_backend::routing::softmax_in_place(scores);
    be.round(scores);
}

fn scale_score(be: &CpuBackend, raw: f32, scale: f32) -> f32 {
    if be.bf16() {
        round_bf16(round_bf16(raw) * scale)
    } else {
        raw * scale
    }
}

fn expanded(be: &CpuBackend, args: &MlaAttention<'_, CpuBackend>, seq: &SeqSlice, out: &mut [f32]) {
    let d: MlaDims = args.dims;
    let cache: &CpuCache = args.cache;
    let bs = cache.spec().block_size;
    let (c, dr, dn, dv, h) = (d.kv_lora_rank, d.rope_dim, d.nope_dim, d.v_dim, d.num_heads);
    let s_len = seq.context_len;
    let past = s_len - seq.query_len;
    // Gather the context's latents and RoPE keys, then expand keys and values per head.
    let mut latents = vec![0.0f32; s_len * c];
    let mut k_pe = vec![0.0f32; s_len * dr];
    for pos in 0..s_len {
        let row = cache.row(args.layer, slot(seq, bs, pos));
        latents[pos * c..(pos + 1) * c].copy_from_slice(&row[..c]);
        k_pe[pos * dr..(pos + 1) * dr].copy_from_slice(&row[c..]);
    }
    let kv_w = h * (dn + dv);
    let mut kv = vec![0.0f32; s_len * kv_w];
    args.kv_b_proj.matmul(&latents, s_len, &mut kv);
    be.round(&mut kv);

    let qd = d.q_head_dim();
    let (tq, q_row) = (seq.query_len, h * qd);
    let q_rows = &args.q[seq.query_start * q_row..(seq.query_start + tq) * q_row];
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_row = h * dv;
    (0..h).into_par_iter().for_each(|head| {
        let view = |data, row_stride, col_stride| MatRef {
            data,
            row_stride,
            col_stride,
        };
        // scores[Tq, S] = q_nope · k_noneᵀ + q_pe · k_peᵀ (keys read transposed).
        let mut scores = vec![0.0f32; tq * s_len];
        let head_kv = &kv[head * (dn + dv)..];
        let q_head = &q_rows[head * qd..];
        gemm_f32(
            tq,
            s_len,
            dn,
            view(q_head, q_row, 1),
            view(head_kv, 1, kv_w),
            &mut scores,
            s_len,
            false,
        );
        gemm_f32(
            tq,
            s_len,
            dr,
            view(&q_head[dn..], q_row, 1),
            view(&k_pe, 1, dr),
            &mut scores,
            s_len,
            true,
        );
        // Scale, causal mask (query i sees positions ..= past + i), softmax.
        for (i, row) in scores.chunks_mut(s_len).enumerate() {
            let visible = past + i + 1;
            for score in row[..visible].iter_mut() {
                *score = scale_score(be, *score, d.softmax_scale);
            }
            softmax(be, &mut row[..visible]);
            row[visible..].fill(0.0);
        }
        // out[Tq, Dv] = probs · v
        let mut head_out = vec![0.0f32; tq * dv];
        gemm_f32(
            tq,
            dv,
            s_len,
            view(&scores, s_len, 1),
            view(&head_kv[dn..], kv_w, 1),
            &mut head_out,
            dv,
            false,
        );
        be.round(&mut head_out);
        for (i, row) in head_out.chunks(dv).enumerate() {
            let t = seq.query_start + i;
            // SAFETY: row t, head `head` is written by this task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(t * out_row + head * dv), dv)
            };
            dst.copy_from_slice(row);
        }
    });
}

fn absorbed(be: &CpuBackend, args: &MlaAttention<'_, CpuBackend>, seq: &SeqSlice, out: &mut [f32]) {
    let d: MlaDims = args.dims;
    let cache: &CpuCache = args.cache;
    let bs = cache.spec().block_size;
    let (c, dn, dv, h) = (d.kv_lora_rank, d.nope_dim, d.v_dim, d.num_heads);
    let past = seq.context_len - seq.query_len;
    let qd = d.q_head_dim();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_row = h * dv;
    with_elems!(args.kv_b_proj, |kv_b| {
        (0..h).into_par_iter().for_each(|head| {
            let w_uk = |j: usize| &kv_b[(head * (dn + dv) + j) * c..][..c];
            let w_uv = |j: usize| &kv_b[(head * (dn + dv) + dn + j) * c..][..c];
            let mut q_lat = vec![0.0f32; c];
            let mut o_lat = vec![0.0f32; c];
            let mut scores = vec![0.0f32; seq.context_len];
            for i in 0..seq.query_len {
                let t = seq.query_start + i;
                let q = &args.q[t * h * qd + head * qd..][..qd];
                // q_lat = W_UK[head]ᵀ · q_nope: the query moved into latent space.
                q_lat.fill(0.0);
                for (j, &qv) in q[..dn].iter().enumerate() {
                    axpy(qv, w_uk(j), &mut q_lat);
                }
                be.round(&mut q_lat);
                let visible = past + i + 1;
                for (s, score) in scores[..visible].iter_mut().enumerate() {
                    let row = cache.row(args.layer, slot(seq, bs, s));
                    let raw = dot(&row[..c], &q_lat) + dot(&row[c..], &q[dn..]);
                    *score = scale_score(be, raw, d.softmax_scale);
                }
                softmax(be, &mut scores[..visible]);
                // o_lat = Σ p_s c_s, then o = W_UV[head] · o_lat.
                o_lat.fill(0.0);
                for (s, &p) in scores[..visible].iter().enumerate() {
                    let row = cache.row(args.layer, slot(seq, bs, s));
                    axpy(p, &row[..c], &mut o_lat);
                }
                be.round(&mut o_lat);
                // SAFETY: row t, head `head` is written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * out_row + head * dv), dv)
                };
                for (j, o) in dst.iter_mut().enumerate() {
                    *o = dot(w_uv(j), &o_lat);
                }
                be.round(dst);
            }
        })
    });
}
