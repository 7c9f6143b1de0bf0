//! MLA attention over the paged latent cache, in its two formulations.
//!
//! Both read only the cache: per token `C` normalized latent values and `Dr` rotated
//! RoPE key values. *Expanded* re-derives per-head keys and values with `kv_b_proj` (the
//! prefill path); *absorbed* folds `W_UK` into the query and applies `W_UV` after the
//! weighted sum of latents (the decode path). They are equal up to f32 rounding.

use dsv2_backend::{AttentionPath, MlaAttention, MlaDims, SeqSlice};

use crate::bf16dot;
use crate::flash::{self, CacheElem};
use crate::flash_bf16;
use crate::flash_tiles;
use crate::kernels::{gemm_f32, round_bf16, MatRef, SyncPtr};
use crate::matmul::KindOf;
use crate::mla::{
    absorb_tokens, dots, project_tokens, weighted_sum, weighted_sum_rows, Rows, DOT_TILE,
    SUM_CHUNK, SUM_COLS, SUM_HEADS, TOKENS,
};
use crate::prefill_bf16::{self, Tile};
use crate::qmatmul::PromptRows;
use crate::scratch::{take, take_empty, take_overwritten, Scratch};
use crate::team;
use crate::{with_elems, CacheLayer, CpuBackend, LayerRows, WeightData};

