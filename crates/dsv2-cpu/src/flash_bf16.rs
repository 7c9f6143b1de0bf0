//! The one-pass attention of [`crate::flash`] in bf16 arithmetic, over a bf16 latent cache,
//! on AVX-512 BF16 (`vdpbf16ps`: 32 multiply-adds of bf16 pairs into 16 f32 lanes, twice
//! the work of an f32 fused multiply-add per instruction).
//!
//! A bf16 cache holds bf16 keys and latents; here the query and the probabilities are
//! rounded to bf16 too, as FlashMLA and the reference in bf16 do (the scores, the softmax
//! and every sum stay f32). Long-context decode is bound by this arithmetic (17,408
//! multiply-adds per cached position and layer on V2-Lite), so halving its instructions
//! is what makes long contexts faster.
//!
//! The arithmetic, per value, is one fixed sequence, written here twice: as a scalar
//! reference ([`fold_chunk_reference`]) and in AVX-512 BF16, tested bit for bit. Its one
//! step, `dp(acc, (a0, a1), (b0, b1))`, is the instruction's: `acc = fma(a1, b1, acc)`, then
//! `acc = fma(a0, b0, acc)` (the products of bf16 values are exact in f32), with subnormal
//! inputs read as 0 and a subnormal result flushed to 0 (checked against the instruction
//! on 2 million random operands, subnormals included, on the development VM's EPYC).
//! Rounding to bf16 is to nearest even, with subnormals flushed to 0 (the instruction's
//! `vcvtne2ps2bf16`).
//! - the query `q` of head `h`, position `k`, is `bf16(q)`; a score is the blocked sum of
//!   [`crate::flash`] with each block's chain taking the positions two at a time,
//!   `dp(part, (q_k, q_k+1), (x_k, x_k+1))` (an odd last position paired with 0);
//! - the softmax is [`crate::flash`]'s, on f32 scores;
//! - the weighted sum takes the chunk's rows two at a time: `acc = dp(acc, (bf16(p_j),
//!   bf16(p_j+1)), (x_j, x_j+1))` from 0 (an odd last row paired with a zero row), then
//!   `o' = fma(o, α, acc)`; the running sum `l` adds the f32 probabilities.
//!
//! The tasks and their combination are [`crate::flash`]'s. Where the CPU lacks AVX-512
//! BF16 the attention keeps [`crate::flash`]'s f32 arithmetic over the bf16 rows, so the
//! logits of a bf16 cache depend on whether the CPU has the instruction (as the bf16
//! `lm_head` of a quantized model does, [`crate::bf16dot`]); on one CPU they do not
//! depend on the batch or the thread count.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use half::bf16;

use crate::flash::{group_state_len, groups, softmax_step, Shape, CHUNK_ROWS, GROUP};

/// Positions per block of a score's dot product (as [`crate::flash`]'s, even).
const K_BLOCK: usize = 64;
/// Cache rows of a score tile.
const SCORE_ROWS: usize = 8;
/// Heads of a weighted-sum tile.
const SUM_HEADS: usize = 8;
/// Latent columns of a weighted-sum tile.
const SUM_COLS: usize = 32;

/// Whether this CPU runs the bf16 attention (AVX-512 F, BW and BF16, checked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            dsv2_core::isa::avx512_bf16()
                && std::env::var("DSV2_BF16_ATTENTION").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the kernels that take bf16 for speed alone use it: [`available`], on a CPU
/// whose `vdpbf16ps` keeps pace with its int8 and f32 instructions
/// ([`dsv2_core::isa::bf16_dot_keeps_pace`]: AMD's, not Intel's). This decode attention
/// over a bf16 cache and the q8 prompt rows (`q8_bf16`) ask it; the prefill attention
/// (`prefill_bf16`) takes bf16 wherever [`available`].
pub(crate) fn keeps_pace() -> bool {
    available() && dsv2_core::isa::bf16_dot_keeps_pace()
}

/// `x` rounded to bf16 as `vcvtne2ps2bf16` does: to nearest even, subnormals to 0.
/// Branch-free (the rounding bit of real data is a coin toss for a branch predictor), so
/// a loop over a query's values runs without mispredictions and vectorizes.
#[inline(always)]
pub(crate) fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    let magnitude = bits & 0x7FFF_FFFF;
    // Subnormals (and zeros) to a zero of their sign.
    let bits = if magnitude < 0x0080_0000 {
        bits & 0x8000_0000
    } else {
        bits
    };
    let nearest_even = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    // NaNs stay NaNs, quiet.
    let quiet_nan = (bits >> 16) | 0x0040;
    (if magnitude > 0x7F80_0000 {
        quiet_nan
    } else {
        nearest_even
    }) as u16
}

