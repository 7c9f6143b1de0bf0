//! Prompt rows of q8 products in f32 arithmetic, for CPUs with AVX2 and FMA but no int8
//! dot-product instruction (AMD Zen 2/3, Intel Haswell to Skylake client).
//!
//! There the int8 path ([`crate::qmatmul`]) builds each multiply-add of a q8 product's two
//! activation terms from `vpsignb`, `vpmaddubsw`, `vpmaddwd` and `vpaddd`: ~9 vector
//! operations per 32 weights and row. A prompt's products are bound by arithmetic, so here
//! each 16-row weight tile is widened once to f32 (`q · d`, exact: an int8 times an f16
//! needs at most 18 significant bits) and every prompt row runs against it in a register
//! tile of 6 rows × 16 weights: one fused multiply-add per 8 weight multiply-adds, with
//! the activations exact (no int8 rounding). Where AVX-512 BF16 is present
//! [`crate::q8_bf16`] takes these rows instead; where an int8 dot product is (AVX-512
//! VNNI, AVX-VNNI), the int8 path keeps them.
//!
//! Which rows take this path is a property of the row (its prompt's length), never of the
//! batch, as for [`crate::q8_bf16`].
//!
//! **Numerics:** output `(i, r)` is one chain of fused multiply-adds from 0 over `k` in
//! order, `acc = fma(x[i, k], f32(q[r, k]) · f32(d[r, k/32]), acc)`. The scalar reference
//! [`tile_reference`] and the AVX2 kernel are tested bit for bit.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use dsv2_core::quant::{weight_block, QuantFormat, BLOCK, TILE};

use crate::kernels::SyncPtr;
use crate::qmatmul::QMatrix;
use crate::team;

/// Activation rows of a register tile.
const MR: usize = 6;
/// Columns `k` widened at a time: 64 KiB of f32 weights, which stay in L2 while every
/// prompt row runs against them (a layer-0 `down_proj` row is 10,944 wide).
const K_CHUNK: usize = 1024;

/// Whether prompt rows of q8 products take this path: AVX2 and FMA present (and allowed,
/// [`dsv2_core::isa`]), and neither AVX-512 BF16 ([`crate::q8_bf16`]) nor an int8 dot
/// product, whose int8 path is as fast.
pub(crate) fn available() -> bool {
    !crate::q8_bf16::available()
        && dsv2_core::isa::avx2()
        && !dsv2_core::isa::avx512_vnni()
        && !dsv2_core::isa::avx_vnni()
}

/// `y[m, n] = x[m, k] · wᵀ` for q8 `w` (`[n, k]`), every row in f32 arithmetic, in
/// parallel over the weight tiles.
///
/// # Panics
/// If `w` is not q8, the shapes do not match, or the CPU lacks AVX2 and FMA.
pub(crate) fn matmul(x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        w.format == QuantFormat::Q8
            && k.is_multiple_of(BLOCK)
            && x.len() >= m * k
            && y.len() >= m * n
            && w.q.len() >= n * k
            && w.scales.len() >= n * k / BLOCK,
        "q8_f32 shapes"
    );
    assert!(dsv2_core::isa::avx2(), "q8_f32 needs AVX2 and FMA");
    if m == 0 || n == 0 {
        return;
    }
    let tiles = n.div_ceil(TILE);
    let per_task = tiles.div_ceil(4 * team::threads()).max(1);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    team::for_each(tiles.div_ceil(per_task), |task| {
        let mut wide = crate::scratch::take::<f32>(K_CHUNK * TILE);
        let mut acc = crate::scratch::take::<f32>(m * TILE);
        for t in task * per_task..((task + 1) * per_task).min(tiles) {
            let rows = (n - t * TILE).min(TILE);
            let padded = (rows < TILE).then(|| crate::qmatmul::padded_tile(&w, t));
            let (q, s) = match &padded {
                Some((q, s)) => (q.as_slice(), s.as_slice()),
                None => (
                    &w.q[t * TILE * k..][..TILE * k],
                    &w.scales[t * TILE * (k / BLOCK)..],
                ),
            };
            acc.fill(0.0);
            for k0 in (0..k).step_by(K_CHUNK) {
                let kc = (k - k0).min(K_CHUNK);
                widen(q, s, k0, kc, &mut wide);
                tile_rows(x, k, m, k0, kc, &wide, &mut acc);
            }
            for i in 0..m {
                // SAFETY: tasks write disjoint 16-column ranges of every row of `y`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(y_ptr.get().add(i * n + t * TILE), rows)
                };
                dst.copy_from_slice(&acc[i * TILE..][..rows]);
            }
        }
    });
}

