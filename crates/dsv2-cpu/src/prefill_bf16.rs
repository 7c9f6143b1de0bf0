//! The expanded (prefill) attention's two products in bf16 arithmetic, on AVX-512 BF16.
//!
//! A prefill's attention multiplies each head's queries by its expanded keys (`[T, Dn + Dr]
//! · [Dn + Dr, S]`) and its probabilities by its values (`[T, S] · [S, Dv]`): 320
//! multiply-adds per head and causal (query, key) pair on V2-Lite, the part of a prefill
//! that grows with the square of the prompt. Over a bf16 latent cache (whose keys and
//! values are bf16 already, up to the rounding of their expansion), both products here take
//! their operands in bf16 and sum in f32, as FlashAttention and FlashMLA do: one
//! `vdpbf16ps` does 32 multiply-adds, twice an f32 fused multiply-add's work.
//!
//! [`tile`] computes `C = A · B` for a tile of up to [`TILE_ROWS`] rows of `A` (bf16
//! pairs along the summed dimension, row-major) against `B` packed by [`pack`] (bf16
//! pairs, [`TILE_COLS`] columns at a time). Each value of `C` is one chain from 0, `acc =
//! dp(acc, a[i][kk], b[kk][j])` for `kk` in order, where `dp` is the instruction's step
//! ([`crate::flash_bf16`], tested against the instruction): the same arithmetic in the
//! scalar reference [`tile_reference`] and in AVX-512 BF16, tested bit for bit. Values past
//! `k` or `n` are packed as 0, so ragged sizes need no masks. Where the CPU has AMX tiles,
//! [`tile_padded`] runs 32 rows at a time on them instead (`crate::amx::dense`; operands
//! padded to whole tiles of 16 pairs, [`padded_pairs`]), within 1e-6 of the chain.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::flash_bf16::{dp, pair, round};

/// Rows of `A` in a full tile.
pub(crate) const TILE_ROWS: usize = 6;
/// Columns of `B` (and of `C`) in a tile: four vectors of 16 f32 lanes.
pub(crate) const TILE_COLS: usize = 64;

/// Whether this CPU runs these products (as the decode attention's bf16 arithmetic,
/// [`crate::flash_bf16::available`]: AVX-512 F, BW and BF16, and not disabled by
/// `DSV2_BF16_ATTENTION=0`).
pub(crate) fn available() -> bool {
    crate::flash_bf16::available()
}

/// `n` columns rounded up to whole tiles.
pub(crate) fn padded_cols(n: usize) -> usize {
    n.div_ceil(TILE_COLS) * TILE_COLS
}

/// Pairs of a packed operand's summed dimension (`⌈k/2⌉`), padded with zeros to whole
/// tiles of 16 pairs where [`tile_padded`] runs on the AMX tiles.
pub(crate) fn padded_pairs(pairs: usize) -> usize {
    if crate::amx::available() {
        pairs.next_multiple_of(16)
    } else {
        pairs
    }
}

/// Rows of `A` one [`tile_padded`] call takes: 32 on the AMX tiles, else [`TILE_ROWS`].
pub(crate) fn tile_rows() -> usize {
    if crate::amx::available() {
        crate::amx::DENSE_ROWS
    } else {
        TILE_ROWS
    }
}

/// `u32` values of a `k × n` matrix packed by [`pack_rows`]: [`padded_pairs`] of `⌈k/2⌉`
/// rows of pairs.
pub(crate) fn packed_len(k: usize, n: usize) -> usize {
    padded_pairs(k.div_ceil(2)) * padded_cols(n)
}