pub(crate) fn mla_attention(be: &CpuBackend, args: MlaAttention<'_, CpuBackend>, out: &mut [f32]) {
    let path = |seq: &SeqSlice| match args.path {
        AttentionPath::Auto if seq.query_len == 1 => AttentionPath::Absorbed,
        AttentionPath::Auto => AttentionPath::Expanded,
        p => p,
    };
    // The absorbed sequences together (a decode batch: one pass over `W_UK` and `W_UV`
    // for all of their tokens), each expanded one on its own; both formulations run on
    // the cache rows in their stored dtype.
    let mut absorbed_seqs = take_empty::<u32>();
    for (i, seq) in args.step.batch.seqs.iter().enumerate() {
        match path(seq) {
            AttentionPath::Absorbed => absorbed_seqs.vec().push(i as u32),
            _ => match args.cache.layer(args.layer) {
                // A q8 prompt whose rows take bf16 activations takes the bf16 attention
                // too (its keys and values rounded to bf16 as they are packed).
                LayerRows::F32(rows)
                    if !be.bf16() && prefill_bf16::available() && be.bf16_prompt(seq) =>
                {
                    expanded_bf16(be, &args, seq, rows, out)
                }
                LayerRows::F32(rows) => expanded(be, &args, seq, rows, out),
                // Over a bf16 cache, in bf16 arithmetic where the CPU has it (f32
                // activations only: bf16 compute keeps the reference's rounding points).
                LayerRows::Bf16(rows) if !be.bf16() && prefill_bf16::available() => {
                    expanded_bf16(be, &args, seq, rows, out)
                }
                LayerRows::Bf16(rows) => expanded(be, &args, seq, rows, out),
            },
        }
    }
    if !absorbed_seqs.is_empty() {
        match args.cache.layer(args.layer) {
            LayerRows::F32(rows) => absorbed(be, &args, &absorbed_seqs, rows, out),
            LayerRows::Bf16(rows) => absorbed(be, &args, &absorbed_seqs, rows, out),
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
    crate::softmax::softmax(scores);
    be.round(scores);
}

/// [`scale_score`] over a row, with the dtype branch outside the loop (so the f32 loop
/// vectorizes: it is a pass over every causal query-key pair of a prefill).
fn scale_scores(be: &CpuBackend, scores: &mut [f32], scale: f32) {
    if be.bf16() {
        scores
            .iter_mut()
            .for_each(|s| *s = round_bf16(round_bf16(*s) * scale));
    } else {
        scores.iter_mut().for_each(|s| *s *= scale);
    }
}

fn scale_score(be: &CpuBackend, raw: f32, scale: f32) -> f32 {
    if be.bf16() {
        round_bf16(round_bf16(raw) * scale)
    } else {
        raw * scale
    }
}

/// The context of an expanded sequence: its cached RoPE keys `k_pe` `[S, Dr]` and its keys
/// and values re-derived from the cached latents, `kv` `[S, H·(Dn + Dv)]` (`kv_b_proj` of
/// the latents: head `h`'s key at columns `h·(Dn + Dv) ..+ Dn`, its value the next `Dv`).
/// With `bf16_product` (the cache is bf16), a bf16 `kv_b_proj` multiplies the latents on
/// `vdpbf16ps` ([`bf16dot`]) where the CPU has it: both operands are bf16 values, so the
/// products are exact either way and only the order of the f32 sums differs.
fn expand_context<E: KindOf>(
    be: &CpuBackend,
    args: &MlaAttention<'_, CpuBackend>,
    seq: &SeqSlice,
    cache: CacheLayer<'_, E>,
    bf16_product: bool,
) -> (Scratch<f32>, Scratch<f32>) {
    let d: MlaDims = args.dims;
    let bs = args.cache.spec().block_size;
    let (c, dr) = (d.kv_lora_rank, d.rope_dim);
    let s_len = seq.context_len;
    let mut latents = take::<f32>(s_len * c);
    let mut k_pe = take::<f32>(s_len * dr);
    for pos in 0..s_len {
        let row = cache.row(slot(seq, bs, pos));
        let widen =
            |dst: &mut [f32], src: &[E]| dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
        widen(&mut latents[pos * c..(pos + 1) * c], &row[..c]);
        widen(&mut k_pe[pos * dr..(pos + 1) * dr], &row[c..]);
    }
    let mut kv = take::<f32>(s_len * d.num_heads * (d.nope_dim + d.v_dim));
    let w = args.kv_b_proj;
    // A prompt chunk's context is prompt work: with the backend's bf16 prompt rows (and
    // a prompt long enough for them) its latents are rounded to bf16 for this product too.
    let prompt = be.bf16_prompt(seq);
    match w.data() {
        WeightData::Bf16(elems) if (bf16_product || prompt) && bf16dot::available() => {
            // The register tiles of q8 prompt rows (unit scales) where they run, at ~1.6×
            // `bf16dot`'s rate for a context of hundreds of rows.
            let (n, k) = (w.rows(), w.cols());
            if crate::q8_bf16::available()
                && k.is_multiple_of(dsv2_core::quant::BLOCK)
                && k <= crate::q8_bf16::BF16_MAX_COLS
            {
                crate::q8_bf16::matmul_bf16(&latents, s_len, &elems[..n * k], n, &mut kv)
            } else {
                bf16dot::matmul(&latents, s_len, elems, n, k, &mut kv)
            }
        }
        // The context of a prompt chunk is prompt work (its rows are not the step's).
        _ => {
            let rows = if prompt {
                PromptRows::All
            } else {
                PromptRows::None
            };
            w.matmul(be, &latents, s_len, rows, &mut kv)
        }
    }
    be.round(&mut kv);
    (kv, k_pe)
}

fn expanded<E: KindOf>(
    be: &CpuBackend,
    args: &MlaAttention<'_, CpuBackend>,
    seq: &SeqSlice,
    cache: CacheLayer<'_, E>,
    out: &mut [f32],
) {
    let d: MlaDims = args.dims;
    let (dr, dn, dv, h) = (d.rope_dim, d.nope_dim, d.v_dim, d.num_heads);
    let s_len = seq.context_len;
    let past = s_len - seq.query_len;
    let (kv, k_pe) = expand_context(be, args, seq, cache, false);
    let kv_w = h * (dn + dv);

    let qd = d.q_head_dim();
    let (tq, q_row) = (seq.query_len, h * qd);
    let q_rows = &args.q[seq.query_start * q_row..(seq.query_start + tq) * q_row];
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_row = h * dv;
    team::for_each(h, |head| {
        fn view(data: &[f32], row_stride: usize, col_stride: usize) -> MatRef<'_> {
            MatRef {
                data,
                row_stride,
                col_stride,
            }
        }
        let head_kv = &kv[head * (dn + dv)..];
        let block = tq.min(QUERY_BLOCK);
        let mut scores = take::<f32>(block * s_len);
        let mut head_out = take::<f32>(block * dv);
        // Blocks of queries, each against the keys its last query sees: the causal mask
        // leaves the rest zero, so they are not computed (half the score and weighted-sum
        // work of a one-chunk prompt), and the scores take a block's rows, not the prompt's.
        for i0 in (0..tq).step_by(QUERY_BLOCK) {
            let bq = (tq - i0).min(QUERY_BLOCK);
            let keys = past + i0 + bq;
            let q_head = &q_rows[i0 * q_row + head * qd..];
            let scores = &mut scores[..bq * keys];
            // scores[bq, keys] = q_nope · k_noneᵀ + q_pe · k_peᵀ (keys read transposed).
            gemm_f32(
                bq,
                keys,
                dn,
                view(q_head, q_row, 1),
                view(head_kv, 1, kv_w),
                scores,
                keys,
                false,
            );
            gemm_f32(
                bq,
                keys,
                dr,
                view(&q_head[dn..], q_row, 1),
                view(&k_pe, 1, dr),
                scores,
                keys,
                true,
            );
            // Scale, causal mask (query i0 + i sees positions ..= past + i0 + i), softmax.
            for (i, row) in scores.chunks_mut(keys).enumerate() {
                let visible = past + i0 + i + 1;
                scale_scores(be, &mut row[..visible], d.softmax_scale);
                softmax(be, &mut row[..visible]);
                row[visible..].fill(0.0);
            }
            // out[bq, Dv] = probs · v
            let head_out = &mut head_out[..bq * dv];
            gemm_f32(
                bq,
                dv,
                keys,
                view(scores, keys, 1),
                view(&head_kv[dn..], kv_w, 1),
                head_out,
                dv,
                false,
            );
            be.round(head_out);
            for (i, row) in head_out.chunks(dv).enumerate() {
                let t = seq.query_start + i0 + i;
                // SAFETY: row t, head `head` is written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * out_row + head * dv), dv)
                };
                dst.copy_from_slice(row);
            }
        }
    });
}