/// Columns `k0..k0 + kc` (whole blocks) of one 16-row tile (`q`: its interleaved bytes,
/// `s`: its block scales) as f32, `out[(k − k0)·16 + r] = f32(q[r, k]) · f32(d[r, k/32])`.
fn widen(q: &[u8], s: &[half::f16], k0: usize, kc: usize, out: &mut [f32]) {
    debug_assert!(k0.is_multiple_of(BLOCK) && kc.is_multiple_of(BLOCK));
    #[cfg(target_arch = "x86_64")]
    if dsv2_core::isa::avx2() {
        // SAFETY: AVX2 present; the bounds are checked inside.
        return unsafe { x86::widen(q, s, k0, kc, out) };
    }
    widen_reference(q, s, k0, kc, out)
}

/// [`widen`] in plain Rust, through the format's own block reader.
fn widen_reference(q: &[u8], s: &[half::f16], k0: usize, kc: usize, out: &mut [f32]) {
    // The tile alone is a 16-row matrix of the format's layout.
    let cols = q.len() / TILE;
    for b in k0 / BLOCK..(k0 + kc) / BLOCK {
        for r in 0..TILE {
            let (w, d) = weight_block(QuantFormat::Q8, TILE, cols, q, s, r, b);
            for (i, w) in w.into_iter().enumerate() {
                out[(b * BLOCK + i - k0) * TILE + r] = w as f32 * d.to_f32();
            }
        }
    }
}

