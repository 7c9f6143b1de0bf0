//! `y[m, n] = x[m, k] · w[n, k]ᵀ` for `q8`/`q4` weights, batch-invariant.
//!
//! Activations are quantized per row to int8 in blocks of 32 (scale `amax/127`, like
//! llama.cpp's `q8_0`). Per output and block, the 32 integer products are summed exactly
//! into 8 i32 lanes (lane `l` holds elements `4l..4l+4`), converted to f32 and multiplied
//! by the two scales into 8 f32 lane accumulators; lanes are reduced in a fixed tree at
//! the end. The integer part is exact, so the AVX2 (`maddubs`) and AVX-VNNI (`dpbusd`)
//! paths give identical results; every output uses the same arithmetic whatever `m` is.

use std::cell::RefCell;

use dsv2_core::quant::{QuantFormat, BLOCK};
use half::f16;
use rayon::prelude::*;

use crate::kernels::SyncPtr;

/// Weight rows per parallel task.
const ROW_BLOCK: usize = 32;
/// Activation rows per tile.
const MR: usize = 4;
/// Weight rows per tile.
const NR: usize = 2;

/// A quantized weight matrix borrowed from its planes.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Row-major quantized values (`format.row_bytes(cols)` bytes per row).
    pub q: &'a [u8],
    /// `[rows, cols/32]` block scales.
    pub scales: &'a [f16],
}

/// Activations quantized to int8 blocks.
#[derive(Default)]
pub struct QActivations {
    q: Vec<i8>,
    /// `[m, k/32]` block scales.
    d: Vec<f32>,
}

impl QActivations {
    /// Quantizes `x[m, k]` row by row (reusing the buffers).
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        self.q.resize(m * k, 0);
        self.d.resize(m * k / BLOCK, 0.0);
        for ((xb, qb), d) in x[..m * k]
            .chunks_exact(BLOCK)
            .zip(self.q.chunks_exact_mut(BLOCK))
            .zip(self.d.iter_mut())
        {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
        }
    }
}