/// Queries per block of the expanded attention.
const QUERY_BLOCK: usize = 256;

/// [`expanded`] with both products in bf16 arithmetic ([`crate::prefill_bf16`]): each
/// head's keys (`[k_nope | k_pe]`) and values packed once in bf16 pairs, its queries in
/// blocks of [`QUERY_BLOCK`], each block's scores in tiles of
/// [`prefill_bf16::tile_rows`] queries (6 in AVX-512 registers, 32 on AMX tiles) ×
/// [`TILE_COLS`] keys up to the last key the tile's last query sees, the softmax in f32,
/// the probabilities rounded to bf16 for the weighted sum of values. Per value the
/// arithmetic is one fixed sequence, so the result does not depend on the thread count.
fn expanded_bf16<E: KindOf>(
    be: &CpuBackend,
    args: &MlaAttention<'_, CpuBackend>,
    seq: &SeqSlice,
    cache: CacheLayer<'_, E>,
    out: &mut [f32],
) {
    let d: MlaDims = args.dims;
    let (dr, dn, dv, h) = (d.rope_dim, d.nope_dim, d.v_dim, d.num_heads);
    let s_len = seq.context_len;
    let past = s_len - seq.query_len;
    let (kv, k_pe) = expand_context(be, args, seq, cache, true);
    let kv_w = h * (dn + dv);
    let qd = d.q_head_dim();
    let (tq, q_row) = (seq.query_len, h * qd);
    let q_rows = &args.q[seq.query_start * q_row..(seq.query_start + tq) * q_row];
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_row = h * dv;
    // Pairs of a query (and of a key), of a row of probabilities (padded to whole tiles
    // of 16 pairs on the AMX tiles), and the rows of one tile.
    let (q_pairs, p_pairs) = (
        prefill_bf16::padded_pairs(qd.div_ceil(2)),
        prefill_bf16::padded_pairs(s_len.div_ceil(2)),
    );
    let tile_rows = prefill_bf16::tile_rows();
    let (key_cols, v_cols) = (
        prefill_bf16::padded_cols(s_len),
        prefill_bf16::padded_cols(dv),
    );
    team::for_each(h, |head| {
        let head_kv = &kv[head * (dn + dv)..];
        // The head's keys `[k_nope | k_pe]`, a row a position, packed as the columns of
        // the scores' (Dn + Dr) × S operand; its values, the weighted sum's S × Dv.
        let mut key_rows = take::<f32>(s_len * qd);
        for (j, row) in key_rows.chunks_exact_mut(qd).enumerate() {
            row[..dn].copy_from_slice(&head_kv[j * kv_w..][..dn]);
            row[dn..].copy_from_slice(&k_pe[j * dr..][..dr]);
        }
        let mut keys = take::<u32>(prefill_bf16::packed_len(qd, s_len));
        prefill_bf16::pack_cols(qd, s_len, |j| &key_rows[j * qd..], &mut keys);
        drop(key_rows);
        let mut values = take::<u32>(prefill_bf16::packed_len(s_len, dv));
        prefill_bf16::pack_rows(s_len, dv, |j| &head_kv[j * kv_w + dn..], &mut values);
        let block = tq.min(QUERY_BLOCK).next_multiple_of(tile_rows);
        let mut queries = take::<u32>(block * q_pairs);
        let mut scores = take::<f32>(block * key_cols);
        let mut probs = take::<u32>(block * p_pairs);
        let mut head_out = take::<f32>(block * v_cols);
        for i0 in (0..tq).step_by(QUERY_BLOCK) {
            let bq = (tq - i0).min(QUERY_BLOCK);
            for i in 0..bq {
                let q = &q_rows[(i0 + i) * q_row + head * qd..][..qd];
                prefill_bf16::pairs_of(q, &mut queries[i * q_pairs..(i + 1) * q_pairs]);
            }
            // Keys visible to the block's query i: past + i0 + i + 1.
            let visible = |i: usize| past + i0 + i + 1;
            for r0 in (0..bq).step_by(tile_rows) {
                let rows = (bq - r0).min(tile_rows);
                let seen = visible(r0 + rows - 1);
                prefill_bf16::tile_padded(
                    Tile {
                        a: &queries[r0 * q_pairs..],
                        a_stride: q_pairs,
                        rows,
                        kk_end: q_pairs,
                        b: &keys,
                        kp: q_pairs,
                        col_end: prefill_bf16::padded_cols(seen),
                        c_stride: key_cols,
                    },
                    &mut scores[r0 * key_cols..],
                );
            }
            // Scale, causal mask, softmax in f32; the probabilities in bf16 pairs, zero past
            // the query's last key up to its tile's.
            for i in 0..bq {
                let seen = visible(i);
                let row = &mut scores[i * key_cols..][..seen];
                scale_scores(be, row, d.softmax_scale);
                softmax(be, row);
                let tile_end = visible(((i / tile_rows + 1) * tile_rows).min(bq) - 1);
                let pairs = prefill_bf16::padded_pairs(tile_end.div_ceil(2));
                prefill_bf16::pairs_of(row, &mut probs[i * p_pairs..][..pairs]);
            }
            for r0 in (0..bq).step_by(tile_rows) {
                let rows = (bq - r0).min(tile_rows);
                prefill_bf16::tile_padded(
                    Tile {
                        a: &probs[r0 * p_pairs..],
                        a_stride: p_pairs,
                        rows,
                        kk_end: visible(r0 + rows - 1).div_ceil(2),
                        b: &values,
                        kp: p_pairs,
                        col_end: v_cols,
                        c_stride: v_cols,
                    },
                    &mut head_out[r0 * v_cols..],
                );
            }
            for i in 0..bq {
                let t = seq.query_start + i0 + i;
                // SAFETY: row t, head `head` is written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * out_row + head * dv), dv)
                };
                dst.copy_from_slice(&head_out[i * v_cols..][..dv]);
            }
        }
    });
}

