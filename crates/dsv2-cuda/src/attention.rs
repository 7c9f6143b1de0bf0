//! MLA attention over the paged latent cache.
//!
//! Per sequence, like the CPU reference: `AttentionPath::Auto` runs the absorbed
//! formulation for decode sequences (one new token) and the expanded one for prompts;
//! the forced paths run one formulation for every sequence.
//!
//! - Absorbed: `q_lat = W_UK[h]ᵀ q_nope` (batched GEMM over heads), one kernel over the
//!   576-wide cached rows shared by all heads giving `o_lat`, then `W_UV[h] o_lat`
//!   (batched GEMM) into the heads' outputs. The two GEMMs cover every row of the batch;
//!   rows of expanded-path sequences are overwritten by the expanded path, which runs
//!   second.
//! - Expanded: the context latents of the sequences are gathered out of the cache, keys
//!   and values re-derived with one `kv_b_proj` GEMM, then causal MHA per (token, head).

use dsv2_backend::{AttentionPath, CacheSpec, MlaAttention, MlaDims};

use crate::device::{Gemm, Gemv, MLA_DECODE_SMEM, NULL};
use crate::error::{unsupported, Result};
use crate::scratch::{Scratch, Slot};
use crate::{CudaBackend, CudaBuffer, CudaCache, CudaStep};

/// Threads per attention block (warps split the context positions).
const ATTN_THREADS: u32 = 256;
/// Largest latent width and value head width the kernels hold in registers.
const MAX_WIDTH: usize = 512;
/// Keep in step with MAX_WARPS in attention.cu.
const MAX_WARPS: usize = 8;
/// Heads per block of the decode kernel (DEC_HEADS in attention.cu).
const DECODE_HEADS: usize = 16;
/// Query rows per block of the prefill kernel (PF_BLOCK in attention.cu).
const PREFILL_BLOCK: usize = 64;
/// Most context splits per decode token by default, past one token a step
/// (`DSV2_CUDA_DEC_SPLITS` sets it for every step, up to [`SPLITS_LIMIT`]).
const MAX_SPLITS: usize = 32;
/// Most splits `mla_decode_combine` merges (two a lane of one warp).
const SPLITS_LIMIT: usize = 64;
/// Multiprocessors the split count aims to fill (an H100/H200 has 132).
const SMS: usize = 132;

/// Device address of `layer`'s part of the cache.
pub(crate) fn layer_ptr(be: &CudaBackend, cache: &CudaCache, layer: usize) -> u64 {
    let s = cache.spec;
    cache.mem.ptr() + (layer * s.num_blocks * s.block_size * s.width() * be.elem()) as u64
}

/// Checks that the step's slots, block ids and block tables fit the cache.
pub(crate) fn check_step_against_cache(op: &str, step: &CudaStep, spec: &CacheSpec) -> Result<()> {
    let c = &step.counts;
    let slots = spec.num_blocks * spec.block_size;
    if let Some(s) = c.max_slot.filter(|&s| s as usize >= slots) {
        return Err(unsupported(
            op,
            format!("cache slot {s} outside the cache's {slots} slots"),
        ));
    }
    if let Some(b) = c.max_block.filter(|&b| b as usize >= spec.num_blocks) {
        return Err(unsupported(
            op,
            format!("block {b} outside the cache's {} blocks", spec.num_blocks),
        ));
    }
    if let Some((blocks, ctx)) = c
        .tightest_table
        .filter(|&(b, ctx)| b * spec.block_size < ctx)
    {
        return Err(unsupported(
            op,
            format!("a block table of {blocks} blocks cannot hold a context of {ctx} tokens"),
        ));
    }
    Ok(())
}

pub(crate) fn mla_attention(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: MlaAttention<'_, CudaBackend>,
    out: &mut CudaBuffer,
) -> Result<()> {
    check_args(be, &args, out)?;
    let step = args.step;
    let t = step.counts.tokens;
    let c = &step.counts;
    let (absorbed_tokens, expanded): (Option<(u64, usize)>, Option<Expanded>) = match args.path {
        AttentionPath::Absorbed => (Some((NULL, t)), None),
        AttentionPath::Expanded => (
            None,
            Some(Expanded {
                seq_list: NULL,
                seqs: c.seqs,
                tok_list: NULL,
                tokens: t,
                goff: step.at(step.layout.goff_all),
                gathered: c.gathered_all,
                max_ctx: c.max_ctx_all,
                max_qlen: c.max_qlen_all,
            }),
        ),
        AttentionPath::Auto => (
            (c.abs_auto_tokens > 0)
                .then(|| (step.at(step.layout.abs_auto_tokens), c.abs_auto_tokens)),
            (c.exp_auto_seqs > 0).then(|| Expanded {
                seq_list: step.at(step.layout.exp_auto_seqs),
                seqs: c.exp_auto_seqs,
                tok_list: step.at(step.layout.exp_auto_tokens),
                tokens: c.exp_auto_tokens,
                goff: step.at(step.layout.goff_auto),
                gathered: c.gathered_auto,
                max_ctx: c.max_ctx_auto,
                max_qlen: c.max_qlen_auto,
            }),
        ),
    };
    if let Some((list, n)) = absorbed_tokens {
        absorbed(be, scratch, &args, list, n, out, false)?;
    }
    if let Some(e) = expanded {
        expanded_path(be, scratch, &args, &e, out)?;
    }
    Ok(())
}