thread_local! {
    /// Quantized activations of the calling thread, reused across calls (no allocation
    /// per token once the buffers have grown).
    static ACTIVATIONS: RefCell<QActivations> = RefCell::new(QActivations::default());
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            if avx2 && std::is_x86_feature_detected!("avxvnni") {
                return Isa::AvxVnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Name of the quantized-kernel instruction path in use (for reports).
pub fn isa_name() -> &'static str {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => "avx-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// `y[m, n] = x[m, k] · wᵀ` for a quantized `w` `[n, k]`.
pub fn qmatmul(x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert!(k % BLOCK == 0 && x.len() >= m * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    ACTIVATIONS.with(|acts| {
        let mut acts = acts.borrow_mut();
        acts.quantize(x, m, k);
        let acts = &*acts;
        let y_ptr = SyncPtr(y.as_mut_ptr());
        let isa = isa();
        (0..n.div_ceil(ROW_BLOCK)).into_par_iter().for_each(|b| {
            let (n0, n1) = (b * ROW_BLOCK, ((b + 1) * ROW_BLOCK).min(n));
            let mut i0 = 0;
            while i0 < m {
                let mr = (m - i0).min(MR);
                let mut j0 = n0;
                while j0 < n1 {
                    let nr = (n1 - j0).min(NR);
                    let mut tile = [[0.0f32; NR]; MR];
                    tile_dispatch(isa, mr, nr, acts, i0, w, j0, &mut tile);
                    for (i, row) in tile.iter().enumerate().take(mr) {
                        for (j, &v) in row.iter().enumerate().take(nr) {
                            // SAFETY: (i0 + i, j0 + j) lies in this task's column block.
                            unsafe { *y_ptr.get().add((i0 + i) * n + j0 + j) = v };
                        }
                    }
                    j0 += nr;
                }
                i0 += mr;
            }
        });
    });
}

#[allow(clippy::too_many_arguments)]
fn tile_dispatch(
    isa: Isa,
    mr: usize,
    nr: usize,
    acts: &QActivations,
    i0: usize,
    w: QMatrix<'_>,
    j0: usize,
    out: &mut [[f32; NR]; MR],
) {
    macro_rules! go {
        ($f:ident $(, $extra:expr)?) => {
            match (mr, nr) {
                (1, 1) => $f::<1, 1>(acts, i0, w, j0, out $(, $extra)?),
                (1, 2) => $f::<1, 2>(acts, i0, w, j0, out $(, $extra)?),
                (2, 1) => $f::<2, 1>(acts, i0, w, j0, out $(, $extra)?),
                (2, 2) => $f::<2, 2>(acts, i0, w, j0, out $(, $extra)?),
                (3, 1) => $f::<3, 1>(acts, i0, w, j0, out $(, $extra)?),
                (3, 2) => $f::<3, 2>(acts, i0, w, j0, out $(, $extra)?),
                (4, 1) => $f::<4, 1>(acts, i0, w, j0, out $(, $extra)?),
                (4, 2) => $f::<4, 2>(acts, i0, w, j0, out $(, $extra)?),
                _ => unreachable!("tile {mr}x{nr}"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA, F16C and AVX-VNNI (checked in `isa`).
        Isa::AvxVnni => unsafe { go!(tile_avx_vnni) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked in `isa`).
        Isa::Avx2 => unsafe { go!(tile_avx2) },
        Isa::Portable => go!(tile_portable),
    }
}

/// The fixed lane-reduction tree (the same as the dense kernel's).
#[inline(always)]
fn reduce_lanes(l: [f32; 8]) -> f32 {
    let s0 = (l[0] + l[4]) + (l[1] + l[5]);
    let s1 = (l[2] + l[6]) + (l[3] + l[7]);
    s0 + s1
}

/// The 32 signed weights of block `b` of row `r`.
#[inline(always)]
fn weight_block(w: &QMatrix<'_>, r: usize, b: usize) -> [i8; BLOCK] {
    let mut out = [0i8; BLOCK];
    match w.format {
        QuantFormat::Q8 => {
            let at = r * w.cols + b * BLOCK;
            for (o, &v) in out.iter_mut().zip(&w.q[at..at + BLOCK]) {
                *o = v as i8;
            }
        }
        QuantFormat::Q4 => {
            let at = r * w.cols / 2 + b * BLOCK / 2;
            for i in 0..BLOCK / 2 {
                let byte = w.q[at + i];
                out[i] = (byte & 0x0f) as i8 - 8;
                out[i + BLOCK / 2] = (byte >> 4) as i8 - 8;
            }
        }
    }
    out
}

fn tile_portable<const R: usize, const C: usize>(
    acts: &QActivations,
    i0: usize,
    w: QMatrix<'_>,
    j0: usize,
    out: &mut [[f32; NR]; MR],
) {
    let k = w.cols;
    let nb = k / BLOCK;
    let mut acc = [[[0.0f32; 8]; C]; R];
    for b in 0..nb {
        for j in 0..C {
            let wb = weight_block(&w, j0 + j, b);
            let dw = w.scales[(j0 + j) * nb + b].to_f32();
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let row = i0 + i;
                let xq = &acts.q[row * k + b * BLOCK..row * k + (b + 1) * BLOCK];
                let d = dw * acts.d[row * nb + b];
                for (l, lane) in acc_row[j].iter_mut().enumerate() {
                    let s: i32 = (0..4)
                        .map(|t| wb[4 * l + t] as i32 * xq[4 * l + t] as i32)
                        .sum();
                    *lane += d * s as f32;
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            out[i][j] = reduce_lanes(acc[i][j]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Loads block `b` of weight row `r` as 32 signed bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn load_weights(w: &QMatrix<'_>, r: usize, b: usize) -> __m256i {
        match w.format {
            QuantFormat::Q8 => {
                let at = r * w.cols + b * BLOCK;
                let s = &w.q[at..at + BLOCK];
                // SAFETY: `s` holds 32 bytes.
                unsafe { _mm256_loadu_si256(s.as_ptr() as *const __m256i) }
            }
            QuantFormat::Q4 => {
                let at = r * w.cols / 2 + b * BLOCK / 2;
                let s = &w.q[at..at + BLOCK / 2];
                // SAFETY: `s` holds 16 bytes.
                let packed = unsafe { _mm_loadu_si128(s.as_ptr() as *const __m128i) };
                let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                let codes = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
                _mm256_sub_epi8(codes, _mm256_set1_epi8(8))
            }
        }
    }

    /// Loads 32 activation bytes of row `row`, block `b`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn load_acts(acts: &QActivations, k: usize, row: usize, b: usize) -> __m256i {
        let s = &acts.q[row * k + b * BLOCK..row * k + (b + 1) * BLOCK];
        // SAFETY: `s` holds 32 bytes.
        unsafe { _mm256_loadu_si256(s.as_ptr() as *const __m256i) }
    }

    /// Eight i32 lanes of `Σ w·x` over groups of 4 (exact), via `maddubs` + `madd`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn dot_lanes_avx2(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        // |w| ≤ 127 and |x| ≤ 127: pair sums stay within i16.
        let pairs = _mm256_maddubs_epi16(aw, sx);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// The same lanes via AVX-VNNI's `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) fn dot_lanes_vnni(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx)
    }

    /// f16 → f32 of one scale with F16C (no run-time feature check per call).
    #[inline]
    #[target_feature(enable = "f16c")]
    pub(super) fn f16_to_f32(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    macro_rules! tile_fn {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(super) fn $name<const R: usize, const C: usize>(
                acts: &QActivations,
                i0: usize,
                w: QMatrix<'_>,
                j0: usize,
                out: &mut [[f32; NR]; MR],
            ) {
                let k = w.cols;
                let nb = k / BLOCK;
                // Bounds are checked once here; the loop reads through slices of exactly
                // these rows.
                let scales: [&[f16]; C] =
                    std::array::from_fn(|j| &w.scales[(j0 + j) * nb..(j0 + j + 1) * nb]);
                let xd: [&[f32]; R] =
                    std::array::from_fn(|i| &acts.d[(i0 + i) * nb..(i0 + i + 1) * nb]);
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                for b in 0..nb {
                    let mut wv = [_mm256_setzero_si256(); C];
                    let mut dw = [0.0f32; C];
                    for j in 0..C {
                        wv[j] = load_weights(&w, j0 + j, b);
                        dw[j] = f16_to_f32(scales[j][b]);
                    }
                    for (i, acc_row) in acc.iter_mut().enumerate() {
                        let xv = load_acts(acts, k, i0 + i, b);
                        let dx = xd[i][b];
                        for j in 0..C {
                            let lanes = _mm256_cvtepi32_ps($dot(wv[j], xv));
                            let d = _mm256_set1_ps(dw[j] * dx);
                            acc_row[j] = _mm256_fmadd_ps(d, lanes, acc_row[j]);
                        }
                    }
                }
                for i in 0..R {
                    for j in 0..C {
                        let mut lanes = [0.0f32; 8];
                        // SAFETY: `lanes` holds 8 f32.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]) };
                        out[i][j] = reduce_lanes(lanes);
                    }
                }
            }
        };
    }

    tile_fn!(tile_avx2, "avx2,fma,f16c", dot_lanes_avx2);
    tile_fn!(tile_avx_vnni, "avx2,fma,f16c,avxvnni", dot_lanes_vnni);
}

#[cfg(target_arch = "x86_64")]
use x86::{tile_avx2, tile_avx_vnni};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;
    use dsv2_core::quant::quantize_row;

    struct Owned {
        format: QuantFormat,
        rows: usize,
        cols: usize,
        q: Vec<u8>,
        scales: Vec<f16>,
    }

    impl Owned {
        fn new(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> Owned {
            let src = values(rows * cols, seed);
            let rb = format.row_bytes(cols);
            let mut q = vec![0u8; rows * rb];
            let mut scales = vec![f16::ZERO; rows * cols / BLOCK];
            for r in 0..rows {
                quantize_row(
                    format,
                    &src[r * cols..(r + 1) * cols],
                    &mut q[r * rb..(r + 1) * rb],
                    &mut scales[r * cols / BLOCK..(r + 1) * cols / BLOCK],
                );
            }
            Owned {
                format,
                rows,
                cols,
                q,
                scales,
            }
        }

        fn view(&self) -> QMatrix<'_> {
            QMatrix {
                format: self.format,
                rows: self.rows,
                cols: self.cols,
                q: &self.q,
                scales: &self.scales,
            }
        }
    }

    /// Plain reference: dequantize both operands and sum in f64.
    fn reference(x: &[f32], m: usize, w: &QMatrix<'_>) -> Vec<f64> {
        let (n, k) = (w.rows, w.cols);
        let mut acts = QActivations::default();
        acts.quantize(x, m, k);
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for b in 0..k / BLOCK {
                    let wb = weight_block(w, j, b);
                    let dw = w.scales[j * k / BLOCK + b].to_f32() as f64;
                    let dx = acts.d[i * k / BLOCK + b] as f64;
                    let xb = &acts.q[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
                    for (wv, xv) in wb.iter().zip(xb) {
                        s += dw * *wv as f64 * dx * *xv as f64;
                    }
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    #[test]
    fn matches_the_plain_reference_on_ragged_sizes() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for &(m, n, k) in &[
                (1, 1, 32),
                (1, 67, 1408),
                (3, 33, 64),
                (6, 65, 96),
                (9, 40, 2048),
            ] {
                let w = Owned::new(format, n, k, 7);
                let x = values(m * k, 8);
                let mut y = vec![f32::NAN; m * n];
                qmatmul(&x, m, w.view(), &mut y);
                let r = reference(&x, m, &w.view());
                for (a, b) in y.iter().zip(&r) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f64).sqrt(),
                        "{format:?} m={m} n={n} k={k}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn instruction_paths_agree_exactly_and_rows_are_batch_invariant() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let (n, k) = (37, 1408);
            let w = Owned::new(format, n, k, 9);
            let x = values(11 * k, 10);
            let mut all = vec![0.0f32; 11 * n];
            qmatmul(&x, 11, w.view(), &mut all);
            for m in [1usize, 2, 5] {
                let mut part = vec![0.0f32; m * n];
                qmatmul(&x[3 * k..], m, w.view(), &mut part);
                for (a, b) in part.iter().zip(&all[3 * n..(3 + m) * n]) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{format:?} m={m}");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if isa() == Isa::AvxVnni {
                // The integer lanes are exact, so maddubs and dpbusd agree bit for bit.
                let mut acts = QActivations::default();
                acts.quantize(&x, 4, k);
                let (mut a, mut b) = ([[0.0f32; NR]; MR], [[0.0f32; NR]; MR]);
                // SAFETY: AVX-VNNI implies the AVX2 features (checked by `isa`).
                unsafe {
                    tile_avx2::<4, 2>(&acts, 0, w.view(), 0, &mut a);
                    tile_avx_vnni::<4, 2>(&acts, 0, w.view(), 0, &mut b);
                }
                assert_eq!(a, b);
            }
        }
    }
}
