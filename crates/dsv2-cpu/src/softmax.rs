//! The attention's softmax over one head's scores, vectorized.
//!
//! At 4K cached tokens a V2-Lite decode token takes 65K exponentials a layer; through
//! the C library's scalar `expf` they cost ~200 µs a layer on one core, as much as a
//! third of the attention. Here `exp` is Cephes' single-precision algorithm (range
//! reduction by `ln 2` in two parts, a degree-5 polynomial, scaling by `2ⁿ` through the
//! exponent bits; within 2 ulp of the exact value on its whole range, tested) written as
//! one fixed sequence of IEEE operations, so the AVX-512, AVX2 and portable paths give
//! the same bits:
//! - `m = max(x)`; per element `e = exp(x − m)`;
//! - the sum is a 16-lane sum (lane `j` adds the elements at `k ≡ j (mod 16)` in order),
//!   then the lanes are summed as `a[j] + a[j + 8]`, then `+ 4`, `+ 2`, `+ 1`;
//! - each element is multiplied by `1 / sum`.

use crate::mla::{isa, reduce_lanes, Isa, LANES};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts: the first exact in a few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this, `exp` is 0 here (the smallest normal scale `2⁻¹²⁶` is reached at ~-87.3).
const EXP_MIN: f32 = -87.336_54;
/// Cephes `expf` polynomial, highest degree first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
];

/// `x ← softmax(x)` (see the module's arithmetic). An empty slice is left as it is.
pub(crate) fn softmax(x: &mut [f32]) {
    softmax_isa(isa(), x)
}

fn softmax_isa(isa: Isa, x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    match isa {
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::softmax512(x) },
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::softmax_avx2(x) },
        Isa::Portable => softmax_portable(x),
    }
}

