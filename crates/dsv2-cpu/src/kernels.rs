//! Small numeric kernels: element conversion, dot products, the dense linear layer.
//!
//! Weights are read in their checkpoint dtype (bf16, f16 or f32) and widened to f32
//! inside the kernel; activations are f32. `unsafe` here is limited to writing disjoint
//! output ranges from several threads and to the `gemm` crate's raw-pointer interface;
//! the tiled, batch-invariant weight product lives in [`crate::matmul`].

use half::{bf16, f16};

/// A stored weight element that widens to f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and back.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Rounds every value to bf16 in place.
pub fn round_bf16_slice(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round_bf16(*v));
}

/// Whether the CPU has AVX2 (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2"))
}

/// `Σ w[i] * x[i]` with eight independent f32 accumulators (vectorizes well). Compiled
/// for AVX2 where the CPU has it: the same operations in the same order (no FMA), so the
/// same result as the baseline build, only in wider registers.
#[inline]
pub fn dot<E: Elem>(w: &[E], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { dot_avx2(w, x) };
    }
    dot_body(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2<E: Elem>(w: &[E], x: &[f32]) -> f32 {
    dot_body(w, x)
}

#[inline(always)]
fn dot_body<E: Elem>(w: &[E], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0.0f32; 8];
    let wc = w.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (wv, xv) in wc.zip(xc) {
        for j in 0..8 {
            acc[j] += wv[j].to_f32() * xv[j];
        }
    }
    let mut tail = 0.0f32;
    for (a, b) in wr.iter().zip(xr) {
        tail += a.to_f32() * b;
    }
    let s0 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s1 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    (s0 + s1) + tail
}

/// `y += a * w` (widening `w`); AVX2 where present, with the same results.
#[inline]
pub fn axpy<E: Elem>(a: f32, w: &[E], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { axpy_avx2(a, w, y) };
    }
    axpy_body(a, w, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2<E: Elem>(a: f32, w: &[E], y: &mut [f32]) {
    axpy_body(a, w, y)
}

#[inline(always)]
fn axpy_body<E: Elem>(a: f32, w: &[E], y: &mut [f32]) {
    for (yv, wv) in y.iter_mut().zip(w) {
        *yv += a * wv.to_f32();
    }
}

/// A raw pointer that may be shared across rayon tasks writing disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: used only to write disjoint index ranges from parallel tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, batch-invariant (see [`crate::matmul`]).
pub fn linear<E: crate::matmul::KindOf>(
    x: &[f32],
    m: usize,
    w: &[E],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    crate::matmul::matmul(x, m, w, n, k, y)
}

/// A strided f32 matrix view for [`gemm_f32`]: element `(r, c)` is at
/// `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]` in f32 through the `gemm` crate (single-threaded;
/// callers parallelize outside). Its summation order depends on the shapes, so it is
/// used only where all rows belong to one sequence (attention within a sequence).
///
/// # Panics
/// If a view is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: &MatRef<'_>, rows: usize, cols: usize| {
        (rows - 1) * v.row_stride + (cols.max(1) - 1) * v.col_stride
    };
    if k > 0 {
        assert!(a.data.len() > last(&a, m, k) && b.data.len() > last(&b, k, n));
    }
    assert!(dst.len() > (m - 1) * dst_row_stride + n - 1);
    // SAFETY: every index the strides reach was bounds-checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Index of the largest value, the first on ties.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `silu(x) = x / (1 + e^-x)` in f32.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_paths_agree_bit_for_bit() {
        let x = crate::test_values(1411, 1);
        let w: Vec<bf16> = crate::test_values(1411, 2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        assert_eq!(dot(&w, &x).to_bits(), dot_body(&w, &x).to_bits());
        assert_eq!(dot(&x, &x).to_bits(), dot_body(&x, &x).to_bits());
        let (mut a, mut b) = (x.clone(), x.clone());
        axpy(0.37, &w, &mut a);
        axpy_body(0.37, &w, &mut b);
        assert_eq!(a, b);
    }
    use crate::test_values as values;

    #[test]
    fn dot_and_axpy_match_plain_loops() {
        let w: Vec<bf16> = values(1411, 3).into_iter().map(bf16::from_f32).collect();
        let x = values(1411, 4);
        let plain: f64 = w.iter().zip(&x).map(|(a, b)| a.to_f64() * *b as f64).sum();
        assert!((dot(&w, &x) as f64 - plain).abs() < 1e-4);
        let mut y = x.clone();
        axpy(0.5, &w, &mut y);
        for i in 0..x.len() {
            assert_eq!(y[i], x[i] + 0.5 * w[i].to_f32());
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }
}
