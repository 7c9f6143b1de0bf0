//! Register-tiled kernels of the absorbed MLA attention over the latent cache.
//!
//! At 1K cached tokens a V2-Lite decode token computes ~9M multiply-adds of scores and
//! ~8M of weighted sums per layer; as one `dot` or `axpy` per (head, position) they were
//! load/store bound (each `axpy` reloads and rewrites its output row) and cost ~1 ms a
//! layer, far above the 2.4 MB of cache the layer reads. Here a tile of 4 heads × 4 cache
//! rows keeps 16 accumulators in registers for the scores, and a tile of up to 8 heads ×
//! 32 latent columns keeps its outputs in registers across all positions.
//!
//! Each output has one fixed arithmetic, whatever the instruction set and however the
//! work is split across threads (tested bit for bit against [`dots_portable`] and
//! [`weighted_sum_portable`]):
//! - a score is a 16-lane dot product: lane `j` accumulates, with fused multiply-adds in
//!   order, the products at `k ≡ j (mod 16)` (a short last chunk only touches its lanes);
//!   the lanes are then summed as `a[j] + a[j + 8]`, then `+ 4`, `+ 2`, `+ 1`;
//! - a weighted sum is one fused multiply-add per position, in position order, from 0;
//!   over more than [`SUM_CHUNK`] positions the attention sums each chunk of that many
//!   so, then adds the chunks' results in order ([`weighted_sum_rows`] reads a chunk's
//!   rows once, in order, where the column-split [`weighted_sum`] reads a stripe of every
//!   row per task).

use std::ops::Range;

use crate::kernels::fma;
#[cfg(target_arch = "x86_64")]
use crate::matmul::Kind;
use crate::matmul::KindOf;

/// Lanes of a score's dot product (and of the softmax's sums).
pub(crate) const LANES: usize = 16;
/// Query rows (heads) and cache rows of a score tile.
pub(crate) const DOT_TILE: usize = 4;
/// Heads of a weighted-sum tile.
pub(crate) const SUM_HEADS: usize = 8;
/// Columns of a weighted-sum tile.
pub(crate) const SUM_COLS: usize = 32;

/// The instruction paths of the f32 kernels here and in [`crate::softmax`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if dsv2_core::isa::avx512() {
                return Isa::Avx512;
            }
            if dsv2_core::isa::avx2() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// `out[i][j] = q[i] · rows[j]` for `i < nq`, `j < nr` (both ≤ [`DOT_TILE`]; the other
/// entries of `out` are unspecified). Every `q[i]` and `rows[j]` has the same length;
/// unused slots may repeat a used slice.
#[inline]
pub(crate) fn dots<E: KindOf>(
    q: [&[f32]; DOT_TILE],
    nq: usize,
    rows: [&[E]; DOT_TILE],
    nr: usize,
) -> [[f32; DOT_TILE]; DOT_TILE] {
    dots_isa(isa(), q, nq, rows, nr)
}

fn dots_isa<E: KindOf>(
    isa: Isa,
    q: [&[f32]; DOT_TILE],
    nq: usize,
    rows: [&[E]; DOT_TILE],
    nr: usize,
) -> [[f32; DOT_TILE]; DOT_TILE] {
    let w = q[0].len();
    assert!(
        q.iter().all(|s| s.len() == w)
            && rows.iter().all(|s| s.len() == w)
            && nq <= DOT_TILE
            && nr <= DOT_TILE,
        "dot tile shapes"
    );
    match isa {
        // SAFETY: the features were detected; all slices are `w` long (checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dots512(q, rows, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dots_avx2(q, rows, w) },
        Isa::Portable => dots_portable(q, nq, rows, nr),
    }
}

/// The scalar reference of [`dots`] (cache rows widened to f32 exactly).
pub(crate) fn dots_portable<E: KindOf>(
    q: [&[f32]; DOT_TILE],
    nq: usize,
    rows: [&[E]; DOT_TILE],
    nr: usize,
) -> [[f32; DOT_TILE]; DOT_TILE] {
    let mut out = [[0.0; DOT_TILE]; DOT_TILE];
    for i in 0..nq {
        for j in 0..nr {
            let mut acc = [0.0f32; LANES];
            for (k, (a, b)) in q[i].iter().zip(rows[j]).enumerate() {
                acc[k % LANES] = fma(*a, b.to_f32(), acc[k % LANES]);
            }
            out[i][j] = reduce_lanes(acc);
        }
    }
    out
}

/// Every instruction path this CPU can run (for the tests that compare them).
#[cfg(test)]
#[allow(unused_mut)] // x86-only pushes
pub(crate) fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
        {
            v.push(Isa::Avx512);
        }
    }
    v
}

/// `a[j] + a[j + 8]`, then `+ 4`, `+ 2`, `+ 1`.
pub(crate) fn reduce_lanes(mut a: [f32; LANES]) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for j in 0..half {
            a[j] += a[j + half];
        }
        half /= 2;
    }
    a[0]
}

/// Where the cached rows of one sequence are: `block(b)` is the contiguous
/// `block_size × width` rows of positions `b·block_size..`.
pub(crate) struct Rows<B> {
    pub block: B,
    pub block_size: usize,
    pub width: usize,
}

impl<'r, E: 'r, B: Fn(usize) -> &'r [E]> Rows<B> {
    /// Calls `f(s, row)` for positions `0..positions` in order (`row` is `width` long).
    #[inline(always)]
    fn for_each(&self, positions: usize, mut f: impl FnMut(usize, &'r [E])) {
        let mut s = 0;
        let mut b = 0;
        while s < positions {
            let n = self.block_size.min(positions - s);
            let block = &(self.block)(b)[..n * self.width];
            for row in block.chunks_exact(self.width) {
                f(s, row);
                s += 1;
            }
            b += 1;
        }
    }

    /// The row of position `s` (`width` long).
    #[inline(always)]
    pub(crate) fn row(&self, s: usize) -> &'r [E] {
        &(self.block)(s / self.block_size)[(s % self.block_size) * self.width..][..self.width]
    }
}

/// Positions of one chunk of a long weighted sum ([`weighted_sum_rows`]).
pub(crate) const SUM_CHUNK: usize = 512;
/// Rows a [`weighted_sum_rows`] pass keeps hot while every (head, column) tile runs over
/// them (the AVX-512 path).
#[cfg(target_arch = "x86_64")]
const SUM_ROWS: usize = 16;