/// The absorbed decode tokens of a step when they are all its tokens, as (device token
/// list or NULL, count): where `rope_cache_attention` can fuse the absorbed query with
/// the RoPE launch.
pub(crate) fn all_absorbed(args: &MlaAttention<'_, CudaBackend>) -> Option<(u64, usize)> {
    let step = args.step;
    let c = &step.counts;
    match args.path {
        AttentionPath::Absorbed => Some((NULL, c.tokens)),
        AttentionPath::Auto if c.exp_auto_seqs == 0 && c.abs_auto_tokens == c.tokens => {
            Some((step.at(step.layout.abs_auto_tokens), c.tokens))
        }
        _ => None,
    }
    .filter(|&(_, n)| n > 0)
}

/// True when the absorbed query of `t` tokens runs through `absorb_q_small`.
pub(crate) fn small_absorb_applies(be: &CudaBackend, d: &MlaDims, t: usize) -> bool {
    be.dev.gemv_applies(t) && d.kv_lora_rank.is_multiple_of(128) && d.nope_dim.is_multiple_of(16)
}

/// The attention after a fused `rope_absorb_q` launch wrote `q_lat` (scratch `QLat`).
pub(crate) fn absorbed_after_q(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: &MlaAttention<'_, CudaBackend>,
    (tok_list, tokens): (u64, usize),
    out: &mut CudaBuffer,
) -> Result<()> {
    absorbed(be, scratch, args, tok_list, tokens, out, true)
}

/// The checks of `mla_attention`: dims against the cache and `kv_b_proj`, the step
/// against the cache, buffer sizes.
pub(crate) fn check_args(
    be: &CudaBackend,
    args: &MlaAttention<'_, CudaBackend>,
    out: &CudaBuffer,
) -> Result<()> {
    let d = args.dims;
    let spec = args.cache.spec;
    let step = args.step;
    let t = step.counts.tokens;
    let op = "mla_attention";
    if d.kv_lora_rank != spec.kv_lora_rank
        || d.rope_dim != spec.rope_dim
        || args.layer >= spec.num_layers
    {
        return Err(unsupported(
            op,
            format!(
                "dims {d:?} / layer {} do not match the cache {spec:?}",
                args.layer
            ),
        ));
    }
    if d.kv_lora_rank > MAX_WIDTH || d.v_dim > MAX_WIDTH {
        return Err(unsupported(
            op,
            format!(
                "latent width {} / value width {} over the kernels' {MAX_WIDTH}",
                d.kv_lora_rank, d.v_dim
            ),
        ));
    }
    let (kv_rows, kv_cols) = args.kv_b_proj.matrix("kv_b_proj")?;
    if kv_rows != d.num_heads * (d.nope_dim + d.v_dim) || kv_cols != d.kv_lora_rank {
        return Err(unsupported(
            op,
            format!("kv_b_proj is [{kv_rows}, {kv_cols}], dims {d:?}"),
        ));
    }
    check_step_against_cache(op, step, &spec)?;
    be.check_len(op, "queries", args.q, t * d.num_heads * d.q_head_dim())?;
    be.check_len(op, "output", out, t * d.num_heads * d.v_dim)
}

