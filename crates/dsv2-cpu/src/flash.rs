//! One-pass ("flash-decoding") absorbed attention of decode tokens over the latent cache.
//!
//! The two-pass kernels of [`crate::mla`] score every cached row, take each head's
//! softmax, then read every row again for the weighted sum; their score tile (4 heads × 4
//! rows) ends in 16 horizontal sums. At 4K cached tokens and 8 sequences that ran at ~70
//! G multiply-adds/s on this 2-core VM (~26% of the f32 FMA peak, 43% of a decode step).
//! Here a token's positions are taken in chunks of [`CHUNK_ROWS`] rows, each scored,
//! exponentiated and summed while it sits in the core's cache, with the softmax carried
//! across chunks by a running maximum (the online softmax of flash attention):
//!
//! - the query is transposed once per token so that a group of [`GROUP`] heads fills the
//!   lanes of one vector: a score tile is [`SCORE_ROWS`] rows × 16 heads, one fused
//!   multiply-add per (row, position) with the row's value broadcast, and no horizontal
//!   sum;
//! - the weighted sum runs in tiles of 8 heads × 32 latent columns over the chunk's rows.
//!
//! The arithmetic of every value is one fixed sequence, whatever the instruction set, the
//! thread count or the other sequences of the batch (the code is written once over
//! arrays of lanes and compiled per instruction set; tested bit for bit):
//! - a score is `Σ_blocks (Σ_k q_k·x_k)` with a chain of fused multiply-adds from 0 over
//!   each block of [`K_BLOCK`] positions `k`, the blocks added in order, then `· scale`;
//! - per chunk and head: `m' = max(m, scores)`, `α = e^(m − m')`, `p = e^(s − m')`,
//!   `l' = l·α + Σ p` (the sum in row order), `o' = o·α + Σ p·x` (one chain of fused
//!   multiply-adds from 0 in row order per output, then a fused multiply-add with `o`);
//! - a token's positions split into tasks of whole chunks by its own length only
//!   ([`split`]); the tasks' states are combined in order:
//!   `out = (Σ_t e^(m_t − M)·o_t) / (Σ_t e^(m_t − M)·l_t)`, `M = max_t m_t`;
//! - each head's values depend on nothing but its own query and the rows, so a task's
//!   head groups may be split over calls (the attention does so when a step has fewer
//!   tasks than threads: V2's 128 heads are 8 groups).
//!
//! Cache rows are f32 or bf16 ([`CacheElem`]); bf16 values are widened to f32 in the
//! registers as they are read (exactly: a shift), so a bf16 cache gives the same arithmetic
//! as its rows widened first, reading half the bytes and writing no widened copy.
//!
//! It differs from the two-pass softmax only by rounding (tested against it). The
//! bf16-compute path keeps the two-pass kernels: they round scores and probabilities to
//! bf16 where the reference does, which a running sum cannot.

use std::ops::Range;

use half::bf16;

use crate::exp::exp_portable;
use crate::kernels::fma;
use crate::kernels::Elem;
use crate::mla::{isa, Isa};

/// A value type of the latent cache the one-pass attention reads directly: f32, or bf16
/// widened in the registers.
pub(crate) trait CacheElem: Elem {
    /// Whether the value is a bf16 (the upper half of an f32).
    const BF16: bool;
}

impl CacheElem for f32 {
    const BF16: bool = false;
}

impl CacheElem for bf16 {
    const BF16: bool = true;
}

/// Heads per group: the lanes of one 512-bit vector.
pub(crate) const GROUP: usize = 16;
/// Cache rows per chunk: scored and summed while they sit in the core's cache (64 V2-Lite
/// rows of 576 f32 values are 147 KB).
pub(crate) const CHUNK_ROWS: usize = 64;
/// Cache rows of a score tile (one accumulator vector each, plus one per block sum).
const SCORE_ROWS: usize = 8;
/// Positions per block of a score's dot product.
const K_BLOCK: usize = 64;
/// Heads of a weighted-sum tile.
const SUM_HEADS: usize = 8;
/// Latent columns of a weighted-sum tile.
const SUM_COLS: usize = 32;
/// Fewest chunks per task.
const MIN_TASK_CHUNKS: usize = 2;
/// Most tasks per token (16 are enough for this machine's threads at 1K positions; a
/// V2 token's 16 states are 4 MB).
const MAX_TASKS: usize = 16;

/// Head groups of `h` heads.
pub(crate) fn groups(h: usize) -> usize {
    h.div_ceil(GROUP)
}

/// Floats of one head group's state: the running max of each of its [`GROUP`] lanes,
/// their running sums, then each lane's `c` weighted sums (lanes past the last head are
/// padding).
pub(crate) fn group_state_len(c: usize) -> usize {
    2 * GROUP + GROUP * c
}

/// Floats of one task's state: its head groups' states, one after the other (so tasks
/// that take different groups of one token's positions write disjoint ranges).
pub(crate) fn state_len(h: usize, c: usize) -> usize {
    groups(h) * group_state_len(c)
}

/// Floats of the transposed query of one token (its groups, [`transpose_group`]).
pub(crate) fn query_len(h: usize, w: usize) -> usize {
    groups(h) * w * GROUP
}

/// Floats of a task's scratch for [`fold_chunk`]: one chunk's scores of every group.
pub(crate) fn scratch_len(h: usize) -> usize {
    groups(h) * CHUNK_ROWS * GROUP
}

/// How a token's `visible` positions split into tasks: `(chunks per task, tasks)`. A
/// task reads at least [`MIN_TASK_CHUNKS`] chunks and 4× its state's bytes of cache
/// rows (its state, `h · c` floats, is written and read back once): V2-Lite 2 chunks,
/// V2 (128 heads) 8. It depends only on the token's own length and the model's shape, so
/// a token's result is the same in any batch and on any number of threads.
pub(crate) fn split(visible: usize, h: usize, c: usize, w: usize) -> (usize, usize) {
    let chunks = visible.div_ceil(CHUNK_ROWS).max(1);
    let min_per = MIN_TASK_CHUNKS.max((4 * h * c).div_ceil(CHUNK_ROWS * w));
    let tasks = (chunks / min_per).clamp(1, MAX_TASKS);
    let per = chunks.div_ceil(tasks);
    (per, chunks.div_ceil(per))
}