/// `out[i·c + col] = Σ_{s ∈ positions} p[i·p_stride + s] · row(s)[col]` for heads `i < nh`
/// and columns `col < c` (`out` holds `nh · c` values; overwritten): per output one chain
/// of fused multiply-adds from 0 in position order, as [`weighted_sum`] computes it over
/// its column stripe. Here the work is split by positions, not columns: the rows are read
/// in order, [`SUM_ROWS`] at a time, each by every tile while it is in the first-level
/// cache, so a cache that comes from memory streams (split by columns, each task reads a
/// 128-byte stripe of every row, which ran at ~10 GB/s from memory).
pub(crate) fn weighted_sum_rows<'r, E: KindOf>(
    p: &[f32],
    p_stride: usize,
    nh: usize,
    positions: Range<usize>,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    c: usize,
    out: &mut [f32],
) {
    weighted_sum_rows_isa(isa(), p, p_stride, nh, positions, rows, c, out)
}

#[allow(clippy::too_many_arguments)]
fn weighted_sum_rows_isa<'r, E: KindOf>(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    nh: usize,
    positions: Range<usize>,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    c: usize,
    out: &mut [f32],
) {
    assert!(
        out.len() >= nh * c
            && c <= rows.width
            && (nh == 0 || p.len() >= (nh - 1) * p_stride + positions.end),
        "weighted-sum rows shapes"
    );
    match isa {
        // SAFETY: the features were detected; shapes checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            x86::weighted_sum_rows512(p, p_stride, nh, positions, rows, c, out)
        },
        // SAFETY: AVX2 and FMA detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            x86::weighted_sum_rows_avx2(p, p_stride, nh, positions, rows, c, out)
        },
        Isa::Portable => weighted_sum_rows_portable(p, p_stride, nh, positions, rows, c, out),
    }
}

/// The scalar reference of [`weighted_sum_rows`] (also the AVX2 path, compiled with FMA).
#[inline(always)]
pub(crate) fn weighted_sum_rows_portable<'r, E: KindOf>(
    p: &[f32],
    p_stride: usize,
    nh: usize,
    positions: Range<usize>,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    c: usize,
    out: &mut [f32],
) {
    let out = &mut out[..nh * c];
    out.fill(0.0);
    for s in positions {
        let row = &rows.row(s)[..c];
        for (i, o) in out.chunks_exact_mut(c).enumerate() {
            let ps = p[i * p_stride + s];
            for (acc, v) in o.iter_mut().zip(row) {
                *acc = ps.mul_add(v.to_f32(), *acc);
            }
        }
    }
}

/// `out[i][c − cols.start] = Σ_{s < positions} p[i][s] · row(s)[c]` for heads `i < nh`
/// (≤ [`SUM_HEADS`]) and columns `cols` (≤ [`SUM_COLS`] of them), each a chain of fused
/// multiply-adds in position order. `out[i]` must hold `cols.len()` values; it is
/// overwritten.
#[inline]
pub(crate) fn weighted_sum<'r, E: KindOf>(
    p: [&[f32]; SUM_HEADS],
    nh: usize,
    positions: usize,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    cols: Range<usize>,
    out: &mut [[f32; SUM_COLS]; SUM_HEADS],
) {
    weighted_sum_isa(isa(), p, nh, positions, rows, cols, out)
}

fn weighted_sum_isa<'r, E: KindOf>(
    isa: Isa,
    p: [&[f32]; SUM_HEADS],
    nh: usize,
    positions: usize,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    cols: Range<usize>,
    out: &mut [[f32; SUM_COLS]; SUM_HEADS],
) {
    assert!(
        nh <= SUM_HEADS && cols.len() <= SUM_COLS && p[..nh].iter().all(|p| p.len() >= positions),
        "weighted-sum tile shapes"
    );
    match isa {
        // SAFETY: the features were detected; shapes checked above, and every row is
        // checked to cover `cols` inside.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::weighted_sum512(p, nh, positions, rows, cols, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::weighted_sum_avx2(p, nh, positions, rows, cols, out) },
        Isa::Portable => weighted_sum_portable(p, nh, positions, rows, cols, out),
    }
}

/// The scalar reference of [`weighted_sum`] (cache rows widened to f32 exactly).
pub(crate) fn weighted_sum_portable<'r, E: KindOf>(
    p: [&[f32]; SUM_HEADS],
    nh: usize,
    positions: usize,
    rows: &Rows<impl Fn(usize) -> &'r [E]>,
    cols: Range<usize>,
    out: &mut [[f32; SUM_COLS]; SUM_HEADS],
) {
    for o in out[..nh].iter_mut() {
        o.fill(0.0);
    }
    rows.for_each(positions, |s, row| {
        let r = &row[cols.clone()];
        for (i, o) in out[..nh].iter_mut().enumerate() {
            let ps = p[i][s];
            for (acc, v) in o.iter_mut().zip(r) {
                *acc = ps.mul_add(v.to_f32(), *acc);
            }
        }
    });
}

/// `out[c] = Σ_j q[j] · w[j][c]` over the `q.len()` rows of `w` (`[rows, C]` row-major,
/// `C = out.len()`): a query moved into latent space through `W_UK`. Per column one
/// chain of fused multiply-adds in row order; the AVX-512 path keeps 256 columns in
/// registers across all rows (the `axpy` form re-read and re-wrote them per row). The
/// attention calls it through [`absorb_tokens`], several queries per pass over `w`.
fn absorb_isa<E: KindOf>(isa: Isa, q: &[f32], w: &[E], out: &mut [f32]) {
    let c = out.len();
    assert!(w.len() >= q.len() * c, "absorb shapes");
    match isa {
        // SAFETY: AVX-512 F detected; `w` holds q.len() rows of c (checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::absorb512(q, w, out) },
        // SAFETY: AVX2 and FMA detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::absorb_avx2(q, w, out) },
        Isa::Portable => absorb_portable(q, w, out),
    }
}

/// The scalar reference of [`absorb_isa`].
#[inline(always)]
pub(crate) fn absorb_portable<E: KindOf>(q: &[f32], w: &[E], out: &mut [f32]) {
    let c = out.len();
    out.fill(0.0);
    for (j, &qj) in q.iter().enumerate() {
        for (o, wv) in out.iter_mut().zip(&w[j * c..(j + 1) * c]) {
            *o = fma(qj, wv.to_f32(), *o);
        }
    }
}

/// `out[j] = w[j] · x` for the `out.len()` rows of `w` (`[rows, x.len()]`): latent
/// outputs projected through `W_UV`. Each a 16-lane dot product as [`dots`] computes it.
/// The attention calls it through [`project_tokens`], several inputs per pass over `w`.
fn project_isa<E: KindOf>(isa: Isa, w: &[E], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    assert!(w.len() >= out.len() * k, "project shapes");
    match isa {
        // SAFETY: AVX-512 F detected; `w` holds out.len() rows of k (checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::project512(w, x, out) },
        // SAFETY: AVX2 and FMA detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::project_avx2(w, x, out) },
        Isa::Portable => project_portable(w, x, out),
    }
}

