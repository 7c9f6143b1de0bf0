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

/// `a · b + c` rounded once, as `f32::mul_add`, for the portable kernels.
///
/// Where the build has no FMA instruction (x86-64's baseline, which the portable paths
/// are compiled for), `mul_add` is a call into libm for every multiply-add — a software
/// routine on CPUs without FMA, and a call that stops vectorization everywhere. This is
/// the same value in plain f64 arithmetic the compiler inlines and vectorizes: the
/// product of two f32 is exact in f64 (48 of its 53 bits), the sum is rounded to odd at
/// f64 precision (the round-to-nearest sum and its exact error, `TwoSum`, pick the odd
/// neighbour when the sum is inexact), and rounding that to the nearest f32 gives the
/// correctly rounded result (Boldo and Melquiond: rounding to odd with at least two
/// extra bits, then to nearest, rounds once). Bit for bit `f32::mul_add` on every input,
/// non-finite ones included (tested).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(
        target_feature = "fma",
        not(any(target_arch = "x86_64", target_arch = "x86"))
    )) {
        // An instruction (aarch64 and most other targets have it in their baseline).
        a.mul_add(b, c)
    } else {
        fma_in_f64(a, b, c)
    }
}

/// [`fma`] in f64 arithmetic, rounded to odd then to f32.
#[inline(always)]
fn fma_in_f64(a: f32, b: f32, c: f32) -> f32 {
    let (p, q) = (a as f64 * b as f64, c as f64);
    let sum = p + q;
    // TwoSum: `sum + err` is `p + q` exactly.
    let p_part = sum - q;
    let q_part = sum - p_part;
    let err = (p - p_part) + (q - q_part);
    let bits = sum.to_bits();
    // Inexact with an even last bit: the odd neighbour towards the exact sum.
    let odd = if err != 0.0 && bits & 1 == 0 && sum.is_finite() {
        if (err > 0.0) == (sum > 0.0) {
            bits + 1
        } else {
            bits - 1
        }
    } else {
        bits
    };
    f64::from_bits(odd) as f32
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

/// [`argmax`] of each `v`-long row of `x` into `out`, over spans of `span` values in one
/// parallel loop: what [`argmax`] of each row gives (its first largest value; NaNs never
/// win unless the row starts with one), without one thread's serial pass over a decode
/// batch's logits.
pub fn argmax_rows(x: &[f32], v: usize, span: usize, out: &mut [u32]) {
    assert!(v > 0 && span > 0 && x.len() >= out.len() * v, "argmax rows");
    let spans = v.div_ceil(span);
    let mut best = crate::scratch::take_overwritten::<u32>(out.len() * spans);
    crate::team::for_each_chunk_mut(&mut best, 1, |i, b| {
        let (r, p) = (i / spans, i % spans);
        let part = &x[r * v..][p * span..v.min((p + 1) * span)];
        b[0] = first_max(part).map_or(u32::MAX, |j| (p * span + j) as u32);
    });
    for (r, o) in out.iter_mut().enumerate() {
        let row = &x[r * v..][..v];
        let mut winner = 0;
        if !row[0].is_nan() {
            for &j in best[r * spans..][..spans]
                .iter()
                .filter(|&&j| j != u32::MAX)
            {
                if row[j as usize] > row[winner] {
                    winner = j as usize;
                }
            }
        }
        *o = winner as u32;
    }
}

/// The first index of the largest non-NaN value of `x` (none if every value is NaN), in
/// two vectorizable passes: the maximum in 16 lanes, then its first position.
fn first_max(x: &[f32]) -> Option<usize> {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let blocks = x.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for (m, &v) in lanes.iter_mut().zip(block) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    x.iter().position(|&v| v == max)
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
    fn argmax_rows_is_the_serial_argmax() {
        let mut rows = Vec::new();
        for v in [1, 5, 16, 17, 100, 1000] {
            for kind in 0..6 {
                let mut row = crate::test_values(v, (v * 6 + kind) as u64);
                match kind {
                    1 => row.iter_mut().step_by(3).for_each(|x| *x = f32::NAN),
                    2 => row[0] = f32::NAN,
                    3 => row.iter_mut().for_each(|x| *x = f32::NAN),
                    4 => row.iter_mut().for_each(|x| *x = (*x * 4.0).round()),
                    5 => row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                    _ => {}
                }
                rows.push(row);
            }
        }
        for row in rows {
            let v = row.len();
            let x: Vec<f32> = [row.clone(), row.clone()].concat();
            for span in [1, 3, 16, 64, 4096] {
                let mut out = [9u32; 2];
                argmax_rows(&x, v, span, &mut out);
                assert_eq!(out, [argmax(&row); 2], "{row:?} span {span}");
            }
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }

    /// The f64 fused multiply-add is `f32::mul_add` bit for bit: random bit patterns
    /// (every class: zeros, subnormals, infinities, NaNs), near-cancellations, sums whose
    /// f64 rounding lands on an f32 halfway point (where rounding twice to nearest
    /// differs), and products of small integers by scales as the int8 kernels make them.
    #[test]
    fn the_f64_fma_rounds_once() {
        let same = |a: f32, b: f32, c: f32| {
            let (want, got) = (a.mul_add(b, c), fma_in_f64(a, b, c));
            assert!(
                want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                "fma({a:e}, {b:e}, {c:e}) = {want:e}, f64 path {got:e}"
            );
        };
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200_000 {
            let r = next();
            same(
                f32::from_bits(r as u32),
                f32::from_bits((r >> 32) as u32),
                f32::from_bits(next() as u32),
            );
        }
        for _ in 0..200_000 {
            let (r, t) = (next(), next());
            // Operands of nearby magnitudes, so the sums cancel and round in every way.
            let a = f32::from_bits(0x3f00_0000 | (r as u32 & 0x00ff_ffff));
            let b = f32::from_bits(0x3f00_0000 | ((r >> 32) as u32 & 0x00ff_ffff));
            let c = f32::from_bits(0x3e80_0000 + (t as u32 & 0x01ff_ffff))
                * (1.0 - 2.0 * (t >> 63) as f32);
            same(a, b, c);
            // Integer block sums times scales (the int8 kernels' shape).
            let sum = ((t >> 8) as i32 % 600_000) as f32;
            same(sum, b * 1e-3, c);
        }
        // The product an exact f32 halfway point, the addend far below it: the f64 sum
        // rounds to the halfway point, a second rounding to nearest would go to even.
        let half_ulp = f32::EPSILON / 2.0;
        for tiny in [1e-30f32, -1e-30, f32::from_bits(1), -f32::from_bits(1)] {
            same(1.0 + half_ulp, 1.0, tiny);
            same(1.0 + 3.0 * half_ulp, 1.0, tiny);
            same(-(1.0 + half_ulp), 1.0, tiny);
        }
        for (a, b, c) in [
            (0.0, 0.0, -0.0),
            (-0.0, 0.0, 0.0),
            (1.0, -1.0, 1.0),
            (f32::MAX, 2.0, -f32::MAX),
            (f32::MAX, f32::MAX, f32::NEG_INFINITY),
            (f32::INFINITY, 0.0, 1.0),
            (f32::MIN_POSITIVE, 0.5, f32::from_bits(1)),
        ] {
            same(a, b, c);
        }
    }
}