/// Seconds one run of the split-KV decode kernel and its combine takes for the step's
/// decode tokens (`Backend::time_decode_attention`), averaged over `reps` runs timed with
/// events after one untimed run; `None` where that kernel does not run (f32, other
/// widths, no decode tokens).
pub(crate) fn time_decode(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: MlaAttention<'_, CudaBackend>,
    reps: usize,
) -> Result<Option<f64>> {
    let d = args.dims;
    let step = args.step;
    let tokens = step.counts.abs_auto_tokens;
    if !decode_kernel_applies(be, &d) || tokens == 0 || reps == 0 {
        return Ok(None);
    }
    check_step_against_cache("time_decode_attention", step, &args.cache.spec)?;
    be.check_len(
        "time_decode_attention",
        "queries",
        args.q,
        step.counts.tokens * d.num_heads * d.q_head_dim(),
    )?;
    let (h, c) = (d.num_heads, d.kv_lora_rank);
    let e = be.elem();
    let t = step.counts.tokens;
    let q_lat = scratch.get(&be.dev, Slot::QLat, t * h * c * e)?;
    let o_lat = scratch.get(&be.dev, Slot::OLat, t * h * c * e)?;
    let list = step.at(step.layout.abs_auto_tokens);
    absorbed_split(be, scratch, &args, list, tokens, q_lat, o_lat)?;
    let seconds = be.dev.time(|| {
        for _ in 0..reps {
            absorbed_split(be, scratch, &args, list, tokens, q_lat, o_lat)?;
        }
        Ok(())
    })?;
    Ok(Some(seconds / reps as f64))
}

fn absorbed(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: &MlaAttention<'_, CudaBackend>,
    tok_list: u64,
    tokens: usize,
    out: &mut CudaBuffer,
    q_lat_ready: bool,
) -> Result<()> {
    let d = args.dims;
    let step = args.step;
    let t = step.counts.tokens;
    let (h, dn, dv, c, qd) = (
        d.num_heads,
        d.nope_dim,
        d.v_dim,
        d.kv_lora_rank,
        d.q_head_dim(),
    );
    let e = be.elem();
    let q_lat = scratch.get(&be.dev, Slot::QLat, t * h * c * e)?;
    let o_lat = scratch.get(&be.dev, Slot::OLat, t * h * c * e)?;
    let kv_b = args.kv_b_proj.ptr();
    // q_lat[t, h] = W_UK[h]ᵀ q_nope[t, h].
    let small = small_absorb_applies(be, &d, t);
    if q_lat_ready {
        // rope_absorb_q wrote q_lat.
    } else if small {
        be.dev.launch(
            &be.dev.kernels.absorb_q_small,
            "absorbed q_lat",
            (c / 128, h),
            256,
            0,
            &[
                args.q.ptr().into(),
                kv_b.into(),
                q_lat.into(),
                (t as i32).into(),
                (h as i32).into(),
                (qd as i32).into(),
                (dn as i32).into(),
                (dv as i32).into(),
                (c as i32).into(),
            ],
        )?;
    } else {
        // Per head, [C, Dn] · [Dn, T] column-major.
        be.dev.gemm_strided(
            "absorbed q_lat",
            &Gemm {
                trans_a: false,
                trans_b: false,
                m: c,
                n: t,
                k: dn,
                a: kv_b,
                lda: c,
                b: args.q.ptr(),
                ldb: h * qd,
                c: q_lat,
                ldc: h * c,
            },
            [(dn + dv) * c, qd, c],
            h,
        )?;
    }
    if decode_kernel_applies(be, &d) {
        absorbed_split(be, scratch, args, tok_list, tokens, q_lat, o_lat)?;
    } else {
        absorbed_simple(be, args, tok_list, tokens, q_lat, o_lat)?;
    }
    // out[t, h] = W_UV[h] o_lat[t, h].
    if small {
        return be.dev.gemv(
            "absorbed W_UV",
            &Gemv {
                x: o_lat,
                w: kv_b + (dn * c * e) as u64,
                out: out.ptr(),
                rows: t,
                n: dv,
                k: c,
                out_f32: false,
                ldx: h * c,
                ldo: h * dv,
            },
            h,
            [c, (dn + dv) * c, dv],
        );
    }
    // Per head, [Dv, C] · [C, T] column-major.
    be.dev.gemm_strided(
        "absorbed W_UV",
        &Gemm {
            trans_a: true,
            trans_b: false,
            m: dv,
            n: t,
            k: c,
            a: kv_b + (dn * c * e) as u64,
            lda: c,
            b: o_lat,
            ldb: h * c,
            c: out.ptr(),
            ldc: h * dv,
        },
        [(dn + dv) * c, c, dv],
        h,
    )
}

/// True when the split-KV tensor-core decode kernel runs this layer: bf16, sm_80 or
/// newer, a 512-wide latent with a 64-wide RoPE key, heads in groups of 16
/// (`DSV2_CUDA_SIMPLE_ATTENTION=1` forces the simple kernel, for comparisons).
fn decode_kernel_applies(be: &CudaBackend, d: &MlaDims) -> bool {
    be.dev.bf16
        && be.dev.arch.0 >= 8
        && d.kv_lora_rank == 512
        && d.rope_dim == 64
        && d.num_heads.is_multiple_of(DECODE_HEADS)
        && std::env::var("DSV2_CUDA_SIMPLE_ATTENTION").map_or(true, |v| v != "1")
}