/// Cache positions per parallel task of the absorbed scores.
const SCORE_CHUNK: usize = 64;

/// Absorbed attention (the decode path) for the sequences `seq_ids` of the step. Every
/// query token's `W_UK` absorption, and every token's `W_UV` projection, run in one
/// parallel loop over the heads for all of the step's tokens (each head's matrices read
/// from memory once a step, not once a token: at batch 8 that was 8 × 4 MB a V2-Lite
/// layer, 8 × 34 MB a V2 one). In between, the attention over the cache, where all heads
/// share one latent per cached token, so each cache row is read once for all heads:
///
/// - in f32 ([`attend_one_pass`], [`crate::flash`]): every token's positions in chunks
///   that are scored, exponentiated and summed while in the core's cache, with a running
///   softmax; one parallel loop over every token's tasks, one to combine them; over a
///   bf16 cache on a CPU with AVX-512 BF16, the same in bf16 arithmetic
///   ([`crate::flash_bf16`]);
/// - in bf16 ([`attend`], which rounds scores and probabilities where the reference
///   does), one query token at a time in two passes: the scores split over cache
///   positions in register tiles of 4 heads × 4 rows, each head's softmax on its own,
///   and the weighted sum split over latent columns in tiles of 8 heads × 32 columns up
///   to [`SUM_CHUNK`] positions, over chunks of that many positions beyond (each chunk's
///   rows read once, in order, by all tiles; the chunks' sums added in order)
///   ([`crate::mla`]).
///
/// Per value the arithmetic is the same fixed sequence whatever the split or the batch,
/// so results do not depend on the thread count or on the other sequences.
fn absorbed<E: KindOf + CacheElem>(
    be: &CpuBackend,
    args: &MlaAttention<'_, CpuBackend>,
    seq_ids: &[u32],
    cache: CacheLayer<'_, E>,
    out: &mut [f32],
) {
    let d: MlaDims = args.dims;
    let bs = args.cache.spec().block_size;
    let (c, dr, dn, dv, h) = (d.kv_lora_rank, d.rope_dim, d.nope_dim, d.v_dim, d.num_heads);
    let qd = d.q_head_dim();
    let out_row = h * dv;
    // Width of a cache row and of a query in latent space: [latent c | RoPE key dr].
    let w = c + dr;
    let seqs = &args.step.batch.seqs;
    // The query tokens, in order: their rows of the batch.
    let mut tokens = take_empty::<u32>();
    let mut longest = 0;
    for &i in seq_ids {
        let seq = &seqs[i as usize];
        tokens
            .vec()
            .extend((seq.query_start..seq.query_start + seq.query_len).map(|t| t as u32));
        longest = longest.max(seq.context_len);
    }
    let n_tok = tokens.len();
    // Scratch of the calling thread: queries in latent space and latent outputs of every
    // token, one token's scores.
    let mut q_cat = take_overwritten::<f32>(n_tok * h * w);
    let mut o_lat = take_overwritten::<f32>(n_tok * h * c);
    // One token's scores, for the two-pass (bf16) attention only.
    let mut scores = take::<f32>(if be.bf16() { h * longest } else { 0 });
    with_elems!(args.kv_b_proj, |kv_b| {
        // W_UK[head]: rows head·(dn + dv) .. + dn; W_UV[head]: the next dv rows.
        let w_uk = |head: usize| &kv_b[head * (dn + dv) * c..][..dn * c];
        let w_uv = |head: usize| &kv_b[(head * (dn + dv) + dn) * c..][..dv * c];
        // q_cat[k, head] = [W_UK[head]ᵀ · q_nope[head] | q_pe[head]] for every token k:
        // each query moved into latent space, beside its RoPE part.
        // Up to TOKENS tokens at a time against each head's matrix.
        let q_cat_ptr = SyncPtr(q_cat.as_mut_ptr());
        team::for_each(h, |head| {
            let q_of = |k: usize| &args.q[tokens[k] as usize * h * qd + head * qd..][..qd];
            let lat = |k: usize| q_cat_ptr.get().wrapping_add((k * h + head) * w);
            for k0 in (0..n_tok).step_by(TOKENS) {
                let n = (n_tok - k0).min(TOKENS);
                let q = std::array::from_fn(|i| &q_of(k0 + i.min(n - 1))[..dn]);
                // SAFETY: the first c values of token k's head `head` in q_cat, written
                // by this task only.
                unsafe {
                    absorb_tokens(
                        q,
                        n,
                        w_uk(head),
                        c,
                        std::array::from_fn(|i| lat(k0 + i.min(n - 1))),
                    )
                };
            }
            for k in 0..n_tok {
                // SAFETY: token k's head `head` is written by this task only.
                let qc = unsafe { std::slice::from_raw_parts_mut(lat(k), w) };
                let (ql, qp) = qc.split_at_mut(c);
                be.round(ql);
                qp.copy_from_slice(&q_of(k)[dn..]);
            }
        });
        if be.bf16() {
            let mut k = 0;
            for &i in seq_ids {
                let seq = &seqs[i as usize];
                let past = seq.context_len - seq.query_len;
                let row = |s: usize| &cache.row(slot(seq, bs, s))[..w];
                let blocks = Rows {
                    block: |b: usize| cache.block_rows(seq.block_table[b] as usize),
                    block_size: bs,
                    width: args.cache.spec().width(),
                };
                for i in 0..seq.query_len {
                    let visible = past + i + 1;
                    let q_tok = &q_cat[k * h * w..(k + 1) * h * w];
                    let o_tok = &mut o_lat[k * h * c..(k + 1) * h * c];
                    attend(
                        be,
                        &d,
                        q_tok,
                        visible,
                        seq.context_len,
                        &row,
                        &blocks,
                        &mut scores,
                        o_tok,
                    );
                    k += 1;
                }
            }
        } else {
            attend_one_pass(&d, seq_ids, seqs, bs, &cache, &q_cat, &mut o_lat);
        }
        // out[t, head] = W_UV[head] · o_lat[k, head] for every token k (row t).
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let o_lat: &[f32] = &o_lat;
        team::for_each(h, |head| {
            let dst = |k: usize| {
                out_ptr
                    .get()
                    .wrapping_add(tokens[k] as usize * out_row + head * dv)
            };
            for k0 in (0..n_tok).step_by(TOKENS) {
                let n = (n_tok - k0).min(TOKENS);
                let x =
                    std::array::from_fn(|i| &o_lat[((k0 + i.min(n - 1)) * h + head) * c..][..c]);
                // SAFETY: the dv values of row t's head `head`, written by this task only.
                unsafe {
                    project_tokens(
                        w_uv(head),
                        dv,
                        x,
                        n,
                        std::array::from_fn(|i| dst(k0 + i.min(n - 1))),
                    )
                };
            }
            for k in 0..n_tok {
                // SAFETY: as above.
                be.round(unsafe { std::slice::from_raw_parts_mut(dst(k), dv) });
            }
        });
    });
}