/// The f32 value of bf16 bits, subnormals read as 0.
#[inline(always)]
fn widen(b: u16) -> f32 {
    let x = f32::from_bits((b as u32) << 16);
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// One product step of `vdpbf16ps`: `fma(a, b, acc)` with subnormal inputs read as 0 and
/// a subnormal result flushed to 0.
#[inline(always)]
fn step(acc: f32, a: u16, b: u16) -> f32 {
    let acc = if acc.is_subnormal() {
        0.0f32.copysign(acc)
    } else {
        acc
    };
    let r = widen(a).mul_add(widen(b), acc);
    if r.is_subnormal() {
        0.0f32.copysign(r)
    } else {
        r
    }
}

/// `vdpbf16ps` on one lane: the high pair first.
#[inline(always)]
pub(crate) fn dp(acc: f32, a: u32, b: u32) -> f32 {
    let acc = step(acc, (a >> 16) as u16, (b >> 16) as u16);
    step(acc, a as u16, b as u16)
}

/// Two bf16 values in one 32-bit lane: `lo` in the low half.
#[inline(always)]
pub(crate) fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Position pairs of a query or row of `w` values.
pub(crate) fn pairs(w: usize) -> usize {
    w.div_ceil(2)
}

/// `u32` values of one token's query in bf16 pairs ([`transpose_group`]).
pub(crate) fn query_len(h: usize, w: usize) -> usize {
    groups(h) * pairs(w) * GROUP
}

/// Floats of a fold's scratch: [`crate::flash::scratch_len`]'s scores and one group's
/// probabilities in bf16 pairs.
pub(crate) fn scratch_len(h: usize) -> usize {
    crate::flash::scratch_len(h) + CHUNK_ROWS / 2 * GROUP
}

/// Group `g` of a token's query (`q_cat` `[h, w]`) in lanes and bf16 pairs: `qt[k2·GROUP +
/// lane]` holds `bf16(q[k])` (low half) and `bf16(q[k + 1])` of head `g·GROUP + lane`, `k
/// = 2·k2` (an odd last position paired with 0; lanes past the last head 0).
pub(crate) fn transpose_group(q_cat: &[f32], h: usize, w: usize, g: usize, qt: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() && w.is_multiple_of(32) {
        assert!(q_cat.len() >= h * w && qt.len() >= pairs(w) * GROUP && g * GROUP < h);
        // SAFETY: the features were detected; the lengths checked above.
        return unsafe { x86::transpose_group(q_cat, h, w, g, qt) };
    }
    transpose_group_reference(q_cat, h, w, g, qt)
}

/// [`transpose_group`], one value at a time.
fn transpose_group_reference(q_cat: &[f32], h: usize, w: usize, g: usize, qt: &mut [u32]) {
    let dst = &mut qt[..pairs(w) * GROUP];
    for lane in 0..GROUP {
        let head = g * GROUP + lane;
        if head < h {
            let q = &q_cat[head * w..][..w];
            for (k2, two) in q.chunks(2).enumerate() {
                let hi = two.get(1).map_or(0, |v| round(*v));
                dst[k2 * GROUP + lane] = pair(round(two[0]), hi);
            }
        } else {
            for k2 in 0..pairs(w) {
                dst[k2 * GROUP + lane] = 0;
            }
        }
    }
}

/// [`crate::flash::fold_chunk`] in bf16 arithmetic: `rows` are bf16 cache rows, `qt` the
/// token's query from [`transpose_group`] (all its groups), `scratch` holds
/// [`scratch_len`] floats.
pub(crate) fn fold_chunk(
    shape: Shape,
    groups: Range<usize>,
    qt: &[u32],
    rows: &[&[bf16]],
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
        "flash bf16 chunk shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were detected; the shapes are checked above.
        return unsafe { x86::fold_chunk512(shape, groups, qt, rows, next, state, scratch) };
    }
    let _ = next;
    fold_chunk_reference(shape, groups, qt, rows, state, scratch)
}