/// Group `g` of a token's query in lanes: `q_cat` `[h, w]` (the token's queries in latent
/// space) → `qt` `[w, GROUP]`, the lanes past the last head 0. A token's groups are
/// stored one after the other ([`query_len`]).
pub(crate) fn transpose_group(q_cat: &[f32], h: usize, w: usize, g: usize, qt: &mut [f32]) {
    let dst = &mut qt[..w * GROUP];
    for lane in 0..GROUP {
        let head = g * GROUP + lane;
        if head < h {
            let src = &q_cat[head * w..][..w];
            for (k, v) in src.iter().enumerate() {
                dst[k * GROUP + lane] = *v;
            }
        } else {
            for k in 0..w {
                dst[k * GROUP + lane] = 0.0;
            }
        }
    }
}

/// The states of head groups (whole [`group_state_len`] blocks) before their first
/// chunk: maxima −∞, sums 0.
pub(crate) fn reset_state(state: &mut [f32], c: usize) {
    for group in state.chunks_exact_mut(group_state_len(c)) {
        group[..GROUP].fill(f32::NEG_INFINITY);
        group[GROUP..].fill(0.0);
    }
}

/// The shape of one token's attention.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    /// Query heads.
    pub h: usize,
    /// Latent columns (the first `c` values of a cache row are summed).
    pub c: usize,
    /// Width of a query and of the scored part of a cache row (`c + dr`).
    pub w: usize,
    /// Softmax scale of the scores.
    pub scale: f32,
}

/// Folds one chunk of cache rows (`rows`, 1..=[`CHUNK_ROWS`] rows of at least `w` f32 or
/// bf16 values) into the states of head groups `groups` (`state`: theirs, one after the
/// other), for the token's query `qt` (all its groups, [`transpose_group`]); `scratch`
/// holds [`scratch_len`] floats. Each head's arithmetic is the same whichever groups a
/// call takes. `next` (the bytes of
/// the task's next chunk of cache rows, as stored, or empty) is prefetched meanwhile:
/// a chunk that comes from memory then arrives while this one computes (a hint only).
pub(crate) fn fold_chunk<E: CacheElem>(
    shape: Shape,
    groups: Range<usize>,
    qt: &[f32],
    rows: &[&[E]],
    next: &[&[u8]],
    state: &mut [f32],
    scratch: &mut [f32],
) {
    fold_chunk_isa(isa(), shape, groups, qt, rows, next, state, scratch)
}

#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
#[allow(clippy::too_many_arguments)]
fn fold_chunk_isa<E: CacheElem>(
    isa: Isa,
    shape: Shape,
    groups: Range<usize>,
    qt: &[f32],
    rows: &[&[E]],
    next: &[&[u8]],
    state: &mut [f32],
    scratch: &mut [f32],
) {
    let Shape { h, c, w, .. } = shape;
    assert!(
        (1..=CHUNK_ROWS).contains(&rows.len())
            && rows.iter().all(|r| r.len() >= w)
            && c <= w
            && qt.len() >= query_len(h, w)
            && groups.end <= self::groups(h)
            && state.len() >= groups.len() * group_state_len(c)
            && scratch.len() >= scratch_len(h),
        "flash chunk shapes"
    );
    match isa {
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::fold_chunk512(shape, groups, qt, rows, next, state, scratch) },
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::fold_chunk_avx2(shape, groups, qt, rows, next, state, scratch) },
        Isa::Portable => fold_chunk_impl(shape, groups, qt, rows, state, scratch),
    }
}

#[inline(always)]
fn fold_chunk_impl<E: CacheElem>(
    shape: Shape,
    groups: Range<usize>,
    qt: &[f32],
    rows: &[&[E]],
    state: &mut [f32],
    p: &mut [f32],
) {
    let Shape { h, c, w, scale } = shape;
    let n = rows.len();
    for (g, st) in groups.zip(state.chunks_exact_mut(group_state_len(c))) {
        let heads = (h - g * GROUP).min(GROUP);
        let p = &mut p[g * CHUNK_ROWS * GROUP..][..n * GROUP];
        scores(&qt[g * w * GROUP..][..w * GROUP], rows, w, scale, p);
        let (ml, o) = st.split_at_mut(2 * GROUP);
        let alpha = softmax_step(p, ml);
        weighted_sum(p, rows, heads, c, &alpha, &mut o[..heads * c]);
    }
}

/// The online softmax's step for one chunk of a head group: `p` (`n · GROUP` scores)
/// becomes `e^(s − m')`, the group's running maxima and sums (`ml`, `2 · GROUP` values)
/// become `m'` and `l·α + Σ p` (the sum in row order); returns `α = e^(m − m')`. Padding
/// lanes score 0 and are carried along; nothing reads them. [`crate::flash_bf16`] shares
/// it.
#[inline(always)]
pub(crate) fn softmax_step(p: &mut [f32], ml: &mut [f32]) -> [f32; GROUP] {
    let m: [f32; GROUP] = ml[..GROUP].try_into().expect("lanes");
    let l: [f32; GROUP] = ml[GROUP..2 * GROUP].try_into().expect("lanes");
    let mut mx = m;
    for row in p.chunks_exact(GROUP) {
        for lane in 0..GROUP {
            if row[lane] > mx[lane] {
                mx[lane] = row[lane];
            }
        }
    }
    let alpha: [f32; GROUP] = std::array::from_fn(|lane| exp_portable(m[lane] - mx[lane]));
    let mut sum = [0.0f32; GROUP];
    for row in p.chunks_exact_mut(GROUP) {
        for lane in 0..GROUP {
            row[lane] = exp_portable(row[lane] - mx[lane]);
            sum[lane] += row[lane];
        }
    }
    for lane in 0..GROUP {
        ml[lane] = mx[lane];
        ml[GROUP + lane] = l[lane].mul_add(alpha[lane], sum[lane]);
    }
    alpha
}

