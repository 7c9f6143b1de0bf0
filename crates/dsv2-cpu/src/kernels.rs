//! Small numeric kernels: element conversion, rounding, the dense linear layer.
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

/// A raw pointer that parallel tasks share, each writing its own disjoint elements.
pub(crate) struct SyncPtr<T = f32>(pub *mut T);
// SAFETY: used only to write disjoint index ranges from parallel tasks.
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
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
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }
}