/// The scalar reference of [`project_isa`].
#[inline(always)]
pub(crate) fn project_portable<E: KindOf>(w: &[E], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = [0.0f32; LANES];
        for (t, (wv, xv)) in w[j * k..(j + 1) * k].iter().zip(x).enumerate() {
            acc[t % LANES] = fma(wv.to_f32(), *xv, acc[t % LANES]);
        }
        *o = reduce_lanes(acc);
    }
}

/// Queries of one tile of [`absorb_tokens`] / [`project_tokens`].
pub(crate) const TOKENS: usize = 4;

/// `out[i] = absorb(q[i], w)` for the first `n ≤ TOKENS` queries (`out[i]` the `c`
/// values at that pointer): each widened row of `w` serves all of them, with each
/// output's arithmetic exactly [`absorb_isa`]'s (bit-identical).
///
/// # Safety
/// Each `out[i]`, `i < n`, must be valid for `c` writes, disjoint from the others and
/// from `q` and `w`.
pub(crate) unsafe fn absorb_tokens<E: KindOf>(
    q: [&[f32]; TOKENS],
    n: usize,
    w: &[E],
    c: usize,
    out: [*mut f32; TOKENS],
) {
    assert!(
        n <= TOKENS && w.len() >= q[0].len() * c,
        "absorb_tokens shapes"
    );
    assert!(
        q[..n].iter().all(|qi| qi.len() == q[0].len()),
        "absorb_tokens queries"
    );
    match isa() {
        // SAFETY: AVX-512 F detected; shapes checked; `out` as this function's contract.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            match n {
                // One query: the one-query kernel's 256-column passes (2 over a V2 row
                // of 512) stream the matrix better than 64-column tiles (8 passes):
                // a V2 layer's decode attention at batch 1 took ~45% longer.
                1 => x86::absorb512(q[0], w, std::slice::from_raw_parts_mut(out[0], c)),
                2 => x86::absorb512_tokens::<E, 2>(q, w, c, out),
                3 => x86::absorb512_tokens::<E, 3>(q, w, c, out),
                _ => x86::absorb512_tokens::<E, TOKENS>(q, w, c, out),
            }
        },
        isa => {
            for i in 0..n {
                // SAFETY: the caller's contract.
                let o = unsafe { std::slice::from_raw_parts_mut(out[i], c) };
                absorb_isa(isa, q[i], w, o);
            }
        }
    }
}

/// `out[i] = project(w, x[i])` for the first `n ≤ TOKENS` inputs (`out[i]` the
/// `rows` values at that pointer): each widened row of `w` serves all of them, with
/// each output's arithmetic exactly [`project_isa`]'s (bit-identical).
///
/// # Safety
/// Each `out[i]`, `i < n`, must be valid for `rows` writes, disjoint from the others and
/// from `x` and `w`.
pub(crate) unsafe fn project_tokens<E: KindOf>(
    w: &[E],
    rows: usize,
    x: [&[f32]; TOKENS],
    n: usize,
    out: [*mut f32; TOKENS],
) {
    assert!(
        n <= TOKENS && w.len() >= rows * x[0].len(),
        "project_tokens shapes"
    );
    assert!(
        x[..n].iter().all(|xi| xi.len() == x[0].len()),
        "project_tokens inputs"
    );
    match isa() {
        // SAFETY: AVX-512 F detected; shapes checked; `out` as this function's contract.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            match n {
                1 => x86::project512_tokens::<E, 1>(w, rows, x, out),
                2 => x86::project512_tokens::<E, 2>(w, rows, x, out),
                3 => x86::project512_tokens::<E, 3>(w, rows, x, out),
                _ => x86::project512_tokens::<E, TOKENS>(w, rows, x, out),
            }
        },
        isa => {
            for i in 0..n {
                // SAFETY: the caller's contract.
                let o = unsafe { std::slice::from_raw_parts_mut(out[i], rows) };
                project_isa(isa, w, x[i], o);
            }
        }
    }
}