/// The module's arithmetic, one value at a time.
pub(crate) fn fold_chunk_reference(
    shape: Shape,
    groups: Range<usize>,
    qt: &[u32],
    rows: &[&[bf16]],
    state: &mut [f32],
    scratch: &mut [f32],
) {
    let Shape { h, c, w, scale } = shape;
    let n = rows.len();
    let x = |j: usize, k: usize| rows[j].get(k).filter(|_| k < w).map_or(0, |v| v.to_bits());
    let (p, _) = scratch.split_at_mut(crate::flash::scratch_len(h));
    for (g, st) in groups.zip(state.chunks_exact_mut(group_state_len(c))) {
        let heads = (h - g * GROUP).min(GROUP);
        let q = &qt[g * pairs(w) * GROUP..][..pairs(w) * GROUP];
        let p = &mut p[g * CHUNK_ROWS * GROUP..][..n * GROUP];
        for j in 0..n {
            for lane in 0..GROUP {
                let mut acc = 0.0f32;
                for k0 in (0..w).step_by(K_BLOCK) {
                    let mut part = 0.0f32;
                    for k in (k0..(k0 + K_BLOCK).min(w)).step_by(2) {
                        part = dp(part, q[k / 2 * GROUP + lane], pair(x(j, k), x(j, k + 1)));
                    }
                    acc += part;
                }
                p[j * GROUP + lane] = acc * scale;
            }
        }
        let (ml, o) = st.split_at_mut(2 * GROUP);
        let alpha = softmax_step(p, ml);
        let pb = |j: usize, head: usize| if j < n { round(p[j * GROUP + head]) } else { 0 };
        for head in 0..heads {
            for col in 0..c {
                let mut acc = 0.0f32;
                for j in (0..n).step_by(2) {
                    acc = dp(
                        acc,
                        pair(pb(j, head), pb(j + 1, head)),
                        pair(x(j, col), if j + 1 < n { x(j + 1, col) } else { 0 }),
                    );
                }
                let dst = &mut o[head * c + col];
                *dst = dst.mul_add(alpha[head], acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{dp, group_state_len, pair, pairs, Range, Shape, CHUNK_ROWS, GROUP, K_BLOCK};
    use super::{SCORE_ROWS, SUM_COLS, SUM_HEADS};
    use crate::flash::x86::softmax_step512;
    use half::bf16;
    use std::arch::x86_64::*;

    /// Two-source permutation indices that swap bit `d` of the row and column index of a
    /// 16 × 16 matrix of 32-bit values held as 16 vectors: for rows `i` (bit `d` clear)
    /// and `i + d`, `[to row i, to row i + d]`.
    const fn swap_indices(d: usize) -> [[i32; 16]; 2] {
        let mut index = [[0i32; 16]; 2];
        let mut col = 0;
        while col < 16 {
            if col & d == 0 {
                index[0][col] = col as i32;
                index[1][col] = (col + d) as i32;
            } else {
                index[0][col] = (16 + col - d) as i32;
                index[1][col] = (16 + col) as i32;
            }
            col += 1;
        }
        index
    }

    const SWAPS: [[[i32; 16]; 2]; 4] = [
        swap_indices(1),
        swap_indices(2),
        swap_indices(4),
        swap_indices(8),
    ];

    /// `v` (16 vectors, row `i` in `v[i]`) transposed in place: swaps of bit `d` of the row
    /// and column index for `d` = 1, 2, 4, 8.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose(v: &mut [__m512i; 16]) {
        for (level, swap) in SWAPS.iter().enumerate() {
            let d = 1 << level;
            // SAFETY: 16 i32 values each.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(swap[0].as_ptr() as *const _),
                    _mm512_loadu_si512(swap[1].as_ptr() as *const _),
                )
            };
            for i in 0..16 {
                if i & d == 0 {
                    let (a, b) = (v[i], v[i + d]);
                    v[i] = _mm512_permutex2var_epi32(a, lo, b);
                    v[i + d] = _mm512_permutex2var_epi32(a, hi, b);
                }
            }
        }
    }

    /// [`super::transpose_group_reference`] for `w` a multiple of 32: each head's 32
    /// values of a block rounded into 16 pairs (`vcvtne2ps2bf16`), then the 16 heads'
    /// vectors transposed into the block's 16 rows of lanes.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `q_cat` holds `h · w` values, `qt` `w / 2 · 16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn transpose_group(
        q_cat: &[f32],
        h: usize,
        w: usize,
        g: usize,
        qt: &mut [u32],
    ) {
        for block in 0..w / 32 {
            let mut v: [__m512i; 16] = std::array::from_fn(|lane| {
                let head = g * GROUP + lane;
                if head < h {
                    // SAFETY: values 32·block.. + 32 of the head's row.
                    unsafe {
                        let x = q_cat.as_ptr().add(head * w + 32 * block);
                        bits(_mm512_cvtne2ps_pbh(
                            _mm512_loadu_ps(x.add(16)),
                            _mm512_loadu_ps(x),
                        ))
                    }
                } else {
                    _mm512_setzero_si512()
                }
            });
            // SAFETY: the caller's features.
            unsafe { transpose(&mut v) };
            for (k, v) in v.iter().enumerate() {
                // SAFETY: row 16·block + k of the group's pairs lies in `qt`.
                unsafe {
                    _mm512_storeu_si512(qt.as_mut_ptr().add((16 * block + k) * GROUP) as *mut _, *v)
                };
            }
        }
    }

    /// 32 bf16 values as the bf16 vector type of `vdpbf16ps`.
    #[inline(always)]
    pub(crate) fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The bits of a bf16 vector.
    #[inline(always)]
    pub(crate) fn bits(v: __m512bh) -> __m512i {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
    }

    /// Two f32 vectors rounded to bf16 (`vcvtne2ps2bf16`, as [`super::round`]) and paired per
    /// lane: lane `j` holds `bf16(lo[j])` in its low half and `bf16(hi[j])` in its high one.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn pair_lanes(lo: __m512, hi: __m512) -> __m512i {
        /// Result value `i` (of 32): value `i / 2` of the low or the high half.
        const INDEX: [i16; 32] = {
            let mut index = [0i16; 32];
            let mut i = 0;
            while i < 32 {
                index[i] = (i / 2 + 16 * (i % 2)) as i16;
                i += 1;
            }
            index
        };
        // SAFETY: 32 i16 values.
        let index = unsafe { _mm512_loadu_si512(INDEX.as_ptr() as *const _) };
        // Low 16 values lo's, high 16 hi's; then interleaved per lane.
        _mm512_permutexvar_epi16(index, bits(_mm512_cvtne2ps_pbh(hi, lo)))
    }

    /// The columns of a weighted-sum tile's two accumulators, back in order: the
    /// interleave of two rows (`vpunpck[lh]wd`) leaves columns 0-3, 8-11, 16-19, 24-27 in
    /// the first and 4-7, … in the second.
    #[inline(always)]
    unsafe fn in_order(lo: __m512, hi: __m512) -> [__m512; 2] {
        /// For output column `col` of the tile: its lane in `lo` (`< 16`) or in `hi`.
        const INDEX: [[i32; 16]; 2] = {
            let mut index = [[0i32; 16]; 2];
            let mut col = 0;
            while col < 32 {
                let at = (col / 8 * 4 + col % 4) as i32;
                index[col / 16][col % 16] = if col % 8 < 4 { at } else { 16 + at };
                col += 1;
            }
            index
        };
        // SAFETY: 16 i32 values each.
        let index = |half: usize| unsafe { _mm512_loadu_si512(INDEX[half].as_ptr() as *const _) };
        [
            _mm512_permutex2var_ps(lo, index(0), hi),
            _mm512_permutex2var_ps(lo, index(1), hi),
        ]
    }

    /// [`super::fold_chunk_reference`] on AVX-512 BF16: score tiles of 8 rows × 16 heads, two
    /// positions per `vdpbf16ps`; weighted-sum tiles of 8 heads × 32 columns, two rows
    /// per `vdpbf16ps`.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; the shapes checked by [`super::fold_chunk`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl,fma")]
    pub(super) unsafe fn fold_chunk512(
        shape: Shape,
        groups: Range<usize>,
        qt: &[u32],
        rows: &[&[bf16]],
        next: &[&[u8]],
        state: &mut [f32],
        scratch: &mut [f32],
    ) {
        let Shape { h, c, w, scale } = shape;
        let n = rows.len();
        let gs = group_state_len(c);
        let wp = pairs(w);
        let (p_all, pp) = scratch.split_at_mut(crate::flash::scratch_len(h));
        let pp = pp.as_mut_ptr() as *mut u32;
        // A row's bf16 pair at position k (an odd last position paired with 0).
        let x_pair = |row: *const u16, k: usize| -> i32 {
            // SAFETY: k < w; k + 1 < w when read.
            unsafe {
                if k + 1 < w {
                    (row.add(k) as *const i32).read_unaligned()
                } else {
                    *row.add(k) as i32
                }
            }
        };
        // SAFETY (all loads and stores below): rows hold ≥ w values (checked), `qt` a
        // group's wp × 16 pairs, `p_all` the group's n × 16 scores, `pp` 32 × 16 pairs,
        // `st` the group's state.
        unsafe {
            for (gi, g) in groups.enumerate() {
                let st = state[gi * gs..][..gs].as_mut_ptr();
                let heads = (h - g * GROUP).min(GROUP);
                let q = qt[g * wp * GROUP..][..wp * GROUP].as_ptr();
                let pg = p_all[g * CHUNK_ROWS * GROUP..][..n * GROUP].as_mut_ptr();
                for j0 in (0..n).step_by(SCORE_ROWS) {
                    let nr = (n - j0).min(SCORE_ROWS);
                    let rr: [*const u16; SCORE_ROWS] =
                        std::array::from_fn(|j| rows[j0 + j.min(nr - 1)].as_ptr() as *const u16);
                    // The same slots of the next chunk, during the first group only.
                    let ahead: &[&[u8]] = if gi == 0 && j0 < next.len() {
                        &next[j0..(j0 + SCORE_ROWS).min(next.len())]
                    } else {
                        &[]
                    };
                    let mut acc = [_mm512_setzero_ps(); SCORE_ROWS];
                    for k0 in (0..w).step_by(K_BLOCK) {
                        let k1 = (k0 + K_BLOCK).min(w);
                        let mut part = [_mm512_setzero_ps(); SCORE_ROWS];
                        for k in (k0..k1).step_by(2) {
                            if k % 32 == 0 {
                                for row in ahead {
                                    if k * 2 < row.len() {
                                        _mm_prefetch::<_MM_HINT_T0>(
                                            row.as_ptr().add(k * 2) as *const i8
                                        );
                                    }
                                }
                            }
                            let qv = bh(_mm512_loadu_si512(q.add(k / 2 * GROUP) as *const _));
                            for j in 0..SCORE_ROWS {
                                let xv = bh(_mm512_set1_epi32(x_pair(rr[j], k)));
                                part[j] = _mm512_dpbf16_ps(part[j], qv, xv);
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
                // The running max and sum of the group's lanes (as crate::flash).
                let alphas = softmax_step512(pg, n, st);
                // The probabilities in bf16 pairs of rows: pp[j2·16 + lane] = (p[2·j2],
                // p[2·j2 + 1]) of the lane (an odd last row paired with 0).
                for j2 in 0..n.div_ceil(2) {
                    let p0 = _mm512_loadu_ps(pg.add(2 * j2 * GROUP));
                    let p1 = if 2 * j2 + 1 < n {
                        _mm512_loadu_ps(pg.add((2 * j2 + 1) * GROUP))
                    } else {
                        _mm512_setzero_ps()
                    };
                    _mm512_storeu_si512(pp.add(j2 * GROUP) as *mut _, pair_lanes(p0, p1));
                }
                let o = st.add(2 * GROUP);
                let zero = _mm512_setzero_si512();
                for h0 in (0..heads).step_by(SUM_HEADS) {
                    let nh = (heads - h0).min(SUM_HEADS);
                    let mut c0 = 0;
                    while c0 + SUM_COLS <= c {
                        let mut acc = [[_mm512_setzero_ps(); 2]; SUM_HEADS];
                        for j in (0..n).step_by(2) {
                            let r0 = _mm512_loadu_si512(rows[j].as_ptr().add(c0) as *const _);
                            let r1 = if j + 1 < n {
                                _mm512_loadu_si512(rows[j + 1].as_ptr().add(c0) as *const _)
                            } else {
                                zero
                            };
                            let lo = bh(_mm512_unpacklo_epi16(r0, r1));
                            let hi = bh(_mm512_unpackhi_epi16(r0, r1));
                            for (a, acc) in acc.iter_mut().enumerate() {
                                // Heads past the group's last read its padding lanes.
                                let pv =
                                    bh(_mm512_set1_epi32(*pp.add(j / 2 * GROUP + h0 + a) as i32));
                                acc[0] = _mm512_dpbf16_ps(acc[0], pv, lo);
                                acc[1] = _mm512_dpbf16_ps(acc[1], pv, hi);
                            }
                        }
                        for (a, acc) in acc.iter().enumerate().take(nh) {
                            let head = h0 + a;
                            let av = _mm512_set1_ps(alphas[head]);
                            for (half, v) in in_order(acc[0], acc[1]).iter().enumerate() {
                                let dst = o.add(head * c + c0 + 16 * half);
                                _mm512_storeu_ps(
                                    dst,
                                    _mm512_fmadd_ps(_mm512_loadu_ps(dst), av, *v),
                                );
                            }
                        }
                        c0 += SUM_COLS;
                    }
                    // Columns past the last full tile, one at a time.
                    let x = |j: usize, col: usize| rows.get(j).map_or(0, |r| r[col].to_bits());
                    for col in c0..c {
                        for (head, alpha) in alphas.iter().enumerate().skip(h0).take(nh) {
                            let mut acc = 0.0f32;
                            for j in (0..n).step_by(2) {
                                let p = *pp.add(j / 2 * GROUP + head);
                                acc = dp(acc, p, pair(x(j, col), x(j + 1, col)));
                            }
                            let dst = &mut *o.add(head * c + col);
                            *dst = dst.mul_add(*alpha, acc);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::{reset_state, state_len};
    use crate::test_values;

    /// `half`'s rounding to nearest even, subnormals flushed first: the plain reference.
    fn round_reference(x: f32) -> u16 {
        let x = if x.is_subnormal() {
            0.0f32.copysign(x)
        } else {
            x
        };
        bf16::from_f32(x).to_bits()
    }

    #[test]
    fn rounding_matches_the_reference_on_every_kind_of_value() {
        let mut bits = vec![
            0,
            0x8000_0000,
            1,
            0x807F_FFFF,
            0x0080_0000,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0x7FC0_0000,
            0xFFFF_FFFF,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x3F80_7FFF,
        ];
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1 << 20 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bits.push((s >> 32) as u32);
        }
        for b in bits {
            let x = f32::from_bits(b);
            assert_eq!(round(x), round_reference(x), "{b:#010x}");
        }
    }

    /// The AVX-512 BF16 transpose of a query group against the scalar one, with heads past
    /// the group's last and values of every kind.
    #[test]
    fn the_query_transpose_matches_the_reference() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        for (h, w) in [(16, 576), (4, 64), (40, 96), (128, 576)] {
            let mut q = test_values(h * w, (h + w) as u64);
            q[3] = 1e-40;
            q[5] = f32::NAN;
            q[7] = f32::INFINITY;
            q[9] = 1.0 + f32::EPSILON * 64.0;
            for g in 0..groups(h) {
                let len = pairs(w) * GROUP;
                let (mut fast, mut slow) = (vec![7u32; len], vec![7u32; len]);
                transpose_group(&q, h, w, g, &mut fast);
                transpose_group_reference(&q, h, w, g, &mut slow);
                assert_eq!(fast, slow, "h {h} w {w} group {g}");
            }
        }
    }

    /// A fold of one chunk: query pairs, rows, state, scratch.
    type Fold<'a> = &'a dyn Fn(&[u32], &[&[bf16]], &mut [f32], &mut [f32]);

    /// One token's chunks folded by `fold` (task 0 of all positions, all groups).
    fn fold_all(shape: Shape, q_cat: &[f32], rows: &[Vec<bf16>], fold: Fold<'_>) -> Vec<f32> {
        let Shape { h, c, w, .. } = shape;
        let mut qt = vec![0u32; query_len(h, w)];
        for g in 0..groups(h) {
            transpose_group(q_cat, h, w, g, &mut qt[g * pairs(w) * GROUP..]);
        }
        let mut state = vec![0.0; state_len(h, c)];
        reset_state(&mut state, c);
        let mut scratch = vec![0.0; scratch_len(h)];
        for chunk in rows.chunks(CHUNK_ROWS) {
            let refs: Vec<&[bf16]> = chunk.iter().map(|r| r.as_slice()).collect();
            fold(&qt, &refs, &mut state, &mut scratch);
        }
        state
    }

    /// The AVX-512 BF16 kernel against the scalar reference, bit for bit, on V2-Lite's
    /// shape and ragged ones (odd widths and row counts, heads past a group, columns
    /// past a tile), with some subnormal cache values.
    #[test]
    fn the_bf16_kernel_matches_the_reference_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        for (h, c, dr, positions) in [
            (16, 512, 64, vec![1, 7, 64, 65, 300]),
            (4, 32, 16, vec![1, 3, 129]),
            (21, 72, 9, vec![5, 200]),
            (40, 64, 16, vec![3, 130]),
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
                let rows: Vec<Vec<bf16>> = (0..n)
                    .map(|s| {
                        test_values(w + 3, (1000 + s) as u64)
                            .into_iter()
                            .enumerate()
                            .map(|(i, v)| bf16::from_f32(if i % 97 == 5 { v * 1e-39 } else { v }))
                            .collect()
                    })
                    .collect();
                let groups = 0..groups(h);
                let want = fold_all(shape, &q_cat, &rows, &|qt, r, st, sc| {
                    fold_chunk_reference(shape, groups.clone(), qt, r, st, sc)
                });
                let got = fold_all(shape, &q_cat, &rows, &|qt, r, st, sc| {
                    fold_chunk(shape, groups.clone(), qt, r, &[], st, sc)
                });
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "h {h} c {c} w {w} n {n}");
            }
        }
    }

    /// The arithmetic's step is the instruction's (both orders of the pair differ from
    /// it on some operands; the reference's does not on any).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_reference_step_is_vdpbf16ps() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn hardware(acc: f32, a: u32, b: u32) -> f32 {
            let bh = |v: u32| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(v as i32));
            let r = _mm512_dpbf16_ps(_mm512_set1_ps(acc), bh(a), bh(b));
            _mm_cvtss_f32(_mm512_castps512_ps128(r))
        }
        let v = test_values(400_000, 7);
        for (i, c) in v.chunks_exact(5).enumerate() {
            // Magnitudes from 2^-140 to 2^30: subnormal operands and results too.
            let scale = |t: f32| 2f32.powi(((t.abs() * 1e4) as i32 % 170) - 140);
            let b = |x: f32, t: f32| round(x * scale(t));
            let (a, bb) = (
                pair(b(c[0], c[1]), b(c[1], c[2])),
                pair(b(c[2], c[3]), b(c[3], c[4])),
            );
            let acc = c[4] * scale(c[0]);
            // SAFETY: the CPU has AVX-512 BF16 (checked).
            let hw = unsafe { hardware(acc, a, bb) };
            assert_eq!(hw.to_bits(), dp(acc, a, bb).to_bits(), "case {i}");
        }
    }

    /// Multiply-adds per second of one core folding a cache-resident V2-Lite chunk (16
    /// heads, 64 rows of 576 bf16 values), with the score and weighted-sum halves alone
    /// (`cargo test --release -p dsv2-cpu --lib bf16_fold_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bf16_fold_timing() {
        if !available() {
            return;
        }
        let (h, c, w) = (16, 512, 576);
        let shape = Shape {
            h,
            c,
            w,
            scale: 0.05,
        };
        let q_cat = test_values(h * w, 1);
        let rows: Vec<Vec<bf16>> = (0..CHUNK_ROWS)
            .map(|s| {
                test_values(w, 9 + s as u64)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[bf16]> = rows.iter().map(|r| r.as_slice()).collect();
        let mut qt = vec![0u32; query_len(h, w)];
        transpose_group(&q_cat, h, w, 0, &mut qt);
        let mut state = vec![0.0; state_len(h, c)];
        let mut scratch = vec![0.0; scratch_len(h)];
        crate::flash::reset_state(&mut state, c);
        let reps = 4000;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            fold_chunk(shape, 0..1, &qt, &refs, &[], &mut state, &mut scratch);
            crate::flash::reset_state(&mut state, c);
        }
        let s = t.elapsed().as_secs_f64();
        let macs = (reps * CHUNK_ROWS * h * (w + c)) as f64;
        eprintln!(
            "bf16 fold: {:.1} GMAC/s on one core ({:.2} us a chunk)",
            macs / s / 1e9,
            s / reps as f64 * 1e6
        );
    }
}