/// Every query token's attention over its visible cached positions in one pass over
/// the cache ([`crate::flash`]): `q_cat` `[tokens, h, c + dr]` in latent space (tokens in
/// `seq_ids` order) into `o_lat` `[tokens, h, c]`. One parallel loop runs the tasks of
/// every token (whole chunks of a token's positions, split by its own length; with few
/// tasks, each task's head groups split too), a second combines each token's tasks.
fn attend_one_pass<E: KindOf + CacheElem>(
    d: &MlaDims,
    seq_ids: &[u32],
    seqs: &[SeqSlice],
    bs: usize,
    cache: &CacheLayer<'_, E>,
    q_cat: &[f32],
    o_lat: &mut [f32],
) {
    let (c, h) = (d.kv_lora_rank, d.num_heads);
    let w = c + d.rope_dim;
    let shape = flash::Shape {
        h,
        c,
        w,
        scale: d.softmax_scale,
    };
    // Per token k: its sequence, visible positions, chunks per task, and its first task.
    let mut token_seq = take_empty::<u32>();
    let mut token_visible = take_empty::<u32>();
    let mut token_per = take_empty::<u32>();
    let mut task_at = take_empty::<u32>();
    task_at.vec().push(0);
    for &i in seq_ids {
        let seq = &seqs[i as usize];
        let past = seq.context_len - seq.query_len;
        for t in 0..seq.query_len {
            let visible = past + t + 1;
            let (per, tasks) = flash::split(visible, h, c, w);
            token_seq.vec().push(i);
            token_visible.vec().push(visible as u32);
            token_per.vec().push(per as u32);
            let last = task_at[task_at.len() - 1];
            task_at.vec().push(last + tasks as u32);
        }
    }
    let n_tok = token_seq.len();
    let total = task_at[n_tok] as usize;
    let mut task_token = take_empty::<u32>();
    for k in 0..n_tok {
        let n = (task_at[k + 1] - task_at[k]) as usize;
        task_token.vec().extend(std::iter::repeat_n(k as u32, n));
    }
    // With fewer tasks than two per thread, each task's head groups also split over
    // tasks (V2's 128 heads are 8 groups; a head's arithmetic is the same either way).
    let groups = flash::groups(h);
    let splits = (2 * team::threads()).div_ceil(total).clamp(1, groups);
    let split_groups = |s: usize| s * groups / splits..(s + 1) * groups / splits;
    // Over a bf16 cache on a CPU with AVX-512 BF16 that keeps pace with its FMAs the
    // attention runs in bf16 arithmetic (`flash_bf16`: the query and probabilities rounded
    // to bf16 as the cache is); elsewhere in f32, the rows widened in the registers.
    // On a CPU with AMX tiles the same bf16 arithmetic runs there (`flash_tiles`), in
    // the tile unit's sums.
    let on_tiles = E::BF16 && flash_tiles::available() && flash_tiles::fits(shape, bs);
    let bf16_math = E::BF16 && (on_tiles || flash_bf16::keeps_pace());
    // Each token's query with its heads in vector lanes, a group at a time (in bf16
    // pairs for the bf16 arithmetic).
    let q_len = flash::query_len(h, w);
    let q16_len = flash_bf16::query_len(h, w);
    let mut qt = take_overwritten::<f32>(if bf16_math { 0 } else { n_tok * q_len });
    let mut qt16 = take_overwritten::<u32>(if bf16_math { n_tok * q16_len } else { 0 });
    if bf16_math {
        let group_q = flash_bf16::pairs(w) * flash::GROUP;
        team::for_each_chunk_mut(&mut qt16, group_q, |i, dst| {
            let (k, g) = (i / groups, i % groups);
            flash_bf16::transpose_group(&q_cat[k * h * w..][..h * w], h, w, g, dst)
        });
    } else {
        team::for_each_chunk_mut(&mut qt, w * flash::GROUP, |i, dst| {
            let (k, g) = (i / groups, i % groups);
            flash::transpose_group(&q_cat[k * h * w..][..h * w], h, w, g, dst)
        });
    }
    let (state_len, group_state) = (flash::state_len(h, c), flash::group_state_len(c));
    let mut states = take_overwritten::<f32>(total * state_len);
    let states_ptr = SyncPtr(states.as_mut_ptr());
    // Each task's fold scratch, taken here rather than from the pool of whichever thread
    // claims the task: on many threads a thread may claim its first attention task only
    // in a later step, and would allocate there.
    let scratch_len = if on_tiles {
        flash_tiles::scratch_len(h, w)
    } else if bf16_math {
        flash_bf16::scratch_len(h)
    } else {
        flash::scratch_len(h)
    };
    // (The tiles' fold writes all of its scratch before reading it.)
    let mut scratches = if on_tiles {
        take_overwritten::<f32>(total * splits * scratch_len)
    } else {
        take::<f32>(total * splits * scratch_len)
    };
    let scratches_ptr = SyncPtr(scratches.as_mut_ptr());
    let (qt, qt16): (&[f32], &[u32]) = (&qt, &qt16);
    team::for_each(total * splits, |i| {
        let (task, part) = (i / splits, i % splits);
        let groups = split_groups(part);
        // SAFETY: task `task`'s states of groups `groups`, written by this call only.
        let state = unsafe {
            std::slice::from_raw_parts_mut(
                states_ptr
                    .get()
                    .add(task * state_len + groups.start * group_state),
                groups.len() * group_state,
            )
        };
        let k = task_token[task] as usize;
        let seq = &seqs[token_seq[k] as usize];
        let visible = token_visible[k] as usize;
        let per = token_per[k] as usize;
        let first = (task - task_at[k] as usize) * per * flash::CHUNK_ROWS;
        let end = (first + per * flash::CHUNK_ROWS).min(visible);
        flash::reset_state(state, c);
        // The thread's tiles, configured for this task's chunks.
        let task_tiles = on_tiles.then(flash_tiles::TaskTiles::start);
        // SAFETY: task-part `i`'s scratch, used by this call only.
        let scratch = unsafe {
            std::slice::from_raw_parts_mut(scratches_ptr.get().add(i * scratch_len), scratch_len)
        };
        for s0 in (first..end).step_by(flash::CHUNK_ROWS) {
            let n = (end - s0).min(flash::CHUNK_ROWS);
            let cached = |j: usize| &cache.row(slot(seq, bs, s0 + j))[..w];
            // The chunk's rows as stored (a bf16 row is widened in the kernel's registers).
            let mut rows: [&[E]; flash::CHUNK_ROWS] = [&[]; flash::CHUNK_ROWS];
            for (j, r) in rows.iter_mut().enumerate().take(n) {
                *r = cached(j);
            }
            // The task's next chunk, as stored, to prefetch meanwhile.
            let mut next: [&[u8]; flash::CHUNK_ROWS] = [&[]; flash::CHUNK_ROWS];
            let next_n = (end - s0 - n).min(flash::CHUNK_ROWS);
            for (j, r) in next.iter_mut().enumerate().take(next_n) {
                let row = cached(n + j);
                // SAFETY: the bytes of `w` cached values.
                *r = unsafe {
                    std::slice::from_raw_parts(
                        row.as_ptr() as *const u8,
                        std::mem::size_of_val(row),
                    )
                };
            }
            if bf16_math {
                // SAFETY: E is bf16 (E::BF16), so each row is a slice of bf16 values.
                let rows =
                    unsafe { std::slice::from_raw_parts(rows.as_ptr() as *const &[half::bf16], n) };
                let (qt16, next) = (&qt16[k * q16_len..][..q16_len], &next[..next_n]);
                match &task_tiles {
                    Some(tiles) => flash_tiles::fold_chunk_amx(
                        tiles,
                        shape,
                        groups.clone(),
                        qt16,
                        rows,
                        next,
                        state,
                        scratch,
                    ),
                    None => flash_bf16::fold_chunk(
                        shape,
                        groups.clone(),
                        qt16,
                        rows,
                        next,
                        state,
                        scratch,
                    ),
                }
            } else {
                flash::fold_chunk(
                    shape,
                    groups.clone(),
                    &qt[k * q_len..][..q_len],
                    &rows[..n],
                    &next[..next_n],
                    state,
                    scratch,
                );
            }
        }
    });
    let states: &[f32] = &states;
    let out_ptr = SyncPtr(o_lat.as_mut_ptr());
    // Each token's heads combined in parts, two or more a thread (a lone token's 13 task
    // states at 4K, V2-Lite's 16 heads, took one thread 33 µs a layer).
    let head_parts = (2 * team::threads()).div_ceil(n_tok).clamp(1, h);
    team::for_each(n_tok * head_parts, |i| {
        let (k, part) = (i / head_parts, i % head_parts);
        let heads = part * h / head_parts..(part + 1) * h / head_parts;
        // SAFETY: token k's latent outputs of heads `heads`, written by this call only.
        let out = unsafe {
            std::slice::from_raw_parts_mut(
                out_ptr.get().add((k * h + heads.start) * c),
                heads.len() * c,
            )
        };
        let (t0, t1) = (task_at[k] as usize, task_at[k + 1] as usize);
        flash::combine(
            &states[t0 * state_len..t1 * state_len],
            t1 - t0,
            h,
            c,
            heads,
            out,
        );
    });
}