/// `out[j·GROUP + lane] = scale · (qt[·, lane] · rows[j][..w])` for every row `j` (the
/// module's blocked sum).
#[inline(always)]
fn scores<E: CacheElem>(qt: &[f32], rows: &[&[E]], w: usize, scale: f32, out: &mut [f32]) {
    let n = rows.len();
    for j0 in (0..n).step_by(SCORE_ROWS) {
        let nr = (n - j0).min(SCORE_ROWS);
        // A short last tile repeats its last row (computed, not stored).
        let rr: [&[E]; SCORE_ROWS] = std::array::from_fn(|j| &rows[j0 + j.min(nr - 1)][..w]);
        let mut acc = [[0.0f32; GROUP]; SCORE_ROWS];
        for k0 in (0..w).step_by(K_BLOCK) {
            let k1 = (k0 + K_BLOCK).min(w);
            let mut part = [[0.0f32; GROUP]; SCORE_ROWS];
            for k in k0..k1 {
                let q: &[f32; GROUP] = qt[k * GROUP..][..GROUP].try_into().expect("lanes");
                for j in 0..SCORE_ROWS {
                    let x = rr[j][k].to_f32();
                    for lane in 0..GROUP {
                        part[j][lane] = fma(q[lane], x, part[j][lane]);
                    }
                }
            }
            for j in 0..SCORE_ROWS {
                for lane in 0..GROUP {
                    acc[j][lane] += part[j][lane];
                }
            }
        }
        for j in 0..nr {
            for lane in 0..GROUP {
                out[(j0 + j) * GROUP + lane] = acc[j][lane] * scale;
            }
        }
    }
}