/// Packs the `k × n` matrix `B` whose row `r` is `row(r)` (at least `n` values) in bf16
/// pairs of rows, tile by tile of [`TILE_COLS`] columns: with `kp` = [`padded_pairs`] of
/// `⌈k/2⌉`, tile `t` is `kp × TILE_COLS` contiguous pairs, `out[t·kp·64 + kk·64 + j] =
/// (bf16(B[2kk][64t + j]), bf16(B[2kk + 1][64t + j]))` (row `2kk` in the low half; rows
/// past `k` and columns past `n` are 0). `out` holds [`packed_len`] values.
pub(crate) fn pack_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32], out: &mut [u32]) {
    let kp = padded_pairs(k.div_ceil(2));
    let out = &mut out[..packed_len(k, n)];
    for kk in 0..kp {
        if 2 * kk >= k {
            for tile in out.chunks_exact_mut(kp * TILE_COLS) {
                tile[kk * TILE_COLS..][..TILE_COLS].fill(0);
            }
            continue;
        }
        let lo = &row(2 * kk)[..n];
        let hi = (2 * kk + 1 < k).then(|| &row(2 * kk + 1)[..n]);
        for (t, tile) in out.chunks_exact_mut(kp * TILE_COLS).enumerate() {
            let cols = t * TILE_COLS..((t + 1) * TILE_COLS).min(n);
            let dst = &mut tile[kk * TILE_COLS..][..TILE_COLS];
            interleave(&lo[cols.clone()], hi.map(|hi| &hi[cols.clone()]), dst);
        }
    }
}

/// [`pack_rows`] of a matrix given by columns: column `j` of `B` is `col(j)` (at least `k`
/// values).
pub(crate) fn pack_cols<'a>(k: usize, n: usize, col: impl Fn(usize) -> &'a [f32], out: &mut [u32]) {
    let kp = padded_pairs(k.div_ceil(2));
    let out = &mut out[..packed_len(k, n)];
    let mut column = [0u32; 256];
    for (t, tile) in out.chunks_exact_mut(kp * TILE_COLS).enumerate() {
        for j in 0..TILE_COLS {
            let at = t * TILE_COLS + j;
            for k0 in (0..kp).step_by(column.len()) {
                let part = &mut column[..(kp - k0).min(256)];
                if at < n {
                    let x = &col(at)[..k];
                    pairs_of(&x[(2 * k0).min(k)..], part);
                } else {
                    part.fill(0);
                }
                for (i, p) in part.iter().enumerate() {
                    tile[(k0 + i) * TILE_COLS + j] = *p;
                }
            }
        }
    }
}