/// Sums the 16 lanes of a register in the fixed tree of [`reduce_lanes`].
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::reduce512;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// 16 stored elements at `p` widened to f32; `m`: the lanes to load (others 0).
    #[inline(always)]
    unsafe fn load16<E: KindOf>(p: *const E, m: __mmask16) -> __m512 {
        // SAFETY: the caller's pointer covers the masked lanes.
        unsafe {
            match E::KIND {
                Kind::F32 => _mm512_maskz_loadu_ps(m, p as *const f32),
                Kind::Bf16 => {
                    let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                Kind::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)),
            }
        }
    }

    /// 8 stored elements at `p` widened to f32 (AVX2).
    #[inline(always)]
    unsafe fn load8<E: KindOf>(p: *const E) -> __m256 {
        // SAFETY: the caller's pointer covers 8 elements.
        unsafe {
            match E::KIND {
                Kind::F32 => _mm256_loadu_ps(p as *const f32),
                Kind::Bf16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                }
                Kind::F16 => load8_partial(p, 8),
            }
        }
    }

    /// The first `len` (≤ 8) elements at `p` widened to f32, the other lanes 0 (AVX2).
    #[inline(always)]
    unsafe fn load8_partial<E: KindOf>(p: *const E, len: usize) -> __m256 {
        // SAFETY: the caller's pointer covers `len` elements.
        unsafe {
            if len == 8 && E::KIND != Kind::F16 {
                return load8(p);
            }
            let mut b = [0.0f32; 8];
            for (t, v) in b[..len].iter_mut().enumerate() {
                *v = (*p.add(t)).to_f32();
            }
            _mm256_loadu_ps(b.as_ptr())
        }
    }

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// [`absorb_portable`] in AVX2 + FMA: 64 columns at a time with their chains in 8
    /// registers over all rows (the portable `axpy` form re-read and re-wrote every
    /// column per row), then 8 at a time, then one; the same fused operations per column.
    ///
    /// # Safety
    /// AVX2 and FMA; `w` holds `q.len()` rows of `out.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn absorb_avx2<E: KindOf>(q: &[f32], w: &[E], out: &mut [f32]) {
        const VECS: usize = 8;
        let c = out.len();
        assert!(w.len() >= q.len() * c, "absorb shapes");
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        let mut c0 = 0;
        // SAFETY (all loads and stores): row j's columns c0 .. c0 + 8·VECS (or 8) lie
        // inside `w` (checked), columns c0.. inside `out`.
        unsafe {
            while c0 + VECS * 8 <= c {
                let mut acc = [_mm256_setzero_ps(); VECS];
                for (j, &qj) in q.iter().enumerate() {
                    let qv = _mm256_set1_ps(qj);
                    let row = wp.add(j * c + c0);
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, load8(row.add(v * 8)), *a);
                    }
                }
                for (v, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(op.add(c0 + v * 8), *a);
                }
                c0 += VECS * 8;
            }
            while c0 + 8 <= c {
                let mut acc = _mm256_setzero_ps();
                for (j, &qj) in q.iter().enumerate() {
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(qj), load8(wp.add(j * c + c0)), acc);
                }
                _mm256_storeu_ps(op.add(c0), acc);
                c0 += 8;
            }
        }
        for col in c0..c {
            let mut acc = 0.0f32;
            for (j, &qj) in q.iter().enumerate() {
                acc = qj.mul_add(w[j * c + col].to_f32(), acc);
            }
            out[col] = acc;
        }
    }

    /// [`project_portable`] in AVX2 + FMA: the same fused operations per lane, the same
    /// reduction.
    ///
    /// # Safety
    /// AVX2 and FMA; `w` holds `out.len()` rows of `x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn project_avx2<E: KindOf>(w: &[E], x: &[f32], out: &mut [f32]) {
        // Four rows at a time: 8 chains in flight instead of 2 (a row alone waits on the
        // fused multiply-add's latency); each row's 16 lanes are two registers.
        const ROWS: usize = 4;
        let (k, n) = (x.len(), out.len());
        assert!(w.len() >= n * k, "project shapes");
        let full = k / LANES * LANES;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut j0 = 0;
        while j0 < n {
            let nr = (n - j0).min(ROWS);
            let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
            // SAFETY: rows j0 .. j0 + nr of `w` hold k values each (checked); a short
            // group repeats its last row (computed, not stored).
            unsafe {
                let rows: [*const E; ROWS] =
                    std::array::from_fn(|r| wp.add((j0 + r.min(nr - 1)) * k));
                for t in (0..full).step_by(LANES) {
                    let (x0, x1) = (_mm256_loadu_ps(xp.add(t)), _mm256_loadu_ps(xp.add(t + 8)));
                    for (a, row) in acc.iter_mut().zip(rows) {
                        a[0] = _mm256_fmadd_ps(load8(row.add(t)), x0, a[0]);
                        a[1] = _mm256_fmadd_ps(load8(row.add(t + 8)), x1, a[1]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(nr) {
                let mut lanes = [0.0f32; LANES];
                // SAFETY: 16 floats.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
                }
                let row = &w[(j0 + r) * k..(j0 + r + 1) * k];
                for t in full..k {
                    lanes[t % LANES] = row[t].to_f32().mul_add(x[t], lanes[t % LANES]);
                }
                out[j0 + r] = reduce_lanes(lanes);
            }
            j0 += nr;
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL; `w` holds `q.len()` rows of `out.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn absorb512<E: KindOf>(q: &[f32], w: &[E], out: &mut [f32]) {
        const VECS: usize = 16;
        let c = out.len();
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        let mut c0 = 0;
        // SAFETY (all loads and stores): row j's columns c0 .. c0 + 256 (or the masked
        // rest) lie inside `w`, and columns c0.. inside `out`.
        unsafe {
            // 256 columns at a time, accumulators in registers over all rows.
            while c0 + VECS * LANES <= c {
                let mut acc = [_mm512_setzero_ps(); VECS];
                for (j, &qj) in q.iter().enumerate() {
                    let qv = _mm512_set1_ps(qj);
                    let row = wp.add(j * c + c0);
                    // Rows ahead: this pass reads a strided part of each row.
                    let ahead = wp.wrapping_add((j + 4) * c + c0) as *const i8;
                    for line in (0..VECS * LANES * size_of::<E>()).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
                    }
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(qv, load16(row.add(v * LANES), 0xffff), *a);
                    }
                }
                for (v, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(op.add(c0 + v * LANES), *a);
                }
                c0 += VECS * LANES;
            }
            // The rest, 16 columns at a time.
            while c0 < c {
                let m = mask16(c - c0);
                let mut acc = _mm512_setzero_ps();
                for (j, &qj) in q.iter().enumerate() {
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(qj), load16(wp.add(j * c + c0), m), acc);
                }
                _mm512_mask_storeu_ps(op.add(c0), m, acc);
                c0 += LANES;
            }
        }
    }

    /// [`super::absorb_tokens`] for `N` queries: tiles of `N` queries × 64 columns
    /// (4 vectors), each row's 64 values widened once for all `N`; per output the FMA
    /// chain of [`absorb512`] (rows in order from zero).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `w` holds `q[0].len()` rows of `c`; `out[i]` (i < N) valid for
    /// `c` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn absorb512_tokens<E: KindOf, const N: usize>(
        q: [&[f32]; TOKENS],
        w: &[E],
        c: usize,
        out: [*mut f32; TOKENS],
    ) {
        const VECS: usize = 4;
        let rows = q[0].len();
        let wp = w.as_ptr();
        let mut c0 = 0;
        // SAFETY (all loads and stores): row j's columns c0.. (masked to c) lie inside
        // `w`, and columns c0.. of each output inside it (the caller's contract).
        unsafe {
            while c0 < c {
                let masks: [__mmask16; VECS] =
                    std::array::from_fn(|v| mask16(c.saturating_sub(c0 + v * LANES)));
                let mut acc = [[_mm512_setzero_ps(); VECS]; N];
                for j in 0..rows {
                    let row = wp.add(j * c + c0);
                    let ahead = wp.wrapping_add((j + 4) * c + c0) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                    let wv: [__m512; VECS] = std::array::from_fn(|v| {
                        if masks[v] == 0 {
                            _mm512_setzero_ps()
                        } else {
                            load16(row.add(v * LANES), masks[v])
                        }
                    });
                    for i in 0..N {
                        let qv = _mm512_set1_ps(*q[i].get_unchecked(j));
                        for v in 0..VECS {
                            acc[i][v] = _mm512_fmadd_ps(qv, wv[v], acc[i][v]);
                        }
                    }
                }
                for i in 0..N {
                    for v in 0..VECS {
                        if masks[v] != 0 {
                            _mm512_mask_storeu_ps(out[i].add(c0 + v * LANES), masks[v], acc[i][v]);
                        }
                    }
                }
                c0 += VECS * LANES;
            }
        }
    }

    /// [`super::project_tokens`] for `N` inputs: tiles of 4 rows × `N` inputs, each
    /// row's 16 values widened once for all `N`; per output the lane chains and lane sum
    /// of [`project512`].
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `w` holds `rows` rows of `x[0].len()`; `out[i]` (i < N) valid for
    /// `rows` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::needless_range_loop)] // `r` indexes the rows of `w` and `acc` alike
    pub(super) unsafe fn project512_tokens<E: KindOf, const N: usize>(
        w: &[E],
        rows: usize,
        x: [&[f32]; TOKENS],
        out: [*mut f32; TOKENS],
    ) {
        const ROWS: usize = 4;
        let k = x[0].len();
        let wp = w.as_ptr();
        let mut j0 = 0;
        // SAFETY (all loads and stores): x[i][t..] and rows j0.. at t, masked to k; the
        // outputs as the caller's contract.
        unsafe {
            while j0 < rows {
                let nr = (rows - j0).min(ROWS);
                let mut acc = [[_mm512_setzero_ps(); ROWS]; N];
                let mut t = 0;
                while t < k {
                    let m = mask16(k - t);
                    let xv: [__m512; N] =
                        std::array::from_fn(|i| _mm512_maskz_loadu_ps(m, x[i].as_ptr().add(t)));
                    for r in 0..nr {
                        _mm_prefetch::<_MM_HINT_T0>(
                            wp.wrapping_add((j0 + ROWS + r) * k + t) as *const i8
                        );
                        let wv = load16(wp.add((j0 + r) * k + t), m);
                        for i in 0..N {
                            // Masked-off lanes keep their value, as in the reference.
                            acc[i][r] = _mm512_mask3_fmadd_ps(wv, xv[i], acc[i][r], m);
                        }
                    }
                    t += LANES;
                }
                for i in 0..N {
                    for r in 0..nr {
                        *out[i].add(j0 + r) = reduce512(acc[i][r]);
                    }
                }
                j0 += nr;
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL; `w` holds `out.len()` rows of `x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn project512<E: KindOf>(w: &[E], x: &[f32], out: &mut [f32]) {
        const ROWS: usize = 4;
        let (k, rows) = (x.len(), out.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut j0 = 0;
        // SAFETY (all loads): x[t..] and rows j0.. at t, masked to k.
        unsafe {
            // Four rows at a time (four independent chains).
            while j0 + ROWS <= rows {
                let mut acc = [_mm512_setzero_ps(); ROWS];
                let mut t = 0;
                while t < k {
                    let m = mask16(k - t);
                    let xv = _mm512_maskz_loadu_ps(m, xp.add(t));
                    for (r, a) in acc.iter_mut().enumerate() {
                        // The next four rows, a tile ahead: four short strided streams
                        // are more than the hardware prefetcher picks up in time.
                        _mm_prefetch::<_MM_HINT_T0>(
                            wp.wrapping_add((j0 + ROWS + r) * k + t) as *const i8
                        );
                        let wv = load16(wp.add((j0 + r) * k + t), m);
                        // Masked-off lanes keep their value, as in the reference.
                        *a = _mm512_mask3_fmadd_ps(wv, xv, *a, m);
                    }
                    t += LANES;
                }
                for (r, a) in acc.iter().enumerate() {
                    out[j0 + r] = reduce512(*a);
                }
                j0 += ROWS;
            }
            while j0 < rows {
                let mut acc = _mm512_setzero_ps();
                let mut t = 0;
                while t < k {
                    let m = mask16(k - t);
                    let xv = _mm512_maskz_loadu_ps(m, xp.add(t));
                    acc = _mm512_mask3_fmadd_ps(load16(wp.add(j0 * k + t), m), xv, acc, m);
                    t += LANES;
                }
                out[j0] = reduce512(acc);
                j0 += 1;
            }
        }
    }

    /// # Safety
    /// AVX-512 F; every slice is `w` long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dots512<E: KindOf>(
        q: [&[f32]; DOT_TILE],
        rows: [&[E]; DOT_TILE],
        w: usize,
    ) -> [[f32; DOT_TILE]; DOT_TILE] {
        let mut acc = [[_mm512_setzero_ps(); DOT_TILE]; DOT_TILE];
        let full = w / LANES * LANES;
        let mut k = 0;
        // SAFETY (loads): k + 16 ≤ w, or a mask of the w − k remaining lanes.
        unsafe {
            while k < full {
                let r: [__m512; DOT_TILE] =
                    std::array::from_fn(|j| load16(rows[j].as_ptr().add(k), 0xffff));
                for i in 0..DOT_TILE {
                    let qv = _mm512_loadu_ps(q[i].as_ptr().add(k));
                    for j in 0..DOT_TILE {
                        acc[i][j] = _mm512_fmadd_ps(qv, r[j], acc[i][j]);
                    }
                }
                k += LANES;
            }
            if k < w {
                let m: __mmask16 = (1u32 << (w - k)) as u16 - 1;
                let r: [__m512; DOT_TILE] =
                    std::array::from_fn(|j| load16(rows[j].as_ptr().add(k), m));
                for i in 0..DOT_TILE {
                    let qv = _mm512_maskz_loadu_ps(m, q[i].as_ptr().add(k));
                    for j in 0..DOT_TILE {
                        acc[i][j] = _mm512_mask3_fmadd_ps(qv, r[j], acc[i][j], m);
                    }
                }
            }
        }
        let mut out = [[0.0; DOT_TILE]; DOT_TILE];
        for i in 0..DOT_TILE {
            for j in 0..DOT_TILE {
                // SAFETY: AVX-512 F (this function's features).
                out[i][j] = unsafe { reduce512(acc[i][j]) };
            }
        }
        out
    }

    /// The lane tree of [`reduce_lanes`] on one register.
    #[inline(always)]
    pub(crate) unsafe fn reduce512(a: __m512) -> f32 {
        unsafe {
            let lo = _mm512_castps512_ps256(a);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
            reduce256(_mm256_add_ps(lo, hi))
        }
    }

    /// `a[j] + a[j + 4]`, then `+ 2`, `+ 1` of eight lanes.
    #[inline(always)]
    unsafe fn reduce256(a: __m256) -> f32 {
        unsafe {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
            _mm_cvtss_f32(s1)
        }
    }

    /// Mask of the first `n` (< 8) lanes for `maskload`.
    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// # Safety
    /// AVX2 and FMA; every slice is `w` long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2<E: KindOf>(
        q: [&[f32]; DOT_TILE],
        rows: [&[E]; DOT_TILE],
        w: usize,
    ) -> [[f32; DOT_TILE]; DOT_TILE] {
        // Lanes 0..8 and 8..16 of each 16-lane accumulator.
        let mut lo = [[_mm256_setzero_ps(); DOT_TILE]; DOT_TILE];
        let mut hi = [[_mm256_setzero_ps(); DOT_TILE]; DOT_TILE];
        let mut k = 0;
        // SAFETY (loads): within the `w` elements, or masked to them.
        unsafe {
            while k + LANES <= w {
                for i in 0..DOT_TILE {
                    let (ql, qh) = (
                        _mm256_loadu_ps(q[i].as_ptr().add(k)),
                        _mm256_loadu_ps(q[i].as_ptr().add(k + 8)),
                    );
                    for j in 0..DOT_TILE {
                        let r = rows[j].as_ptr().add(k);
                        lo[i][j] = _mm256_fmadd_ps(ql, load8(r), lo[i][j]);
                        hi[i][j] = _mm256_fmadd_ps(qh, load8(r.add(8)), hi[i][j]);
                    }
                }
                k += LANES;
            }
            if k < w {
                let rest = w - k;
                let (ml, mh) = (mask8(rest.min(8)), mask8(rest.saturating_sub(8)));
                // The rows' last `rest` values, widened (the lanes past them stay 0).
                let tail: [[f32; LANES]; DOT_TILE] = std::array::from_fn(|j| {
                    let mut b = [0.0; LANES];
                    for (t, v) in b[..rest].iter_mut().enumerate() {
                        *v = rows[j][k + t].to_f32();
                    }
                    b
                });
                for i in 0..DOT_TILE {
                    let qp = q[i].as_ptr().add(k);
                    let (ql, qh) = (
                        _mm256_maskload_ps(qp, ml),
                        _mm256_maskload_ps(qp.add(8), mh),
                    );
                    for j in 0..DOT_TILE {
                        let r = tail[j].as_ptr();
                        // Lanes past `w` keep their accumulator (the reference never
                        // touches them).
                        lo[i][j] = blend_fma(ql, _mm256_maskload_ps(r, ml), lo[i][j], ml);
                        hi[i][j] = blend_fma(qh, _mm256_maskload_ps(r.add(8), mh), hi[i][j], mh);
                    }
                }
            }
            let mut out = [[0.0; DOT_TILE]; DOT_TILE];
            for i in 0..DOT_TILE {
                for j in 0..DOT_TILE {
                    out[i][j] = reduce256(_mm256_add_ps(lo[i][j], hi[i][j]));
                }
            }
            out
        }
    }

    /// `fma(a, b, c)` in the lanes of `mask`, `c` elsewhere.
    #[inline(always)]
    unsafe fn blend_fma(a: __m256, b: __m256, c: __m256, mask: __m256i) -> __m256 {
        unsafe { _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c), _mm256_castsi256_ps(mask)) }
    }

    /// # Safety
    /// AVX-512 F; shapes as checked by the caller; rows must cover `cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn weighted_sum512<'r, E: KindOf>(
        p: [&[f32]; SUM_HEADS],
        nh: usize,
        positions: usize,
        rows: &Rows<impl Fn(usize) -> &'r [E]>,
        cols: Range<usize>,
        out: &mut [[f32; SUM_COLS]; SUM_HEADS],
    ) {
        let n = cols.len();
        let m0: __mmask16 = if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        };
        let m1: __mmask16 = if n >= 32 {
            0xffff
        } else if n > 16 {
            ((1u32 << (n - 16)) - 1) as u16
        } else {
            0
        };
        assert!(cols.end <= rows.width, "columns past the row");
        let pp: [*const f32; SUM_HEADS] = p.map(|p| p.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; SUM_HEADS];
        rows.for_each(positions, |s, row| {
            // SAFETY: masked loads of the n ≤ 32 columns from cols.start of a `width`-long
            // row (cols.end ≤ width); p[i] has `positions` values.
            unsafe {
                let r = row.as_ptr().add(cols.start);
                let v0 = load16(r, m0);
                let v1 = load16(r.add(16.min(n)), m1);
                for i in 0..SUM_HEADS {
                    if i < nh {
                        let ps = _mm512_set1_ps(*pp[i].add(s));
                        acc[i][0] = _mm512_fmadd_ps(ps, v0, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(ps, v1, acc[i][1]);
                    }
                }
            }
        });
        for i in 0..nh {
            // SAFETY: 32 floats in out[i].
            unsafe {
                _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i][0]);
                _mm512_storeu_ps(out[i].as_mut_ptr().add(16), acc[i][1]);
            }
        }
    }

    /// [`weighted_sum_rows_portable`] compiled for AVX2 + FMA (the same fused operations).
    ///
    /// # Safety
    /// AVX2 and FMA; shapes as checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_sum_rows_avx2<'r, E: KindOf>(
        p: &[f32],
        p_stride: usize,
        nh: usize,
        positions: Range<usize>,
        rows: &Rows<impl Fn(usize) -> &'r [E]>,
        c: usize,
        out: &mut [f32],
    ) {
        weighted_sum_rows_portable(p, p_stride, nh, positions, rows, c, out)
    }

    /// # Safety
    /// AVX-512 F/BW/VL; shapes as checked by the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_sum_rows512<'r, E: KindOf>(
        p: &[f32],
        p_stride: usize,
        nh: usize,
        positions: Range<usize>,
        rows: &Rows<impl Fn(usize) -> &'r [E]>,
        c: usize,
        out: &mut [f32],
    ) {
        out[..nh * c].fill(0.0);
        let row_bytes = rows.width * std::mem::size_of::<E>();
        let mut s0 = positions.start;
        while s0 < positions.end {
            let n = SUM_ROWS.min(positions.end - s0);
            let block: [*const E; SUM_ROWS] =
                std::array::from_fn(|j| rows.row(s0 + j.min(n - 1)).as_ptr());
            // The next rows, whole, while these are summed.
            for s in s0 + SUM_ROWS..(s0 + 2 * SUM_ROWS).min(positions.end) {
                let r = rows.row(s).as_ptr() as *const i8;
                for at in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(at));
                }
            }
            for h0 in (0..nh).step_by(SUM_HEADS) {
                let hn = SUM_HEADS.min(nh - h0);
                for c0 in (0..c).step_by(SUM_COLS) {
                    let cn = SUM_COLS.min(c - c0);
                    let m0 = mask16(cn);
                    let m1 = mask16(cn.saturating_sub(16));
                    // SAFETY (all accesses): rows of `width` ≥ c columns, masked to the
                    // cn columns from c0; out has nh·c values; p has the positions.
                    unsafe {
                        let mut acc = [[_mm512_setzero_ps(); 2]; SUM_HEADS];
                        for (i, a) in acc.iter_mut().enumerate().take(hn) {
                            let o = out.as_ptr().add((h0 + i) * c + c0);
                            a[0] = _mm512_maskz_loadu_ps(m0, o);
                            a[1] = _mm512_maskz_loadu_ps(m1, o.add(16));
                        }
                        for (j, r) in block.iter().enumerate().take(n) {
                            let r = r.add(c0);
                            let v0 = load16(r, m0);
                            let v1 = load16(r.add(16), m1);
                            for (i, a) in acc.iter_mut().enumerate().take(hn) {
                                let ps =
                                    _mm512_set1_ps(*p.get_unchecked((h0 + i) * p_stride + s0 + j));
                                a[0] = _mm512_fmadd_ps(ps, v0, a[0]);
                                a[1] = _mm512_fmadd_ps(ps, v1, a[1]);
                            }
                        }
                        for (i, a) in acc.iter().enumerate().take(hn) {
                            let o = out.as_mut_ptr().add((h0 + i) * c + c0);
                            _mm512_mask_storeu_ps(o, m0, a[0]);
                            _mm512_mask_storeu_ps(o.add(16), m1, a[1]);
                        }
                    }
                }
            }
            s0 += n;
        }
    }

    /// # Safety
    /// AVX2 and FMA; shapes as checked by the caller; rows must cover `cols`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum_avx2<'r, E: KindOf>(
        p: [&[f32]; SUM_HEADS],
        nh: usize,
        positions: usize,
        rows: &Rows<impl Fn(usize) -> &'r [E]>,
        cols: Range<usize>,
        out: &mut [[f32; SUM_COLS]; SUM_HEADS],
    ) {
        // Four passes of 8 columns keep 8 heads' accumulators in registers.
        let n = cols.len();
        assert!(cols.end <= rows.width, "columns past the row");
        let pp: [*const f32; SUM_HEADS] = p.map(|p| p.as_ptr());
        for part in 0..SUM_COLS / 8 {
            let c0 = part * 8;
            if c0 >= n {
                break;
            }
            let len = (n - c0).min(8);
            let mut acc = [_mm256_setzero_ps(); SUM_HEADS];
            rows.for_each(positions, |s, row| {
                // SAFETY: masked load of columns cols.start + c0.. (< cols.end ≤ width);
                // p[i] has `positions` values.
                unsafe {
                    let v = load8_partial(row.as_ptr().add(cols.start + c0), len);
                    for i in 0..SUM_HEADS {
                        if i < nh {
                            let ps = _mm256_set1_ps(*pp[i].add(s));
                            acc[i] = _mm256_fmadd_ps(ps, v, acc[i]);
                        }
                    }
                }
            });
            for i in 0..nh {
                // SAFETY: 8 floats at c0 + 8 ≤ 32.
                unsafe { _mm256_storeu_ps(out[i].as_mut_ptr().add(c0), acc[i]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bits, test_values};

    #[test]
    /// Also over bf16 cache rows, which the kernels widen exactly.
    fn dots_agree_bit_for_bit_and_match_f64() {
        fn case<E: KindOf>(conv: impl Fn(f32) -> E) {
            for w in [1, 7, 15, 16, 17, 40, 576] {
                let q = test_values(DOT_TILE * w, w as u64);
                let r: Vec<E> = test_values(DOT_TILE * w, 99 + w as u64)
                    .into_iter()
                    .map(&conv)
                    .collect();
                let qs: [&[f32]; DOT_TILE] = std::array::from_fn(|i| &q[i * w..(i + 1) * w]);
                let rs: [&[E]; DOT_TILE] = std::array::from_fn(|j| &r[j * w..(j + 1) * w]);
                let want = dots_portable(qs, DOT_TILE, rs, DOT_TILE);
                for i in 0..DOT_TILE {
                    for j in 0..DOT_TILE {
                        let exact: f64 = qs[i]
                            .iter()
                            .zip(rs[j])
                            .map(|(a, b)| *a as f64 * b.to_f32() as f64)
                            .sum();
                        assert!(
                            (want[i][j] as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                            "w {w}"
                        );
                    }
                }
                for isa in isas() {
                    let got = dots_isa(isa, qs, DOT_TILE, rs, DOT_TILE);
                    assert_eq!(
                        got.map(|r| r.map(f32::to_bits)),
                        want.map(|r| r.map(f32::to_bits)),
                        "{isa:?} w {w}"
                    );
                }
            }
        }
        case(|v| v);
        case(half::bf16::from_f32);
    }

    #[test]
    fn absorb_and_project_agree_bit_for_bit_and_match_f64() {
        use half::{bf16, f16};
        fn case<E: KindOf>(conv: impl Fn(f32) -> E) {
            for (rows, c) in [(1, 1), (3, 17), (128, 512), (7, 300), (5, 16)] {
                let w: Vec<E> = test_values(rows * c, 5).into_iter().map(&conv).collect();
                let q = test_values(rows, 6);
                let x = test_values(c, 8);
                let mut want = vec![0.0f32; c];
                absorb_portable(&q, &w, &mut want);
                for (col, v) in want.iter().enumerate() {
                    let exact: f64 = (0..rows)
                        .map(|j| q[j] as f64 * w[j * c + col].to_f32() as f64)
                        .sum();
                    assert!((*v as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()));
                }
                let mut want_p = vec![0.0f32; rows];
                project_portable(&w, &x, &mut want_p);
                for (j, v) in want_p.iter().enumerate() {
                    let exact: f64 = (0..c)
                        .map(|t| w[j * c + t].to_f32() as f64 * x[t] as f64)
                        .sum();
                    assert!((*v as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()));
                }
                for isa in isas() {
                    let mut got = vec![f32::NAN; c];
                    absorb_isa(isa, &q, &w, &mut got);
                    assert_eq!(bits(&got), bits(&want), "absorb {isa:?} {rows}x{c}");
                    let mut got_p = vec![f32::NAN; rows];
                    project_isa(isa, &w, &x, &mut got_p);
                    assert_eq!(bits(&got_p), bits(&want_p), "project {isa:?} {rows}x{c}");
                }
            }
        }
        case(|v| v);
        case(bf16::from_f32);
        case(f16::from_f32);
    }

    /// Several queries against one matrix give each query's bits of the one-query
    /// kernels, for 1..=4 queries, f32/bf16 weights and ragged widths.
    #[test]
    fn absorb_and_project_over_several_tokens_match_one_at_a_time() {
        use half::bf16;
        fn case<E: KindOf>(conv: impl Fn(f32) -> E) {
            for (rows, c) in [(1, 1), (3, 17), (128, 512), (7, 300), (5, 16), (6, 70)] {
                let w: Vec<E> = test_values(rows * c, 5).into_iter().map(&conv).collect();
                let qs: Vec<Vec<f32>> = (0..TOKENS)
                    .map(|i| test_values(rows, 6 + i as u64))
                    .collect();
                let xs: Vec<Vec<f32>> =
                    (0..TOKENS).map(|i| test_values(c, 16 + i as u64)).collect();
                for n in 1..=TOKENS {
                    let mut got = vec![f32::NAN; TOKENS * c];
                    let mut got_p = vec![f32::NAN; TOKENS * rows];
                    let q = std::array::from_fn(|i| &qs[i.min(n - 1)][..]);
                    let x = std::array::from_fn(|i| &xs[i.min(n - 1)][..]);
                    let base = got.as_mut_ptr();
                    let base_p = got_p.as_mut_ptr();
                    // SAFETY: token i's outputs are its own c (rows) values of got (got_p).
                    unsafe {
                        absorb_tokens(q, n, &w, c, std::array::from_fn(|i| base.add(i * c)));
                        project_tokens(
                            &w,
                            rows,
                            x,
                            n,
                            std::array::from_fn(|i| base_p.add(i * rows)),
                        );
                    }
                    for i in 0..n {
                        let mut want = vec![0.0f32; c];
                        absorb_portable(&qs[i], &w, &mut want);
                        assert_eq!(
                            bits(&got[i * c..(i + 1) * c]),
                            bits(&want),
                            "absorb {n} {i} {rows}x{c}"
                        );
                        let mut want_p = vec![0.0f32; rows];
                        project_portable(&w, &xs[i], &mut want_p);
                        assert_eq!(
                            bits(&got_p[i * rows..(i + 1) * rows]),
                            bits(&want_p),
                            "project {n} {i} {rows}x{c}"
                        );
                    }
                    assert!(
                        got[n * c..].iter().all(|v| v.is_nan()),
                        "absorb wrote past {n} tokens"
                    );
                }
            }
        }
        case(|v| v);
        case(bf16::from_f32);
    }

    /// The position-split sums: bit-identical on every path, equal to the column-split
    /// [`weighted_sum`] over the same positions (one chain per output), close to f64.
    #[test]
    fn weighted_sum_rows_agree_bit_for_bit_with_the_column_split() {
        use half::bf16;
        fn case<E: KindOf>(conv: impl Fn(f32) -> E) {
            let width = 96;
            let total = 70;
            let values: Vec<E> = test_values(total * width, 7)
                .into_iter()
                .map(&conv)
                .collect();
            let stride = 80;
            let probs = test_values(16 * stride, 11);
            let source = Rows {
                block: |b: usize| &values[(b * 4 * width).min(values.len())..],
                block_size: 4,
                width,
            };
            for (nh, c, positions) in [
                (16, 96, 0..70),
                (5, 81, 3..40),
                (8, 32, 17..18),
                (1, 17, 0..33),
                (16, 64, 5..5),
            ] {
                let mut want = vec![0.0f32; nh * c];
                weighted_sum_rows_portable(
                    &probs,
                    stride,
                    nh,
                    positions.clone(),
                    &source,
                    c,
                    &mut want,
                );
                for i in 0..nh {
                    for col in 0..c {
                        let exact: f64 = positions
                            .clone()
                            .map(|s| {
                                probs[i * stride + s] as f64 * source.row(s)[col].to_f32() as f64
                            })
                            .sum();
                        let got = want[i * c + col] as f64;
                        assert!((got - exact).abs() < 1e-5 * (1.0 + exact.abs()));
                    }
                }
                // The column-split kernel over the same positions (rows from the first).
                let shifted = Rows {
                    block: |b: usize| {
                        &values[((positions.start + b * 4) * width).min(values.len())..]
                    },
                    block_size: 4,
                    width,
                };
                for h0 in (0..nh).step_by(SUM_HEADS) {
                    let hn = SUM_HEADS.min(nh - h0);
                    let p: [&[f32]; SUM_HEADS] = std::array::from_fn(|a| {
                        &probs[(h0 + a.min(hn - 1)) * stride + positions.start..]
                    });
                    for c0 in (0..c).step_by(SUM_COLS) {
                        let cols = c0..(c0 + SUM_COLS).min(c);
                        let mut tile = [[0.0; SUM_COLS]; SUM_HEADS];
                        weighted_sum_portable(
                            p,
                            hn,
                            positions.len(),
                            &shifted,
                            cols.clone(),
                            &mut tile,
                        );
                        for a in 0..hn {
                            for (j, col) in cols.clone().enumerate() {
                                assert_eq!(
                                    tile[a][j].to_bits(),
                                    want[(h0 + a) * c + col].to_bits(),
                                    "head {} col {col}",
                                    h0 + a
                                );
                            }
                        }
                    }
                }
                for isa in isas() {
                    let mut got = vec![f32::NAN; nh * c];
                    weighted_sum_rows_isa(
                        isa,
                        &probs,
                        stride,
                        nh,
                        positions.clone(),
                        &source,
                        c,
                        &mut got,
                    );
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{isa:?} {nh} heads, {c} columns, {positions:?}"
                    );
                }
            }
        }
        case(|v| v);
        case(bf16::from_f32);
    }

    #[test]
    fn dots_of_negative_zero_products() {
        // Every product −0: the lanes stay +0 from their start (fma(−0·x) + 0 = +0).
        let q = [-0.0f32; 20];
        let r = [1.0f32; 20];
        let want = dots_portable([&q; 4], 4, [&r; 4], 4);
        for isa in isas() {
            let got = dots_isa(isa, [&q; 4], 4, [&r; 4], 4);
            assert_eq!(
                got.map(|r| r.map(f32::to_bits)),
                want.map(|r| r.map(f32::to_bits)),
                "{isa:?}"
            );
        }
    }

    #[test]
    /// Also over bf16 cache rows, which the kernels widen exactly.
    fn weighted_sums_agree_bit_for_bit_and_match_f64() {
        fn case<E: KindOf>(conv: impl Fn(f32) -> E) {
            let width = 96;
            for positions in [0, 1, 5, 33] {
                let rows: Vec<E> = test_values(positions * width, 7)
                    .into_iter()
                    .map(&conv)
                    .collect();
                let probs = test_values(SUM_HEADS * 40, 11);
                let p: [&[f32]; SUM_HEADS] = std::array::from_fn(|i| &probs[i * 40..(i + 1) * 40]);
                let row = |s: usize| &rows[s * width..(s + 1) * width];
                // Blocks of 4 rows (the last one short).
                let source = Rows {
                    block: |b: usize| &rows[(b * 4 * width).min(rows.len())..],
                    block_size: 4,
                    width,
                };
                for (cols, nh) in [
                    (0..32, 8),
                    (32..64, 3),
                    (64..81, 8),
                    (90..96, 1),
                    (5..21, 5),
                ] {
                    let mut want = [[0.0; SUM_COLS]; SUM_HEADS];
                    weighted_sum_portable(p, nh, positions, &source, cols.clone(), &mut want);
                    for i in 0..nh {
                        for (c, col) in cols.clone().enumerate() {
                            let exact: f64 = (0..positions)
                                .map(|s| p[i][s] as f64 * row(s)[col].to_f32() as f64)
                                .sum();
                            assert!((want[i][c] as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()));
                        }
                    }
                    for isa in isas() {
                        let mut got = [[f32::NAN; SUM_COLS]; SUM_HEADS];
                        weighted_sum_isa(isa, p, nh, positions, &source, cols.clone(), &mut got);
                        for i in 0..nh {
                            let n = cols.len();
                            assert_eq!(
                                got[i][..n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                want[i][..n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{isa:?} cols {cols:?} heads {nh} positions {positions}"
                            );
                        }
                    }
                }
            }
        }
        case(|v| v);
        case(half::bf16::from_f32);
    }
}
