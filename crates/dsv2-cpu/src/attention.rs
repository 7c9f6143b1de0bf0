//! MLA attention over the paged latent cache, in its two formulations.
//!
//! Both read only the cache: per token `C` normalized latent values and `Dr` rotated
//! RoPE key values. *Expanded* re-derives per-head keys and values with `kv_b_proj` (the
//! prefill path); *absorbed* folds `W_UK` into the query and applies `W_UV` after the
//! weighted sum of latents (the decode path). They are equal up to f32 rounding.

use dsv2_backend::{AttentionPath, MlaAttention, MlaDims, SeqSlice};
use rayon::prelude::*;

use crate::kernels::{axpy, dot, gemm_f32, round_bf16, MatRef, SyncPtr};
use crate::scratch::take;
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
    let mut latents = take::<f32>(s_len * c);
    let mut k_pe = take::<f32>(s_len * dr);
    for pos in 0..s_len {
        let row = cache.row(args.layer, slot(seq, bs, pos));
        latents[pos * c..(pos + 1) * c].copy_from_slice(&row[..c]);
        k_pe[pos * dr..(pos + 1) * dr].copy_from_slice(&row[c..]);
    }
    let kv_w = h * (dn + dv);
    let mut kv = take::<f32>(s_len * kv_w);
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
        let mut scores = take::<f32>(tq * s_len);
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
        let mut head_out = take::<f32>(tq * dv);
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

/// Cache positions per parallel task of the absorbed scores.
const SCORE_CHUNK: usize = 64;
/// Latent columns per parallel task of the absorbed weighted sum.
const LATENT_CHUNK: usize = 64;

/// Absorbed attention (the decode path), one query token at a time. All heads share one
/// latent per cached token, so each pass reads every cache row once for all heads (not
/// once per head): the scores are split over cache positions, the weighted sum over
/// latent columns, both across threads. Per value the arithmetic is the same fixed
/// sequence whatever the split, so results do not depend on the thread count.
fn absorbed(be: &CpuBackend, args: &MlaAttention<'_, CpuBackend>, seq: &SeqSlice, out: &mut [f32]) {
    let d: MlaDims = args.dims;
    let cache: &CpuCache = args.cache;
    let bs = cache.spec().block_size;
    let (c, dn, dv, h) = (d.kv_lora_rank, d.nope_dim, d.v_dim, d.num_heads);
    let past = seq.context_len - seq.query_len;
    let qd = d.q_head_dim();
    let out_row = h * dv;
    // Scratch of the calling thread: queries in latent space, scores, latent outputs.
    let mut q_lat = take::<f32>(h * c);
    let mut o_lat = take::<f32>(h * c);
    let mut scores = take::<f32>(h * seq.context_len);
    with_elems!(args.kv_b_proj, |kv_b| {
        let w_uk = |head: usize, j: usize| &kv_b[(head * (dn + dv) + j) * c..][..c];
        let w_uv = |head: usize, j: usize| &kv_b[(head * (dn + dv) + dn + j) * c..][..c];
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let q_tok = &args.q[t * h * qd..(t + 1) * h * qd];
            let visible = past + i + 1;
            // q_lat[head] = W_UK[head]ᵀ · q_nope[head]: each query moved into latent space.
            q_lat.par_chunks_mut(c).enumerate().for_each(|(head, ql)| {
                ql.fill(0.0);
                for (j, &qv) in q_tok[head * qd..head * qd + dn].iter().enumerate() {
                    axpy(qv, w_uk(head, j), ql);
                }
                be.round(ql);
            });
            // scores[head, s] = q_lat · c_s + q_pe · k_pe_s, every head per cache row.
            let q_lat_ref: &[f32] = &q_lat;
            let score_ptr = SyncPtr(scores.as_mut_ptr());
            let ctx = seq.context_len;
            (0..visible.div_ceil(SCORE_CHUNK))
                .into_par_iter()
                .for_each(|chunk| {
                    let s1 = ((chunk + 1) * SCORE_CHUNK).min(visible);
                    for s in chunk * SCORE_CHUNK..s1 {
                        let row = cache.row(args.layer, slot(seq, bs, s));
                        for head in 0..h {
                            let q_pe = &q_tok[head * qd + dn..(head + 1) * qd];
                            let raw = dot(&row[..c], &q_lat_ref[head * c..(head + 1) * c])
                                + dot(&row[c..], q_pe);
                            // SAFETY: position s of every head is written by this task only.
                            unsafe {
                                *score_ptr.get().add(head * ctx + s) =
                                    scale_score(be, raw, d.softmax_scale)
                            };
                        }
                    }
                });
            for head in 0..h {
                softmax(be, &mut scores[head * ctx..head * ctx + visible]);
            }
            // o_lat[head] = Σ_s p[head, s] · c_s, split over latent columns.
            let scores_ref: &[f32] = &scores;
            let o_ptr = SyncPtr(o_lat.as_mut_ptr());
            (0..c.div_ceil(LATENT_CHUNK))
                .into_par_iter()
                .for_each(|chunk| {
                    let (c0, c1) = (chunk * LATENT_CHUNK, ((chunk + 1) * LATENT_CHUNK).min(c));
                    for head in 0..h {
                        // SAFETY: columns c0..c1 of every head are written by this task only.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(o_ptr.get().add(head * c + c0), c1 - c0)
                        };
                        dst.fill(0.0);
                    }
                    for s in 0..visible {
                        let row = &cache.row(args.layer, slot(seq, bs, s))[c0..c1];
                        for head in 0..h {
                            let p = scores_ref[head * ctx + s];
                            // SAFETY: as above.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    o_ptr.get().add(head * c + c0),
                                    c1 - c0,
                                )
                            };
                            axpy(p, row, dst);
                        }
                    }
                });
            be.round(&mut o_lat);
            // out[head] = W_UV[head] · o_lat[head].
            out[t * out_row..(t + 1) * out_row]
                .par_chunks_mut(dv)
                .enumerate()
                .for_each(|(head, dst)| {
                    let ol = &o_lat[head * c..(head + 1) * c];
                    for (j, o) in dst.iter_mut().enumerate() {
                        *o = dot(w_uv(head, j), ol);
                    }
                    be.round(dst);
                });
        }
    });
}