/// One query token's absorbed attention over its `visible` cached positions: `q_cat`
/// (`[h, c + dr]`, in latent space) against the cache rows, into the latent outputs
/// `o_lat` (`[h, c]`, rounded). `scores` holds at least `h · ctx` values.
#[allow(clippy::too_many_arguments)]
fn attend<'r, E: KindOf, B: Fn(usize) -> &'r [E] + Sync>(
    be: &CpuBackend,
    d: &MlaDims,
    q_cat: &[f32],
    visible: usize,
    ctx: usize,
    row: &(impl Fn(usize) -> &'r [E] + Sync),
    blocks: &Rows<B>,
    scores: &mut [f32],
    o_lat: &mut [f32],
) {
    let (c, dr, h) = (d.kv_lora_rank, d.rope_dim, d.num_heads);
    let w = c + dr;
    // scores[head, s] = q_cat[head] · cache row s, tiles of 4 heads × 4 rows.
    let q_head = |head: usize| &q_cat[head * w..(head + 1) * w];
    let score_ptr = SyncPtr(scores.as_mut_ptr());
    team::for_each(visible.div_ceil(SCORE_CHUNK), |chunk| {
        let s1 = ((chunk + 1) * SCORE_CHUNK).min(visible);
        for s0 in (chunk * SCORE_CHUNK..s1).step_by(DOT_TILE) {
            let nr = (s1 - s0).min(DOT_TILE);
            let rows = std::array::from_fn(|j| row(s0 + j.min(nr - 1)));
            for h0 in (0..h).step_by(DOT_TILE) {
                let nq = (h - h0).min(DOT_TILE);
                let qs = std::array::from_fn(|i| q_head(h0 + i.min(nq - 1)));
                let tile = dots(qs, nq, rows, nr);
                for (a, tile_row) in tile.iter().enumerate().take(nq) {
                    for (b, &raw) in tile_row.iter().enumerate().take(nr) {
                        // SAFETY: positions s0..s0 + nr of every head are written by
                        // this task only.
                        unsafe {
                            *score_ptr.get().add((h0 + a) * ctx + s0 + b) =
                                scale_score(be, raw, d.softmax_scale)
                        };
                    }
                }
            }
        }
    });
    // Each head's softmax on its own (16 heads × 4K positions: ~200 µs serially).
    team::for_each_chunk_mut(&mut scores[..h * ctx], ctx, |_, row| {
        softmax(be, &mut row[..visible])
    });
    // o_lat[head] = Σ_s p[head, s] · c_s, tiles of 8 heads × 32 latent columns, split
    // over the columns.
    let scores_ref: &[f32] = scores;
    let o_ptr = SyncPtr(o_lat.as_mut_ptr());
    if visible <= SUM_CHUNK {
        team::for_each(c.div_ceil(SUM_COLS), |chunk| {
            let cols = chunk * SUM_COLS..((chunk + 1) * SUM_COLS).min(c);
            let mut tile = [[0.0f32; SUM_COLS]; SUM_HEADS];
            for h0 in (0..h).step_by(SUM_HEADS) {
                let nh = (h - h0).min(SUM_HEADS);
                let p = std::array::from_fn(|a| {
                    let head = h0 + a.min(nh - 1);
                    &scores_ref[head * ctx..head * ctx + visible]
                });
                weighted_sum(p, nh, visible, blocks, cols.clone(), &mut tile);
                for (a, values) in tile.iter().enumerate().take(nh) {
                    // SAFETY: columns `cols` of every head are written by this task only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            o_ptr.get().add((h0 + a) * c + cols.start),
                            cols.len(),
                        )
                    };
                    dst.copy_from_slice(&values[..cols.len()]);
                }
            }
        });
    } else {
        // Long contexts: chunks of SUM_CHUNK positions, each summed over all heads and
        // columns reading its rows in order, then added in chunk order.
        let chunks = visible.div_ceil(SUM_CHUNK);
        let mut partial = take::<f32>(chunks * h * c);
        team::for_each_chunk_mut(&mut partial, h * c, |k, part| {
            let range = k * SUM_CHUNK..((k + 1) * SUM_CHUNK).min(visible);
            weighted_sum_rows(scores_ref, ctx, h, range, blocks, c, part);
        });
        let partial: &[f32] = &partial;
        team::for_each_chunk_mut(o_lat, c, |head, dst| {
            dst.copy_from_slice(&partial[head * c..(head + 1) * c]);
            for k in 1..chunks {
                let part = &partial[(k * h + head) * c..][..c];
                dst.iter_mut().zip(part).for_each(|(d, v)| *d += v);
            }
        });
    }
    be.round(o_lat);
}