/// Adds columns `k0..k0 + kc` of every row's chains: `acc[i·16 + r] = fma(x[i, k], wide[(k
/// − k0)·16 + r], acc[i·16 + r])` for `k` in order.
fn tile_rows(x: &[f32], k: usize, m: usize, k0: usize, kc: usize, wide: &[f32], acc: &mut [f32]) {
    assert!(wide.len() >= kc * TILE && acc.len() >= m * TILE && x.len() >= m * k);
    let mut i0 = 0;
    while i0 < m {
        let mr = (m - i0).min(MR);
        let xs = &x[i0 * k + k0..];
        let a = &mut acc[i0 * TILE..(i0 + mr) * TILE];
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX2 and FMA present (checked by `matmul`); `xs` holds `mr` rows of
            // stride `k` from column k0 (k0 + kc ≤ k), `wide` kc columns, `a` mr tiles.
            unsafe {
                match mr {
                    6 => x86::tile::<6>(xs, k, kc, wide, a),
                    5 => x86::tile::<5>(xs, k, kc, wide, a),
                    4 => x86::tile::<4>(xs, k, kc, wide, a),
                    3 => x86::tile::<3>(xs, k, kc, wide, a),
                    2 => x86::tile::<2>(xs, k, kc, wide, a),
                    _ => x86::tile::<1>(xs, k, kc, wide, a),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        tile_reference(xs, k, mr, kc, wide, a);
        i0 += mr;
    }
}

/// The scalar reference of a register tile: [`tile_rows`] for `mr` rows.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn tile_reference(xs: &[f32], k: usize, mr: usize, kc: usize, wide: &[f32], acc: &mut [f32]) {
    for i in 0..mr {
        for kk in 0..kc {
            let xv = xs[i * k + kk];
            for r in 0..TILE {
                let a = &mut acc[i * TILE + r];
                *a = xv.mul_add(wide[kk * TILE + r], *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, TILE};

    /// [`super::widen_reference`] in AVX2: a 64-byte unit holds 4 columns of the 16 rows
    /// (row `r`: bytes `4r..4r + 4`); column `j` of 8 rows is byte `j` of 8 dwords,
    /// sign-extended by a left then an arithmetic right shift.
    ///
    /// # Safety
    /// AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen(q: &[u8], s: &[half::f16], k0: usize, kc: usize, out: &mut [f32]) {
        let (b0, nb) = (k0 / BLOCK, kc / BLOCK);
        assert!(
            q.len() >= (b0 + nb) * BLOCK * TILE
                && s.len() >= (b0 + nb) * TILE
                && out.len() >= kc * TILE,
            "widen bounds"
        );
        // SAFETY: in bounds (checked above).
        unsafe {
            let mut o = out.as_mut_ptr();
            for b in b0..b0 + nb {
                let sp = s.as_ptr().add(b * TILE) as *const __m128i;
                let scale = [
                    _mm256_cvtph_ps(_mm_loadu_si128(sp)),
                    _mm256_cvtph_ps(_mm_loadu_si128(sp.add(1))),
                ];
                for u in 0..8 {
                    let p = q.as_ptr().add((b * 8 + u) * 4 * TILE) as *const __m256i;
                    let halves = [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))];
                    for h in 0..2 {
                        let v = halves[h];
                        let cols = [
                            _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(v)),
                            _mm256_srai_epi32::<24>(_mm256_slli_epi32::<16>(v)),
                            _mm256_srai_epi32::<24>(_mm256_slli_epi32::<8>(v)),
                            _mm256_srai_epi32::<24>(v),
                        ];
                        for (j, c) in cols.into_iter().enumerate() {
                            let f = _mm256_mul_ps(_mm256_cvtepi32_ps(c), scale[h]);
                            _mm256_storeu_ps(o.add(j * TILE + 8 * h), f);
                        }
                    }
                    o = o.add(4 * TILE);
                }
            }
        }
    }

    /// [`super::tile_reference`] for `MR` rows: 2·`MR` registers of 8 chains.
    ///
    /// # Safety
    /// AVX2 and FMA; `xs` holds `MR` rows of stride `k` with `kc` values each, `wide`
    /// `kc · 16` values, `acc` `MR · 16`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const MR: usize>(
        xs: &[f32],
        k: usize,
        kc: usize,
        wide: &[f32],
        acc: &mut [f32],
    ) {
        assert!(
            xs.len() >= (MR - 1) * k + kc && wide.len() >= kc * TILE && acc.len() >= MR * TILE,
            "tile bounds"
        );
        // SAFETY: in bounds (checked above).
        unsafe {
            let mut a = [[_mm256_setzero_ps(); 2]; MR];
            for (i, ai) in a.iter_mut().enumerate() {
                let p = acc.as_ptr().add(i * TILE);
                *ai = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
            }
            let x = xs.as_ptr();
            let w = wide.as_ptr();
            for kk in 0..kc {
                let w0 = _mm256_loadu_ps(w.add(kk * TILE));
                let w1 = _mm256_loadu_ps(w.add(kk * TILE + 8));
                for (i, ai) in a.iter_mut().enumerate() {
                    let xb = _mm256_broadcast_ss(&*x.add(i * k + kk));
                    ai[0] = _mm256_fmadd_ps(xb, w0, ai[0]);
                    ai[1] = _mm256_fmadd_ps(xb, w1, ai[1]);
                }
            }
            for (i, ai) in a.iter().enumerate() {
                let p = acc.as_mut_ptr().add(i * TILE);
                _mm256_storeu_ps(p, ai[0]);
                _mm256_storeu_ps(p.add(8), ai[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bits, test_values};
    use dsv2_core::quant::{quantize_tensor, QuantizedTensor};
    use dsv2_core::{DType, TensorView};

    fn q8(n: usize, k: usize, seed: u64) -> QuantizedTensor {
        let w = test_values(n * k, seed);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        quantize_tensor(
            &TensorView::owned("w", DType::F32, vec![n, k], bytes),
            QuantFormat::Q8,
        )
    }

    /// Every weight row dequantized by the format's reader (`f32(q)·f32(d)`, exact).
    fn dequantized(w: &QuantizedTensor) -> Vec<f32> {
        let mut out = vec![0.0f32; w.rows * w.cols];
        for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
            w.dequantize_row(r, row);
        }
        out
    }

    /// The whole product from the definition: one fused chain per output.
    fn reference(x: &[f32], m: usize, w: &QuantizedTensor) -> Vec<f32> {
        let (n, k, wd) = (w.rows, w.cols, dequantized(w));
        let mut y = vec![0.0f32; m * n];
        for (o, v) in y.iter_mut().enumerate() {
            let (i, r) = (o / n, o % n);
            *v = (0..k).fold(0.0f32, |acc, t| x[i * k + t].mul_add(wd[r * k + t], acc));
        }
        y
    }

    #[test]
    fn widening_equals_the_reference_for_every_byte() {
        // Every int8 code in every position of a unit, with scales of both signs.
        let (n, k) = (16, 4096);
        let q: Vec<u8> = (0..n * k).map(|i| (i * 7 % 256) as u8).collect();
        let s: Vec<half::f16> = (0..n * k / BLOCK)
            .map(|i| half::f16::from_f32((i as f32 - 900.0) * 1.7e-3))
            .collect();
        for (k0, kc) in [(0, k), (1024, 2048), (4064, 32)] {
            let (mut got, mut want) = (vec![0.0; kc * TILE], vec![0.0; kc * TILE]);
            widen(&q, &s, k0, kc, &mut got);
            widen_reference(&q, &s, k0, kc, &mut want);
            assert_eq!(got, want, "{k0} {kc}");
        }
    }

    #[test]
    fn register_tiles_equal_the_scalar_reference() {
        if !dsv2_core::isa::avx2() {
            return;
        }
        let (k, kc) = (96, 64);
        let wide = test_values(kc * TILE, 5);
        let xs = test_values(MR * k, 6);
        for mr in 1..=MR {
            let start = test_values(mr * TILE, 7);
            let (mut got, mut want) = (start.clone(), start);
            tile_rows(&xs, k, mr, 16, kc, &wide, &mut got);
            tile_reference(&xs[16..], k, mr, kc, &wide, &mut want);
            assert_eq!(bits(&got), bits(&want), "{mr} rows");
        }
    }

    #[test]
    fn products_equal_the_reference_bit_for_bit() {
        if !dsv2_core::isa::avx2() {
            return;
        }
        // Every register-tile height, a ragged last tile, and widths across K_CHUNK.
        for (m, n, k) in [(1, 16, 64), (7, 40, 1408), (13, 33, 2048), (6, 16, 2080)] {
            let w = q8(n, k, 3 + n as u64);
            let x = test_values(m * k, 11 + k as u64);
            let mut y = vec![f32::NAN; m * n];
            matmul(&x, m, QMatrix::of(&w, 2), &mut y);
            let want = reference(&x, m, &w);
            assert_eq!(bits(&y), bits(&want), "{m}x{n}x{k}");
        }
    }

    #[test]
    fn f32_rows_are_closer_to_the_exact_product_than_two_int8_terms() {
        if !dsv2_core::isa::avx2() {
            return;
        }
        let (m, n, k) = (5, 48, 2048);
        let w = q8(n, k, 21);
        let x = test_values(m * k, 22);
        let mut y = vec![0.0; m * n];
        matmul(&x, m, QMatrix::of(&w, 2), &mut y);
        let mut terms = vec![0.0; m * n];
        crate::qmatmul::qmatmul(&x, m, QMatrix::of(&w, 2), &mut terms);
        // The product of x and the dequantized weights in f64.
        let wd = dequantized(&w);
        let exact: Vec<f64> = (0..m * n)
            .map(|o| {
                let (i, r) = (o / n, o % n);
                (0..k)
                    .map(|t| x[i * k + t] as f64 * wd[r * k + t] as f64)
                    .sum()
            })
            .collect();
        let err = |v: &[f32]| {
            v.iter()
                .zip(&exact)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0f64, f64::max)
        };
        let scale = exact.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(4.0 * err(&y) < err(&terms), "{} {}", err(&y), err(&terms));
        // Measured: f32 rows 1.4e-6 of the largest output, two int8 terms 1.6e-5.
        assert!(err(&y) < 1e-5 * scale && err(&terms) < 1e-4 * scale);
    }
}