/// True when the tensor-core prefill kernel runs the expanded path: bf16, sm_80 or
/// newer, and the head widths of DeepSeek-V2 (`Dn` 128, `Dr` 64, `Dv` 128)
/// (`DSV2_CUDA_SIMPLE_ATTENTION=1` forces the simple kernel).
fn prefill_kernel_applies(be: &CudaBackend, d: &MlaDims) -> bool {
    be.dev.bf16
        && be.dev.arch.0 >= 8
        && d.nope_dim == 128
        && d.rope_dim == 64
        && d.v_dim == 128
        && std::env::var("DSV2_CUDA_SIMPLE_ATTENTION").map_or(true, |v| v != "1")
}

/// The split-KV tensor-core kernel and its combine: `o_lat` of the listed tokens.
fn absorbed_split(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: &MlaAttention<'_, CudaBackend>,
    tok_list: u64,
    tokens: usize,
    q_lat: u64,
    o_lat: u64,
) -> Result<()> {
    let d = args.dims;
    let step = args.step;
    let spec = args.cache.spec;
    let (h, dn, c, qd) = (d.num_heads, d.nope_dim, d.kv_lora_rank, d.q_head_dim());
    let k = &be.dev.kernels;
    // Splits chosen from the token count alone (so that one captured graph serves every
    // context length): about two blocks per multiprocessor.
    let groups = h / DECODE_HEADS;
    // One wave: (tokens * groups * splits) blocks at most 2 per SM (shared memory).
    let splits = (2 * SMS / (tokens * groups)).clamp(1, max_splits(tokens));
    let slots = tokens * splits * groups;
    let part_o = scratch.get(
        &be.dev,
        Slot::AttnPartial,
        slots * DECODE_HEADS * (c + 2) * 4,
    )?;
    let part_ml = part_o + (slots * DECODE_HEADS * c * 4) as u64;
    be.dev.launch(
        &k.mla_decode,
        "mla_decode",
        (tokens, splits * groups),
        128,
        MLA_DECODE_SMEM as u32,
        &[
            args.q.ptr().into(),
            q_lat.into(),
            layer_ptr(be, args.cache, args.layer).into(),
            tok_list.into(),
            step.at(step.layout.tok_seq).into(),
            step.at(step.layout.tok_visible).into(),
            step.at(step.layout.seq_bt_off).into(),
            step.at(step.layout.block_tables).into(),
            part_o.into(),
            part_ml.into(),
            (h as i32).into(),
            (qd as i32).into(),
            (dn as i32).into(),
            (spec.block_size as i32).into(),
            (splits as i32).into(),
            d.softmax_scale.into(),
            step.at(step.layout.seq_ctx).into(),
            step.at(step.layout.seq_qlen).into(),
        ],
    )?;
    be.dev.launch(
        &k.mla_decode_combine,
        "mla_decode_combine",
        (tokens, h * (c / 128)),
        128,
        0,
        &[
            part_o.into(),
            part_ml.into(),
            tok_list.into(),
            o_lat.into(),
            (h as i32).into(),
            (c as i32).into(),
            (splits as i32).into(),
        ],
    )
}

/// Most context splits of each of `tokens` decode tokens: [`SPLITS_LIMIT`] for one token
/// (at context 1K each split then fits one 32-row tile of `mla_decode`, where 32 splits
/// of 33-35 rows took two: 2.19-2.21 against 2.23 ms a V2-Lite batch-1 step on the H200),
/// else [`MAX_SPLITS`]; `DSV2_CUDA_DEC_SPLITS` (1 to [`SPLITS_LIMIT`]) for every step.
fn max_splits(tokens: usize) -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("DSV2_CUDA_DEC_SPLITS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| (1..=SPLITS_LIMIT).contains(s))
    });
    forced.unwrap_or(if tokens == 1 {
        SPLITS_LIMIT
    } else {
        MAX_SPLITS
    })
}