/// `o[a·c + col] = o[a·c + col]·α[a] + Σ_j p[j·GROUP + a]·rows[j][col]` for the group's
/// `heads` and every column (`o` holds those heads' rows).
#[inline(always)]
fn weighted_sum<E: CacheElem>(
    p: &[f32],
    rows: &[&[E]],
    heads: usize,
    c: usize,
    alpha: &[f32; GROUP],
    o: &mut [f32],
) {
    for h0 in (0..heads).step_by(SUM_HEADS) {
        let nh = (heads - h0).min(SUM_HEADS);
        let mut c0 = 0;
        while c0 + SUM_COLS <= c {
            let mut acc = [[0.0f32; SUM_COLS]; SUM_HEADS];
            for (j, row) in rows.iter().enumerate() {
                let x: [f32; SUM_COLS] = std::array::from_fn(|col| row[c0 + col].to_f32());
                let pj: &[f32; SUM_HEADS] =
                    p[j * GROUP + h0..][..SUM_HEADS].try_into().expect("heads");
                for a in 0..SUM_HEADS {
                    for col in 0..SUM_COLS {
                        acc[a][col] = fma(pj[a], x[col], acc[a][col]);
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate().take(nh) {
                let head = h0 + a;
                let dst = &mut o[head * c + c0..][..SUM_COLS];
                for col in 0..SUM_COLS {
                    dst[col] = fma(dst[col], alpha[head], acc[col]);
                }
            }
            c0 += SUM_COLS;
        }
        tail_columns(p, rows, h0..h0 + nh, c0, c, alpha, o);
    }
}

/// [`weighted_sum`]'s columns `c0..c` past the last full tile of heads `heads`: the same
/// chains as a tile's, one column at a time (every instruction set's kernel ends so).
#[inline(always)]
fn tail_columns<E: CacheElem>(
    p: &[f32],
    rows: &[&[E]],
    heads: Range<usize>,
    c0: usize,
    c: usize,
    alpha: &[f32; GROUP],
    o: &mut [f32],
) {
    for col in c0..c {
        for head in heads.clone() {
            let mut acc = 0.0f32;
            for (j, row) in rows.iter().enumerate() {
                acc = p[j * GROUP + head].mul_add(row[col].to_f32(), acc);
            }
            let dst = &mut o[head * c + col];
            *dst = dst.mul_add(alpha[head], acc);
        }
    }
}

/// A token's latent outputs of heads `heads` (`out`: those heads' rows of `c` values)
/// from its tasks' states (`states`, `tasks` × [`state_len`] floats, in task order): the
/// module's combination. Each head's outputs are the same whatever range it comes in.
pub(crate) fn combine(
    states: &[f32],
    tasks: usize,
    h: usize,
    c: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    combine_isa(isa(), states, tasks, h, c, heads, out)
}

fn combine_isa(
    isa: Isa,
    states: &[f32],
    tasks: usize,
    h: usize,
    c: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    assert!(
        tasks >= 1
            && heads.end <= h
            && states.len() >= tasks * state_len(h, c)
            && out.len() >= heads.len() * c,
        "flash combine shapes"
    );
    match isa {
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::combine512(states, tasks, h, c, heads, out) },
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::combine_avx2(states, tasks, h, c, heads, out) },
        Isa::Portable => combine_impl(states, tasks, h, c, heads, out),
    }
}

#[inline(always)]
fn combine_impl(
    states: &[f32],
    tasks: usize,
    h: usize,
    c: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    let (len, gs) = (state_len(h, c), group_state_len(c));
    let first = heads.start;
    for head in heads {
        let (g, lane) = (head / GROUP, head % GROUP);
        let state = |t: usize| &states[t * len + g * gs..][..gs];
        let mut top = f32::NEG_INFINITY;
        for t in 0..tasks {
            let m = state(t)[lane];
            if m > top {
                top = m;
            }
        }
        let mut den = 0.0f32;
        for t in 0..tasks {
            let s = state(t);
            den = s[GROUP + lane].mul_add(exp_portable(s[lane] - top), den);
        }
        let dst = &mut out[(head - first) * c..][..c];
        dst.fill(0.0);
        for t in 0..tasks {
            let s = state(t);
            let e = exp_portable(s[lane] - top);
            let o = &s[2 * GROUP + lane * c..][..c];
            for (d, v) in dst.iter_mut().zip(o) {
                *d = v.mul_add(e, *d);
            }
        }
        for d in dst.iter_mut() {
            *d /= den;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use crate::exp::x86::{exp256, exp512};
    use std::arch::x86_64::*;

    /// Floats of a score's positions per 64-byte line of an f32 row.
    const LINE_FLOATS: usize = 16;

    /// The rows of the next chunk to prefetch while a score tile of `tile` rows from
    /// `j0` computes: the same slots of the next chunk, during a call's first group only.
    #[inline(always)]
    fn next_rows<'a>(next: &'a [&'a [u8]], g: usize, j0: usize, tile: usize) -> &'a [&'a [u8]] {
        if g > 0 || j0 >= next.len() {
            return &[];
        }
        &next[j0..(j0 + tile).min(next.len())]
    }

    /// Prefetches line `line` of each of `rows` (as far as each row reaches: a bf16 row
    /// is fetched whole by the first half of the score's positions).
    #[inline(always)]
    fn prefetch_line(rows: &[&[u8]], line: usize) {
        for row in rows {
            if line * 64 < row.len() {
                // SAFETY: in bounds of the row (and a prefetch cannot fault anyway).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(line * 64) as *const i8) };
            }
        }
    }

    /// Cache value `p` (f32 or bf16, widened exactly) in every lane of a 512-bit vector.
    #[inline(always)]
    unsafe fn bcast512<E: CacheElem>(p: *const E) -> __m512 {
        // SAFETY (both): the caller's pointer to one value.
        if E::BF16 {
            let bits = unsafe { *(p as *const u16) } as u32;
            _mm512_set1_ps(f32::from_bits(bits << 16))
        } else {
            _mm512_set1_ps(unsafe { *(p as *const f32) })
        }
    }

    /// 16 consecutive cache values from `p`, widened to f32 (exact).
    #[inline(always)]
    unsafe fn load512<E: CacheElem>(p: *const E) -> __m512 {
        // SAFETY (both): the caller's pointer to 16 values.
        if E::BF16 {
            let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        } else {
            unsafe { _mm512_loadu_ps(p as *const f32) }
        }
    }

    /// Cache value `p` in every lane of a 256-bit vector.
    #[inline(always)]
    unsafe fn bcast256<E: CacheElem>(p: *const E) -> __m256 {
        // SAFETY (both): the caller's pointer to one value.
        if E::BF16 {
            let bits = unsafe { *(p as *const u16) } as u32;
            _mm256_set1_ps(f32::from_bits(bits << 16))
        } else {
            _mm256_set1_ps(unsafe { *(p as *const f32) })
        }
    }

    /// 8 consecutive cache values from `p`, widened to f32.
    #[inline(always)]
    unsafe fn load256<E: CacheElem>(p: *const E) -> __m256 {
        // SAFETY (both): the caller's pointer to 8 values.
        if E::BF16 {
            let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        } else {
            unsafe { _mm256_loadu_ps(p as *const f32) }
        }
    }

    /// [`super::softmax_step`] in AVX-512: `pg` holds `n` rows of 16 scores, `st` the
    /// group's running maxima and sums. Shared with [`crate::flash_bf16`].
    ///
    /// # Safety
    /// AVX-512 F; `pg` valid for `n · 16` floats, `st` for 32.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub(crate) unsafe fn softmax_step512(pg: *mut f32, n: usize, st: *mut f32) -> [f32; GROUP] {
        // SAFETY: the caller's pointers.
        unsafe {
            let m = _mm512_loadu_ps(st);
            let l = _mm512_loadu_ps(st.add(GROUP));
            let mut mx = m;
            for j in 0..n {
                // `row > mx ? row : mx`, as the portable code.
                let row = _mm512_loadu_ps(pg.add(j * GROUP));
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(row, mx);
                mx = _mm512_mask_blend_ps(gt, mx, row);
            }
            let alpha = exp512(_mm512_sub_ps(m, mx));
            let mut sum = _mm512_setzero_ps();
            for j in 0..n {
                let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(pg.add(j * GROUP)), mx));
                _mm512_storeu_ps(pg.add(j * GROUP), e);
                sum = _mm512_add_ps(sum, e);
            }
            _mm512_storeu_ps(st, mx);
            _mm512_storeu_ps(st.add(GROUP), _mm512_fmadd_ps(l, alpha, sum));
            let mut alphas = [0.0f32; GROUP];
            _mm512_storeu_ps(alphas.as_mut_ptr(), alpha);
            alphas
        }
    }

    /// [`fold_chunk_impl`] in AVX-512: a score tile of 8 rows × 16 heads, a weighted-sum
    /// tile of 8 heads × 32 columns, the same operations per value.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and FMA; the shapes checked by [`fold_chunk_isa`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn fold_chunk512<E: CacheElem>(
        shape: Shape,
        groups: Range<usize>,
        qt: &[f32],
        rows: &[&[E]],
        next: &[&[u8]],
        state: &mut [f32],
        p: &mut [f32],
    ) {
        let Shape { h, c, w, scale } = shape;
        let n = rows.len();
        let gs = group_state_len(c);
        // SAFETY (all loads and stores below): rows hold ≥ w values (checked), `qt` a
        // group's w × 16 values, `p` the group's n × 16 scores, `st` the group's state.
        unsafe {
            for (gi, g) in groups.enumerate() {
                let st = state[gi * gs..][..gs].as_mut_ptr();
                let heads = (h - g * GROUP).min(GROUP);
                let q = qt[g * w * GROUP..][..w * GROUP].as_ptr();
                let pg = p[g * CHUNK_ROWS * GROUP..][..n * GROUP].as_mut_ptr();
                // Scores, SCORE_ROWS rows at a time (a short tile repeats its last row).
                for j0 in (0..n).step_by(SCORE_ROWS) {
                    let nr = (n - j0).min(SCORE_ROWS);
                    let rr: [*const E; SCORE_ROWS] =
                        std::array::from_fn(|j| rows[j0 + j.min(nr - 1)].as_ptr());
                    let ahead = next_rows(next, gi, j0, SCORE_ROWS);
                    let mut acc = [_mm512_setzero_ps(); SCORE_ROWS];
                    for k0 in (0..w).step_by(K_BLOCK) {
                        let k1 = (k0 + K_BLOCK).min(w);
                        let mut part = [_mm512_setzero_ps(); SCORE_ROWS];
                        for kk in (k0..k1).step_by(LINE_FLOATS) {
                            prefetch_line(ahead, kk / LINE_FLOATS);
                            let kend = (kk + LINE_FLOATS).min(k1);
                            let mut k = kk;
                            if E::BF16 {
                                // Two bf16 positions per broadcast: the low one shifted
                                // up, the high one masked (each widened exactly).
                                let high = _mm512_set1_epi32(-65536);
                                while k + 2 <= kend {
                                    let q0 = _mm512_loadu_ps(q.add(k * GROUP));
                                    let q1 = _mm512_loadu_ps(q.add((k + 1) * GROUP));
                                    for j in 0..SCORE_ROWS {
                                        let pair = _mm512_set1_epi32(
                                            (rr[j].add(k) as *const i32).read_unaligned(),
                                        );
                                        let x0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(pair));
                                        let x1 = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
                                        part[j] = _mm512_fmadd_ps(q0, x0, part[j]);
                                        part[j] = _mm512_fmadd_ps(q1, x1, part[j]);
                                    }
                                    k += 2;
                                }
                            }
                            while k < kend {
                                let qv = _mm512_loadu_ps(q.add(k * GROUP));
                                for j in 0..SCORE_ROWS {
                                    let x = bcast512(rr[j].add(k));
                                    part[j] = _mm512_fmadd_ps(qv, x, part[j]);
                                }
                                k += 1;
                            }
                        }
                        for j in 0..SCORE_ROWS {
                            acc[j] = _mm512_add_ps(acc[j], part[j]);
                        }
                    }
                    let sv = _mm512_set1_ps(scale);
                    for (j, a) in acc.iter().enumerate().take(nr) {
                        _mm512_storeu_ps(pg.add((j0 + j) * GROUP), _mm512_mul_ps(*a, sv));
                    }
                }
                let alphas = softmax_step512(pg, n, st);
                // The weighted sum.
                let o = st.add(2 * GROUP);
                let pg = pg as *const f32;
                for h0 in (0..heads).step_by(SUM_HEADS) {
                    let nh = (heads - h0).min(SUM_HEADS);
                    let mut c0 = 0;
                    while c0 + SUM_COLS <= c {
                        let mut acc = [[_mm512_setzero_ps(); 2]; SUM_HEADS];
                        for (j, row) in rows.iter().enumerate() {
                            let x0 = load512(row.as_ptr().add(c0));
                            let x1 = load512(row.as_ptr().add(c0 + 16));
                            for (a, acc) in acc.iter_mut().enumerate() {
                                let pa = _mm512_set1_ps(*pg.add(j * GROUP + h0 + a));
                                acc[0] = _mm512_fmadd_ps(pa, x0, acc[0]);
                                acc[1] = _mm512_fmadd_ps(pa, x1, acc[1]);
                            }
                        }
                        for (a, acc) in acc.iter().enumerate().take(nh) {
                            let head = h0 + a;
                            let av = _mm512_set1_ps(alphas[head]);
                            for (half, v) in acc.iter().enumerate() {
                                let dst = o.add(head * c + c0 + 16 * half);
                                _mm512_storeu_ps(
                                    dst,
                                    _mm512_fmadd_ps(_mm512_loadu_ps(dst), av, *v),
                                );
                            }
                        }
                        c0 += SUM_COLS;
                    }
                    tail_columns(
                        std::slice::from_raw_parts(pg, n * GROUP),
                        rows,
                        h0..h0 + nh,
                        c0,
                        c,
                        &alphas,
                        std::slice::from_raw_parts_mut(o, heads * c),
                    );
                }
            }
        }
    }

    /// [`fold_chunk_impl`] in AVX2 (16 lanes as two halves): a score tile of 3 rows, a
    /// weighted-sum tile of 4 heads × 16 columns, the same operations per value.
    ///
    /// # Safety
    /// AVX2 and FMA; the shapes checked by [`fold_chunk_isa`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fold_chunk_avx2<E: CacheElem>(
        shape: Shape,
        groups: Range<usize>,
        qt: &[f32],
        rows: &[&[E]],
        next: &[&[u8]],
        state: &mut [f32],
        p: &mut [f32],
    ) {
        const ROWS: usize = 3;
        const HEADS: usize = 4;
        const COLS: usize = 16;
        let Shape { h, c, w, scale } = shape;
        let n = rows.len();
        let gs = group_state_len(c);
        // SAFETY: as in the AVX-512 path.
        unsafe {
            for (gi, g) in groups.enumerate() {
                let st = state[gi * gs..][..gs].as_mut_ptr();
                let heads = (h - g * GROUP).min(GROUP);
                let q = qt[g * w * GROUP..][..w * GROUP].as_ptr();
                let pg = p[g * CHUNK_ROWS * GROUP..][..n * GROUP].as_mut_ptr();
                for j0 in (0..n).step_by(ROWS) {
                    let nr = (n - j0).min(ROWS);
                    let rr: [*const E; ROWS] =
                        std::array::from_fn(|j| rows[j0 + j.min(nr - 1)].as_ptr());
                    let ahead = next_rows(next, gi, j0, ROWS);
                    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                    for k0 in (0..w).step_by(K_BLOCK) {
                        let k1 = (k0 + K_BLOCK).min(w);
                        let mut part = [[_mm256_setzero_ps(); 2]; ROWS];
                        for kk in (k0..k1).step_by(LINE_FLOATS) {
                            prefetch_line(ahead, kk / LINE_FLOATS);
                            let kend = (kk + LINE_FLOATS).min(k1);
                            let mut k = kk;
                            if E::BF16 {
                                // Two bf16 positions per broadcast, as in AVX-512.
                                let high = _mm256_set1_epi32(-65536);
                                while k + 2 <= kend {
                                    let qa = [
                                        _mm256_loadu_ps(q.add(k * GROUP)),
                                        _mm256_loadu_ps(q.add(k * GROUP + 8)),
                                    ];
                                    let qb = [
                                        _mm256_loadu_ps(q.add((k + 1) * GROUP)),
                                        _mm256_loadu_ps(q.add((k + 1) * GROUP + 8)),
                                    ];
                                    for j in 0..ROWS {
                                        let pair = _mm256_set1_epi32(
                                            (rr[j].add(k) as *const i32).read_unaligned(),
                                        );
                                        let x0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(pair));
                                        let x1 = _mm256_castsi256_ps(_mm256_and_si256(pair, high));
                                        for half in 0..2 {
                                            part[j][half] =
                                                _mm256_fmadd_ps(qa[half], x0, part[j][half]);
                                            part[j][half] =
                                                _mm256_fmadd_ps(qb[half], x1, part[j][half]);
                                        }
                                    }
                                    k += 2;
                                }
                            }
                            while k < kend {
                                let q0 = _mm256_loadu_ps(q.add(k * GROUP));
                                let q1 = _mm256_loadu_ps(q.add(k * GROUP + 8));
                                for j in 0..ROWS {
                                    let x = bcast256(rr[j].add(k));
                                    part[j][0] = _mm256_fmadd_ps(q0, x, part[j][0]);
                                    part[j][1] = _mm256_fmadd_ps(q1, x, part[j][1]);
                                }
                                k += 1;
                            }
                        }
                        for j in 0..ROWS {
                            acc[j][0] = _mm256_add_ps(acc[j][0], part[j][0]);
                            acc[j][1] = _mm256_add_ps(acc[j][1], part[j][1]);
                        }
                    }
                    let sv = _mm256_set1_ps(scale);
                    for (j, a) in acc.iter().enumerate().take(nr) {
                        _mm256_storeu_ps(pg.add((j0 + j) * GROUP), _mm256_mul_ps(a[0], sv));
                        _mm256_storeu_ps(pg.add((j0 + j) * GROUP + 8), _mm256_mul_ps(a[1], sv));
                    }
                }
                let (m, l) = (st, st.add(GROUP));
                let mut alphas = [0.0f32; GROUP];
                for half in 0..2 {
                    let mv = _mm256_loadu_ps(m.add(8 * half));
                    let mut mx = mv;
                    for j in 0..n {
                        let row = _mm256_loadu_ps(pg.add(j * GROUP + 8 * half));
                        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(row, mx);
                        mx = _mm256_blendv_ps(mx, row, gt);
                    }
                    let alpha = exp256(_mm256_sub_ps(mv, mx));
                    let mut sum = _mm256_setzero_ps();
                    for j in 0..n {
                        let at = pg.add(j * GROUP + 8 * half);
                        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(at), mx));
                        _mm256_storeu_ps(at, e);
                        sum = _mm256_add_ps(sum, e);
                    }
                    let lv = _mm256_fmadd_ps(_mm256_loadu_ps(l.add(8 * half)), alpha, sum);
                    _mm256_storeu_ps(l.add(8 * half), lv);
                    _mm256_storeu_ps(m.add(8 * half), mx);
                    _mm256_storeu_ps(alphas.as_mut_ptr().add(8 * half), alpha);
                }
                let o = st.add(2 * GROUP);
                let pg = pg as *const f32;
                for h0 in (0..heads).step_by(HEADS) {
                    let nh = (heads - h0).min(HEADS);
                    let mut c0 = 0;
                    while c0 + COLS <= c {
                        let mut acc = [[_mm256_setzero_ps(); 2]; HEADS];
                        for (j, row) in rows.iter().enumerate() {
                            let x0 = load256(row.as_ptr().add(c0));
                            let x1 = load256(row.as_ptr().add(c0 + 8));
                            for (a, acc) in acc.iter_mut().enumerate() {
                                // Heads past the group's last read its padding lanes.
                                let pa = _mm256_set1_ps(*pg.add(j * GROUP + h0 + a));
                                acc[0] = _mm256_fmadd_ps(pa, x0, acc[0]);
                                acc[1] = _mm256_fmadd_ps(pa, x1, acc[1]);
                            }
                        }
                        for (a, acc) in acc.iter().enumerate().take(nh) {
                            let head = h0 + a;
                            let av = _mm256_set1_ps(alphas[head]);
                            for (half, v) in acc.iter().enumerate() {
                                let dst = o.add(head * c + c0 + 8 * half);
                                _mm256_storeu_ps(
                                    dst,
                                    _mm256_fmadd_ps(_mm256_loadu_ps(dst), av, *v),
                                );
                            }
                        }
                        c0 += COLS;
                    }
                    tail_columns(
                        std::slice::from_raw_parts(pg, n * GROUP),
                        rows,
                        h0..h0 + nh,
                        c0,
                        c,
                        &alphas,
                        std::slice::from_raw_parts_mut(o, heads * c),
                    );
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn combine512(
        states: &[f32],
        tasks: usize,
        h: usize,
        c: usize,
        heads: Range<usize>,
        out: &mut [f32],
    ) {
        combine_impl(states, tasks, h, c, heads, out)
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn combine_avx2(
        states: &[f32],
        tasks: usize,
        h: usize,
        c: usize,
        heads: Range<usize>,
        out: &mut [f32],
    ) {
        combine_impl(states, tasks, h, c, heads, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mla::isas;
    use crate::{bits, test_values};

    /// A token's query in lanes, every group.
    fn transpose(q_cat: &[f32], h: usize, w: usize) -> Vec<f32> {
        let mut qt = vec![0.0; query_len(h, w)];
        for (g, dst) in qt.chunks_exact_mut(w * GROUP).enumerate() {
            transpose_group(q_cat, h, w, g, dst);
        }
        qt
    }

    /// The whole one-pass attention of one token over `rows` on `isa`: each task's
    /// groups in one call, or (`per_group`) one call per head group, as the attention
    /// splits a token's heads when it has few tasks.
    fn attend<E: CacheElem + bytemuck::Pod>(
        isa: Isa,
        shape: Shape,
        q_cat: &[f32],
        rows: &[Vec<E>],
        per_group: bool,
    ) -> Vec<f32> {
        let Shape { h, c, w, .. } = shape;
        let qt = transpose(q_cat, h, w);
        let (per, tasks) = split(rows.len(), h, c, w);
        let (len, gs, ng) = (state_len(h, c), group_state_len(c), groups(h));
        let calls: Vec<Range<usize>> = match per_group {
            true => (0..ng).map(|g| g..g + 1).collect(),
            false => std::iter::once(0..ng).collect(),
        };
        let mut states = vec![0.0; tasks * len];
        let mut scratch = vec![0.0; scratch_len(h)];
        for t in 0..tasks {
            for groups in &calls {
                let state = &mut states[t * len..][groups.start * gs..groups.end * gs];
                reset_state(state, c);
                let chunks = (t * per..((t + 1) * per)).map(|ch| ch * CHUNK_ROWS);
                for s0 in chunks.take_while(|&s0| s0 < rows.len()) {
                    let s1 = (s0 + CHUNK_ROWS).min(rows.len());
                    let chunk: Vec<&[E]> = rows[s0..s1].iter().map(|r| r.as_slice()).collect();
                    let next: Vec<&[u8]> = rows[s1..(s1 + CHUNK_ROWS).min(rows.len())]
                        .iter()
                        .map(|r| bytemuck::cast_slice(r.as_slice()))
                        .collect();
                    fold_chunk_isa(
                        isa,
                        shape,
                        groups.clone(),
                        &qt,
                        &chunk,
                        &next,
                        state,
                        &mut scratch,
                    );
                }
            }
        }
        let mut out = vec![0.0; h * c];
        for groups in &calls {
            let heads = groups.start * GROUP..(groups.end * GROUP).min(h);
            let rows = heads.start * c..heads.end * c;
            combine_isa(isa, &states, tasks, h, c, heads, &mut out[rows]);
        }
        out
    }

    /// The same attention in f64: scores, softmax, weighted sum.
    fn reference(shape: Shape, q_cat: &[f32], rows: &[Vec<f32>]) -> Vec<f64> {
        let Shape { h, c, w, scale } = shape;
        let mut out = vec![0.0f64; h * c];
        for head in 0..h {
            let q = &q_cat[head * w..][..w];
            let s: Vec<f64> = rows
                .iter()
                .map(|r| {
                    scale as f64
                        * q.iter()
                            .zip(r)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (r, p) in rows.iter().zip(&e) {
                for col in 0..c {
                    out[head * c + col] += p / sum * r[col] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn one_pass_attention_matches_f64_and_agrees_bit_for_bit() {
        // V2-Lite's shape, a fixture's small one, a ragged one (heads past a group,
        // columns past a tile, a short last chunk).
        for (h, c, dr, positions) in [
            (16, 512, 64, vec![1, 7, 64, 65, 300, 1100]),
            (4, 32, 16, vec![1, 3, 129]),
            (21, 72, 8, vec![5, 200]),
            (40, 64, 16, vec![3, 300]),
        ] {
            let w = c + dr;
            let shape = Shape {
                h,
                c,
                w,
                scale: 1.0 / (w as f32).sqrt(),
            };
            for n in positions {
                let q_cat: Vec<f32> = test_values(h * w, (h * n) as u64)
                    .into_iter()
                    .map(|v| 3.0 * v)
                    .collect();
                let rows: Vec<Vec<f32>> = (0..n)
                    .map(|s| test_values(w + 3, (1000 + s) as u64))
                    .collect();
                let want = attend(Isa::Portable, shape, &q_cat, &rows, false);
                let exact = reference(shape, &q_cat, &rows);
                let norm = exact.iter().map(|v| v * v).sum::<f64>().sqrt();
                let err = want
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (*a as f64 - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(err <= 1e-6 * norm, "h {h} c {c} n {n}: {err} vs {norm}");
                // A bf16 cache: its rows widened in the kernels give exactly what the
                // same rows widened beforehand give.
                let rows_bf16: Vec<Vec<bf16>> = rows
                    .iter()
                    .map(|r| r.iter().map(|v| bf16::from_f32(*v)).collect())
                    .collect();
                let widened: Vec<Vec<f32>> = rows_bf16
                    .iter()
                    .map(|r| r.iter().map(|v| v.to_f32()).collect())
                    .collect();
                let want_bf16 = attend(Isa::Portable, shape, &q_cat, &widened, false);
                for isa in isas() {
                    for per_group in [false, true] {
                        let got = attend(isa, shape, &q_cat, &rows, per_group);
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{isa:?} h {h} c {c} n {n} per group {per_group}"
                        );
                        let got = attend(isa, shape, &q_cat, &rows_bf16, per_group);
                        assert_eq!(
                            bits(&got),
                            bits(&want_bf16),
                            "bf16 rows, {isa:?} h {h} c {c} n {n} per group {per_group}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_split_covers_every_chunk_in_whole_tasks() {
        for visible in [1, 64, 65, 128, 129, 1000, 4096, 32768] {
            for (h, c, w) in [(16, 512, 576), (128, 512, 576), (4, 32, 48)] {
                let (per, tasks) = split(visible, h, c, w);
                let chunks = visible.div_ceil(CHUNK_ROWS);
                assert!(
                    per * tasks >= chunks && per * (tasks - 1) < chunks,
                    "{visible}"
                );
                assert!((1..=MAX_TASKS).contains(&tasks), "{visible}");
            }
        }
        assert_eq!(split(4096, 16, 512, 576), (4, 16));
        assert_eq!(split(1024, 16, 512, 576), (2, 8));
        assert_eq!(split(4096, 128, 512, 576), (8, 8));
        assert_eq!(split(100, 16, 512, 576), (2, 1));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::test_values;

    /// Multiply-adds per second of one core folding a V2-Lite chunk on each instruction
    /// set (`cargo test --release -p dsv2-cpu --lib flash_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn flash_timing() {
        let (h, c, w) = (16, 512, 576);
        let shape = Shape {
            h,
            c,
            w,
            scale: 0.05,
        };
        let q_cat = test_values(h * w, 1);
        let rows: Vec<Vec<f32>> = (0..CHUNK_ROWS)
            .map(|s| test_values(w, 9 + s as u64))
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let mut qt = vec![0.0; query_len(h, w)];
        transpose_group(&q_cat, h, w, 0, &mut qt);
        let mut state = vec![0.0; state_len(h, c)];
        let mut scratch = vec![0.0; scratch_len(h)];
        reset_state(&mut state, c);
        for isa in crate::mla::isas() {
            let reps = 2000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                fold_chunk_isa(isa, shape, 0..1, &qt, &refs, &[], &mut state, &mut scratch);
            }
            let s = t.elapsed().as_secs_f64();
            let macs = (reps * CHUNK_ROWS * h * (w + c)) as f64;
            eprintln!("{isa:?}: {:.1} GMAC/s", macs / s / 1e9);
        }
    }
}

#[cfg(test)]
mod cache_timing {
    use super::*;
    use crate::test_values;
    use half::bf16;

    /// Multiply-adds per second of two threads folding 8 × 4096 V2-Lite positions that
    /// come from memory (the cache of batch 8 at a 4K context, one layer): f32 rows, bf16
    /// rows, and bf16 rows in bf16 arithmetic (`flash_bf16`), alternating, median of 8 rounds
    /// (`cargo test --release -p dsv2-cpu --lib flash_cache_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn flash_cache_timing() {
        let (h, c, w) = (16, 512, 576);
        let shape = Shape {
            h,
            c,
            w,
            scale: 0.05,
        };
        let positions = 8 * 4096;
        let q_cat = test_values(h * w, 1);
        let mut qt = vec![0.0; query_len(h, w)];
        transpose_group(&q_cat, h, w, 0, &mut qt);
        let pattern = test_values(w * CHUNK_ROWS, 3);
        let rows_f32: Vec<f32> = (0..positions * w)
            .map(|i| pattern[i % pattern.len()] * (1.0 + (i / pattern.len()) as f32 * 1e-4))
            .collect();
        let rows_bf16: Vec<bf16> = rows_f32.iter().map(|v| bf16::from_f32(*v)).collect();
        fn run<E: CacheElem + bytemuck::Pod>(
            shape: Shape,
            qt: &[f32],
            all: &[E],
            span: Range<usize>,
        ) {
            let Shape { h, c, w, .. } = shape;
            let mut state = vec![0.0; state_len(h, c)];
            let mut scratch = vec![0.0; scratch_len(h)];
            reset_state(&mut state, c);
            let row = |s: usize| &all[s * w..][..w];
            for s0 in span.clone().step_by(CHUNK_ROWS) {
                let rows: Vec<&[E]> = (s0..s0 + CHUNK_ROWS).map(row).collect();
                let next: Vec<&[u8]> = (s0 + CHUNK_ROWS..(s0 + 2 * CHUNK_ROWS).min(span.end))
                    .map(|s| bytemuck::cast_slice(row(s)))
                    .collect();
                fold_chunk(shape, 0..1, qt, &rows, &next, &mut state, &mut scratch);
            }
        }
        let mut qt16 = vec![0u32; crate::flash_bf16::query_len(h, w)];
        crate::flash_bf16::transpose_group(&q_cat, h, w, 0, &mut qt16);
        let run16 = |span: Range<usize>| {
            let mut state = vec![0.0; state_len(h, c)];
            let mut scratch = vec![0.0; crate::flash_bf16::scratch_len(h)];
            reset_state(&mut state, c);
            let row = |s: usize| &rows_bf16[s * w..][..w];
            for s0 in span.clone().step_by(CHUNK_ROWS) {
                let rows: Vec<&[bf16]> = (s0..s0 + CHUNK_ROWS).map(row).collect();
                let next: Vec<&[u8]> = (s0 + CHUNK_ROWS..(s0 + 2 * CHUNK_ROWS).min(span.end))
                    .map(|s| bytemuck::cast_slice(row(s)))
                    .collect();
                crate::flash_bf16::fold_chunk(
                    shape,
                    0..1,
                    &qt16,
                    &rows,
                    &next,
                    &mut state,
                    &mut scratch,
                );
            }
        };
        let halves = [0..positions / 2, positions / 2..positions];
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..8 {
            for (variant, rate) in rates.iter_mut().enumerate() {
                let t = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for span in &halves {
                        let qt = &qt;
                        let run16 = &run16;
                        match variant {
                            0 => scope.spawn(|| run(shape, qt, &rows_f32, span.clone())),
                            1 => scope.spawn(|| run(shape, qt, &rows_bf16, span.clone())),
                            _ => scope.spawn(|| run16(span.clone())),
                        };
                    }
                });
                let macs = (positions * h * (w + c)) as f64;
                rate.push(macs / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        let names = ["f32 rows", "bf16 rows", "bf16 rows, bf16 arithmetic"];
        for (name, mut rate) in names.into_iter().zip(rates) {
            rate.sort_by(f64::total_cmp);
            eprintln!(
                "{name}: median {:.1} GMAC/s (best {:.1})",
                rate[rate.len() / 2],
                rate[rate.len() - 1]
            );
        }
    }
}