/// `exp(x)` by the module's fixed sequence.
#[inline(always)]
fn exp_portable(x: f32) -> f32 {
    if x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The scalar reference of [`softmax`].
pub(crate) fn softmax_portable(x: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (k, v) in x.iter().enumerate() {
        lanes[k % LANES] = lanes[k % LANES].max(*v);
    }
    let m = lanes.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let mut acc = [0.0f32; LANES];
    for (k, v) in x.iter_mut().enumerate() {
        *v = exp_portable(*v - m);
        acc[k % LANES] += *v;
    }
    let inv = 1.0 / reduce_lanes(acc);
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax512(x: &mut [f32]) {
        let len = x.len();
        let ptr = x.as_mut_ptr();
        let mask = |k: usize| -> __mmask16 {
            let n = len - k;
            if n >= LANES {
                0xffff
            } else {
                ((1u32 << n) - 1) as u16
            }
        };
        // SAFETY (all loads and stores): masked to the elements k.. of `x`.
        unsafe {
            let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
            for k in (0..len).step_by(LANES) {
                let m = mask(k);
                mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, ptr.add(k)));
            }
            let mut lanes = [0.0f32; LANES];
            _mm512_storeu_ps(lanes.as_mut_ptr(), mv);
            let m = lanes.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let mv = _mm512_set1_ps(m);
            let mut acc = _mm512_setzero_ps();
            for k in (0..len).step_by(LANES) {
                let mk = mask(k);
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, ptr.add(k)), mv));
                _mm512_mask_storeu_ps(ptr.add(k), mk, e);
                acc = _mm512_mask_add_ps(acc, mk, acc, e);
            }
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
            let inv = _mm512_set1_ps(1.0 / reduce_lanes(lanes));
            for k in (0..len).step_by(LANES) {
                let mk = mask(k);
                let v = _mm512_maskz_loadu_ps(mk, ptr.add(k));
                _mm512_mask_storeu_ps(ptr.add(k), mk, _mm512_mul_ps(v, inv));
            }
        }
    }

    #[inline(always)]
    unsafe fn exp512(x: __m512) -> __m512 {
        // SAFETY: AVX-512 F (the caller's features).
        unsafe {
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
            );
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
            let mut p = _mm512_set1_ps(P[0]);
            for c in &P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            // 2ⁿ for the lanes at or above EXP_MIN (n ≥ −126 there); 0 below.
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
            let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(bits))
        }
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_avx2(x: &mut [f32]) {
        let len = x.len();
        // Lanes 0..8 and 8..16 of the 16-lane order; a short last chunk goes through a
        // padded copy.
        let full = len / LANES * LANES;
        let ptr = x.as_mut_ptr();
        // SAFETY (all loads and stores): within the `full` elements, or on `tail`.
        unsafe {
            let mut tail = [f32::NEG_INFINITY; LANES];
            tail[..len - full].copy_from_slice(&x[full..]);
            let mut mlo = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut mhi = mlo;
            for k in (0..full).step_by(LANES) {
                mlo = _mm256_max_ps(mlo, _mm256_loadu_ps(ptr.add(k)));
                mhi = _mm256_max_ps(mhi, _mm256_loadu_ps(ptr.add(k + 8)));
            }
            mlo = _mm256_max_ps(mlo, _mm256_loadu_ps(tail.as_ptr()));
            mhi = _mm256_max_ps(mhi, _mm256_loadu_ps(tail.as_ptr().add(8)));
            let mut lanes = [0.0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), mlo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), mhi);
            let m = lanes.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let mv = _mm256_set1_ps(m);
            let (mut alo, mut ahi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for k in (0..full).step_by(LANES) {
                let elo = exp256(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(k)), mv));
                let ehi = exp256(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(k + 8)), mv));
                _mm256_storeu_ps(ptr.add(k), elo);
                _mm256_storeu_ps(ptr.add(k + 8), ehi);
                alo = _mm256_add_ps(alo, elo);
                ahi = _mm256_add_ps(ahi, ehi);
            }
            if full < len {
                // The padding is −∞: exp gives 0 there, and x + 0 = x in the lanes' sums.
                let elo = exp256(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mv));
                let ehi = exp256(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr().add(8)), mv));
                _mm256_storeu_ps(tail.as_mut_ptr(), elo);
                _mm256_storeu_ps(tail.as_mut_ptr().add(8), ehi);
                alo = _mm256_add_ps(alo, elo);
                ahi = _mm256_add_ps(ahi, ehi);
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), alo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), ahi);
            let inv = 1.0 / reduce_lanes(lanes);
            let iv = _mm256_set1_ps(inv);
            for k in (0..full).step_by(8) {
                _mm256_storeu_ps(ptr.add(k), _mm256_mul_ps(_mm256_loadu_ps(ptr.add(k)), iv));
            }
            for (d, e) in x[full..].iter_mut().zip(tail) {
                *d = e * inv;
            }
        }
    }

    #[inline(always)]
    unsafe fn exp256(x: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA (the caller's features).
        unsafe {
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            );
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
            let mut p = _mm256_set1_ps(P[0]);
            for c in &P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN));
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mla::isas;
    use crate::test_values;

    #[test]
    fn exp_is_within_two_ulp_on_its_range() {
        let mut x = -87.3f32;
        let mut worst = 0.0f64;
        while x <= 0.0 {
            let got = exp_portable(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_portable(0.0), 1.0);
        assert_eq!(exp_portable(-100.0), 0.0);
        assert_eq!(exp_portable(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_agrees_bit_for_bit_and_matches_f64() {
        for len in [1, 2, 7, 15, 16, 17, 33, 100, 4099] {
            let mut want: Vec<f32> = test_values(len, len as u64)
                .into_iter()
                .map(|v| 30.0 * v)
                .collect();
            let input = want.clone();
            softmax_portable(&mut want);
            // Against the exact exponentials of the f32 differences `x − m` (their own
            // rounding, up to half an ulp of |x − m|, is the f32 softmax's, libm's too).
            let m = input.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let sum: f64 = input.iter().map(|v| ((*v - m) as f64).exp()).sum();
            for (w, v) in want.iter().zip(&input) {
                let exact = ((*v - m) as f64).exp() / sum;
                assert!(
                    (*w as f64 - exact).abs() <= 1e-6 * exact + 1e-30,
                    "{len}: {w} vs {exact} (input {v}, max {m})"
                );
            }
            for isa in isas() {
                let mut got = input.clone();
                softmax_isa(isa, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa:?} {len}");
            }
        }
        // Masked (−∞) entries get 0.
        let mut x = vec![0.5, f32::NEG_INFINITY, 0.5];
        softmax(&mut x);
        assert_eq!(x, vec![0.5, 0.0, 0.5]);
    }
}