/// `out[j] = (bf16(lo[j]), bf16(hi[j]))` (`hi` absent: 0), 0 past `lo`'s end.
fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = lo.len();
    #[cfg(target_arch = "x86_64")]
    let done = if available() {
        // SAFETY: the features were detected; `hi` (if any) holds `n` values too.
        unsafe { x86::interleave512(lo, hi, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (j, p) in out.iter_mut().enumerate().skip(done) {
        *p = if j < n {
            pair(round(lo[j]), hi.map_or(0, |hi| round(hi[j])))
        } else {
            0
        };
    }
}

/// The bf16 pairs of an f32 row: `out[kk] = (bf16(x[2kk]), bf16(x[2kk + 1]))`, 0 past
/// `x`'s end, for every `kk < out.len()`.
pub(crate) fn pairs_of(x: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    let done = if available() {
        // SAFETY: the features were detected.
        unsafe { x86::pairs_of512(x, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (kk, p) in out.iter_mut().enumerate().skip(done) {
        let at = |i: usize| x.get(i).map_or(0, |v| round(*v));
        *p = pair(at(2 * kk), at(2 * kk + 1));
    }
}

/// One tile of a product, an operand's shapes:
/// - `a`: `rows` rows of `A` in bf16 pairs, row `i` at `a[i·a_stride..]`, `kk_end` pairs
///   read from each;
/// - `b`: a matrix packed by [`pack`] whose rows came in `kp` pairs (`⌈k/2⌉`), of which the
///   first `kk_end` are read;
/// - `c`: `C`'s rows, row `i` at `c[i·c_stride..]`, columns `0..col_end` (a multiple of
///   [`TILE_COLS`]) written.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub a: &'a [u32],
    pub a_stride: usize,
    pub rows: usize,
    pub kk_end: usize,
    pub b: &'a [u32],
    pub kp: usize,
    pub col_end: usize,
    pub c_stride: usize,
}

impl Tile<'_> {
    fn check(&self, c: &[f32]) {
        assert!(
            (1..=TILE_ROWS).contains(&self.rows)
                && self.col_end.is_multiple_of(TILE_COLS)
                && self.kk_end <= self.kp
                && self.a.len() >= (self.rows - 1) * self.a_stride + self.kk_end
                && self.b.len() >= self.kp * self.col_end
                && self.c_stride >= self.col_end
                && c.len() >= (self.rows - 1) * self.c_stride + self.col_end,
            "bf16 tile shapes"
        );
    }
}

/// `C[i][j] = Σ_kk A[i][kk] · B[kk][j]` for the tile's rows and columns `0..col_end`
/// (overwritten), in the module's arithmetic.
pub(crate) fn tile(t: Tile<'_>, c: &mut [f32]) {
    t.check(c);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were detected; the shapes are checked above.
        unsafe {
            match t.rows {
                1 => x86::tile512::<1>(t, c),
                2 => x86::tile512::<2>(t, c),
                3 => x86::tile512::<3>(t, c),
                4 => x86::tile512::<4>(t, c),
                5 => x86::tile512::<5>(t, c),
                _ => x86::tile512::<6>(t, c),
            }
        }
        return;
    }
    tile_reference(t, c)
}

/// [`tile`] for callers whose operands are padded for the AMX tiles, which it runs on
/// where [`crate::amx::available`] (up to [`tile_rows`] rows; the sums kept in the tile
/// unit over all of `kk_end`, rounded a few last places differently from [`tile`]'s
/// chain, ≤ 1e-6 of a row's largest output): `A` readable for `rows` rounded up to 16
/// rows of `kk_end` rounded up to 16 pairs, 0 past `kk_end`; `B` packed with
/// [`padded_pairs`]; `C` writable for `rows` rounded up to 16 rows. Elsewhere [`tile`].
pub(crate) fn tile_padded(t: Tile<'_>, c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::amx::available() {
        let (rows, kk) = (t.rows.next_multiple_of(16), t.kk_end.next_multiple_of(16));
        assert!(
            (1..=crate::amx::DENSE_ROWS).contains(&t.rows)
                && t.col_end.is_multiple_of(TILE_COLS)
                && kk <= t.kp
                && t.a.len() >= (rows - 1) * t.a_stride + kk
                && t.b.len() >= t.kp * t.col_end
                && t.c_stride >= t.col_end
                && c.len() >= (rows - 1) * t.c_stride + t.col_end,
            "bf16 tile shapes (AMX)"
        );
        // SAFETY: the tiles are available; every read and write is within the slices
        // (checked above).
        return unsafe {
            crate::amx::dense(
                &mut crate::amx::Amx,
                t.a.as_ptr(),
                t.a_stride,
                t.rows,
                t.kk_end,
                t.b.as_ptr(),
                t.kp,
                t.col_end,
                c.as_mut_ptr(),
                t.c_stride,
            )
        };
    }
    tile(t, c)
}

/// [`tile`], one value at a time.
pub(crate) fn tile_reference(t: Tile<'_>, c: &mut [f32]) {
    t.check(c);
    for i in 0..t.rows {
        for j in 0..t.col_end {
            let b = &t.b[j / TILE_COLS * t.kp * TILE_COLS + j % TILE_COLS..];
            let mut acc = 0.0f32;
            for kk in 0..t.kk_end {
                acc = dp(acc, t.a[i * t.a_stride + kk], b[kk * TILE_COLS]);
            }
            c[i * t.c_stride + j] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, TILE_COLS};
    use crate::flash_bf16::x86::{bh, bits, pair_lanes};
    use std::arch::x86_64::*;

    /// [`super::pairs_of`] for the whole 16-pair blocks that `x` and `out` both hold;
    /// returns the pairs written (`vcvtne2ps2bf16` rounds as [`super::round`]).
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_of512(x: &[f32], out: &mut [u32]) -> usize {
        let blocks = (x.len() / 32).min(out.len() / 16);
        for b in 0..blocks {
            // SAFETY: 32 values of x and 16 of out at block b.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr().add(32 * b));
                let hi = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
                // Low 16 bf16 values lo's, high 16 hi's: in order, two to a lane.
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * b) as *mut _, bits(v));
            }
        }
        16 * blocks
    }

    /// [`super::interleave`] for the whole 16-value blocks of `lo` that `out` holds;
    /// returns the values written.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `hi`, if any, at least as long as `lo`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave512(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) -> usize {
        let blocks = (lo.len() / 16).min(out.len() / 16);
        for b in 0..blocks {
            // SAFETY: 16 values of lo, hi and out at block b.
            unsafe {
                let l = _mm512_loadu_ps(lo.as_ptr().add(16 * b));
                let h = match hi {
                    Some(hi) => _mm512_loadu_ps(hi.as_ptr().add(16 * b)),
                    None => _mm512_setzero_ps(),
                };
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * b) as *mut _, pair_lanes(l, h));
            }
        }
        16 * blocks
    }

    /// [`super::tile_reference`] on AVX-512 BF16: `M` rows × 64 columns of accumulators
    /// (4 vectors a row), one `vdpbf16ps` per row, vector and pair of `A`.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `t.rows == M` and the shapes checked by [`super::tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile512<const M: usize>(t: Tile<'_>, c: &mut [f32]) {
        let a = t.a.as_ptr();
        let c = c.as_mut_ptr();
        for t0 in (0..t.col_end).step_by(TILE_COLS) {
            // SAFETY (all loads and stores): the shapes were checked by `tile`.
            unsafe {
                let b = t.b.as_ptr().add(t0 * t.kp);
                let mut acc = [[_mm512_setzero_ps(); 4]; M];
                for kk in 0..t.kk_end {
                    let bk = b.add(kk * TILE_COLS);
                    let bv: [__m512bh; 4] =
                        std::array::from_fn(|v| bh(_mm512_loadu_si512(bk.add(16 * v) as *const _)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let av = bh(_mm512_set1_epi32(*a.add(i * t.a_stride + kk) as i32));
                        for (acc, bv) in acc.iter_mut().zip(&bv) {
                            *acc = _mm512_dpbf16_ps(*acc, av, *bv);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    for (v, acc) in acc.iter().enumerate() {
                        _mm512_storeu_ps(c.add(i * t.c_stride + t0 + 16 * v), *acc);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    /// The AVX-512 BF16 tiles against the scalar reference, bit for bit, on every row count,
    /// ragged `k` and `n` (odd, past a tile), partial `kk_end`, strided rows and some
    /// subnormal values; and both against f64 sums of the bf16 operands.
    #[test]
    fn the_bf16_tiles_match_the_reference_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        for (k, n) in [(192usize, 300usize), (7, 1), (64, 64), (1, 130), (513, 70)] {
            // The packed rows of pairs (padded to whole tiles of 16 where AMX runs).
            let kp = padded_pairs(k.div_ceil(2));
            let bmat: Vec<f32> = test_values(k * n, (k * n) as u64)
                .into_iter()
                .enumerate()
                .map(|(i, v)| if i % 89 == 3 { v * 1e-39 } else { v })
                .collect();
            let b = |r: usize, j: usize| bmat[r * n + j];
            let mut packed = vec![0u32; packed_len(k, n)];
            pack_rows(k, n, |r| &bmat[r * n..], &mut packed);
            for rows in 1..=TILE_ROWS {
                let a_stride = kp + 3;
                let av: Vec<f32> = test_values(rows * k, (rows + k) as u64)
                    .into_iter()
                    .map(|v| 2.0 * v)
                    .collect();
                let mut a = vec![0u32; rows * a_stride];
                for i in 0..rows {
                    pairs_of(&av[i * k..(i + 1) * k], &mut a[i * a_stride..][..kp]);
                }
                for kk_end in [kp, kp / 2] {
                    let col_end = padded_cols(n);
                    let c_stride = col_end + 5;
                    let t = Tile {
                        a: &a,
                        a_stride,
                        rows,
                        kk_end,
                        b: &packed,
                        kp,
                        col_end,
                        c_stride,
                    };
                    let mut want = vec![0.0; rows * c_stride];
                    let mut got = vec![1.0; rows * c_stride];
                    tile_reference(t, &mut want);
                    tile(t, &mut got);
                    for i in 0..rows {
                        for j in 0..col_end {
                            let (w, g) = (want[i * c_stride + j], got[i * c_stride + j]);
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "k {k} n {n} rows {rows} ({i}, {j})"
                            );
                            // Against f64: the bf16 operands' exact products, summed.
                            let bf = |x: f32| half::bf16::from_f32(x).to_f64();
                            let flush = |x: f64| {
                                if x.abs() < f32::MIN_POSITIVE as f64 {
                                    0.0
                                } else {
                                    x
                                }
                            };
                            let exact: f64 = (0..(2 * kk_end).min(k))
                                .map(|r| {
                                    if j < n {
                                        flush(bf(av[i * k + r])) * flush(bf(b(r, j)))
                                    } else {
                                        0.0
                                    }
                                })
                                .sum();
                            let mag: f64 = (0..(2 * kk_end).min(k))
                                .map(|r| {
                                    if j < n {
                                        (bf(av[i * k + r]) * bf(b(r, j))).abs()
                                    } else {
                                        0.0
                                    }
                                })
                                .sum();
                            let bound = 2.0 * kk_end as f64 * f32::EPSILON as f64 * mag;
                            assert!(
                                (w as f64 - exact).abs() <= bound + 1e-30,
                                "k {k} n {n} ({i}, {j}): {w} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The packed layout: pairs of rows, tile by tile, zeros past the matrix; by rows and
    /// by columns alike.
    #[test]
    fn pack_lays_out_pairs_of_rows_tile_by_tile() {
        for (k, n) in [(3usize, 70usize), (192, 300), (6, 16), (1, 1)] {
            let rows: Vec<f32> = (0..k * n).map(|i| (i / n * 1000 + i % n) as f32).collect();
            let cols: Vec<f32> = (0..k * n).map(|i| rows[i % k * n + i / k]).collect();
            let mut by_rows = vec![7u32; packed_len(k, n)];
            pack_rows(k, n, |r| &rows[r * n..], &mut by_rows);
            let mut by_cols = vec![7u32; packed_len(k, n)];
            pack_cols(k, n, |j| &cols[j * k..], &mut by_cols);
            assert_eq!(by_rows, by_cols, "k {k} n {n}");
            let kp = padded_pairs(k.div_ceil(2));
            let b = |r: usize, j: usize| {
                if r < k && j < n {
                    round(rows[r * n + j])
                } else {
                    0
                }
            };
            for t in 0..padded_cols(n) / TILE_COLS {
                for kk in 0..kp {
                    for col in 0..TILE_COLS {
                        let j = t * TILE_COLS + col;
                        assert_eq!(
                            by_rows[t * kp * TILE_COLS + kk * TILE_COLS + col],
                            pair(b(2 * kk, j), b(2 * kk + 1, j)),
                            "k {k} n {n} t {t} kk {kk} col {col}"
                        );
                    }
                }
            }
        }
    }

    /// The vectorized conversions round as the scalar one (to nearest even, subnormals to
    /// 0), halfway cases, infinities and every length's tail included.
    #[test]
    fn conversions_round_as_the_reference() {
        let mut x: Vec<f32> = test_values(1000, 3)
            .into_iter()
            .map(|v| v * 300.0)
            .collect();
        for (i, special) in [
            f32::from_bits(0x3f80_8000), // halfway, even below
            f32::from_bits(0x3f81_8000), // halfway, odd below
            1e-39,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
        ]
        .into_iter()
        .enumerate()
        {
            x[i * 7 + 1] = special;
        }
        for len in [0, 1, 31, 32, 33, 100, 1000] {
            let x = &x[..len];
            let mut got = vec![9u32; len / 2 + 20];
            pairs_of(x, &mut got);
            for (kk, g) in got.iter().enumerate() {
                let at = |i: usize| x.get(i).map_or(0, |v| round(*v));
                assert_eq!(
                    *g,
                    pair(at(2 * kk), at(2 * kk + 1)),
                    "pairs_of len {len} kk {kk}"
                );
            }
            let (lo, hi) = x.split_at(len / 2);
            let lo = &lo[..hi.len().min(lo.len())];
            let mut got = vec![9u32; lo.len() + 17];
            interleave(lo, Some(&hi[..lo.len()]), &mut got);
            for (j, g) in got.iter().enumerate() {
                let want = if j < lo.len() {
                    pair(round(lo[j]), round(hi[j]))
                } else {
                    0
                };
                assert_eq!(*g, want, "interleave len {len} j {j}");
            }
        }
    }
}