/// The one-block-per-(token, head) absorbed kernel (f32 builds and other shapes).
fn absorbed_simple(
    be: &CudaBackend,
    args: &MlaAttention<'_, CudaBackend>,
    tok_list: u64,
    tokens: usize,
    q_lat: u64,
    o_lat: u64,
) -> Result<()> {
    let d = args.dims;
    let step = args.step;
    let spec = args.cache.spec;
    let (h, dn, c, qd) = (d.num_heads, d.nope_dim, d.kv_lora_rank, d.q_head_dim());
    let k = &be.dev.kernels;
    let smem = (spec.width() + 2 * MAX_WARPS + (ATTN_THREADS as usize / 32) * c) * 4;
    be.dev.launch(
        &k.mla_absorbed,
        "mla_absorbed",
        (tokens, h),
        ATTN_THREADS,
        smem as u32,
        &[
            args.q.ptr().into(),
            q_lat.into(),
            layer_ptr(be, args.cache, args.layer).into(),
            tok_list.into(),
            step.at(step.layout.tok_seq).into(),
            step.at(step.layout.tok_visible).into(),
            step.at(step.layout.seq_bt_off).into(),
            step.at(step.layout.block_tables).into(),
            o_lat.into(),
            (h as i32).into(),
            (qd as i32).into(),
            (dn as i32).into(),
            (c as i32).into(),
            (d.rope_dim as i32).into(),
            (spec.block_size as i32).into(),
            d.softmax_scale.into(),
        ],
    )
}

/// The sequences and tokens the expanded path runs on.
struct Expanded {
    /// Sequence list (NULL: all `seqs`).
    seq_list: u64,
    seqs: usize,
    /// Token list (NULL: all `tokens`).
    tok_list: u64,
    tokens: usize,
    /// Per-sequence row offsets of the gathered context.
    goff: u64,
    gathered: usize,
    max_ctx: usize,
    /// Most new tokens of one of the sequences.
    max_qlen: usize,
}

fn expanded_path(
    be: &CudaBackend,
    scratch: &mut Scratch,
    args: &MlaAttention<'_, CudaBackend>,
    x: &Expanded,
    out: &mut CudaBuffer,
) -> Result<()> {
    let d = args.dims;
    let step = args.step;
    let spec = args.cache.spec;
    let (h, dn, dv, c, dr) = (d.num_heads, d.nope_dim, d.v_dim, d.kv_lora_rank, d.rope_dim);
    let e = be.elem();
    let g = x.gathered;
    let lat = scratch.get(&be.dev, Slot::Latents, g * c * e)?;
    let kpe = scratch.get(&be.dev, Slot::RopeKeys, g * dr * e)?;
    let kv = scratch.get(&be.dev, Slot::ExpandedKv, g * h * (dn + dv) * e)?;
    let k = &be.dev.kernels;
    be.dev.launch(
        &k.gather_context,
        "gather_context",
        (x.max_ctx.div_ceil(8), x.seqs),
        ATTN_THREADS,
        0,
        &[
            crate::attention::layer_ptr(be, args.cache, args.layer).into(),
            x.seq_list.into(),
            step.at(step.layout.seq_ctx).into(),
            step.at(step.layout.seq_bt_off).into(),
            step.at(step.layout.block_tables).into(),
            x.goff.into(),
            lat.into(),
            kpe.into(),
            (c as i32).into(),
            (dr as i32).into(),
            (spec.block_size as i32).into(),
        ],
    )?;
    // [k_nope | v] of every head for every gathered position.
    be.gemm_rows("expanded kv_b_proj", lat, g, args.kv_b_proj, kv, false)?;
    if prefill_kernel_applies(be, &d) {
        return be.dev.launch(
            &k.mla_prefill,
            "mla_prefill",
            (x.max_qlen.div_ceil(PREFILL_BLOCK), x.seqs * h),
            128,
            0,
            &[
                args.q.ptr().into(),
                kv.into(),
                kpe.into(),
                x.seq_list.into(),
                step.at(step.layout.seq_qstart).into(),
                step.at(step.layout.seq_qlen).into(),
                step.at(step.layout.seq_ctx).into(),
                x.goff.into(),
                out.ptr().into(),
                (h as i32).into(),
                d.softmax_scale.into(),
            ],
        );
    }
    let smem = (dn + dr + 2 * MAX_WARPS + (ATTN_THREADS as usize / 32) * dv) * 4;
    be.dev.launch(
        &k.mla_expanded,
        "mla_expanded",
        (x.tokens, h),
        ATTN_THREADS,
        smem as u32,
        &[
            args.q.ptr().into(),
            kv.into(),
            kpe.into(),
            x.tok_list.into(),
            step.at(step.layout.tok_seq).into(),
            step.at(step.layout.tok_visible).into(),
            x.goff.into(),
            out.ptr().into(),
            (h as i32).into(),
            (dn as i32).into(),
            (dr as i32).into(),
            (dv as i32).into(),
            d.softmax_scale.into(),
        ],
    )
}
