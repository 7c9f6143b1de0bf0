//! The attention's softmax over one head's scores, vectorized.
//!
//! At 4K cached tokens a V2-Lite decode token takes 65K exponentials a layer; through
//! the C library's scalar `expf` they cost ~200 µs a layer on one core, as much as a
//! third of the attention. Here `exp` is [`crate::exp`]'s (Cephes' algorithm as one fixed
//! sequence of IEEE operations), so the AVX-512, AVX2 and portable paths give the same
//! bits:
//! - `m = max(x)`; per element `e = exp(x − m)`;
//! - the sum is a 16-lane sum (lane `j` adds the elements at `k ≡ j (mod 16)` in order),
//!   then the lanes are summed as `a[j] + a[j + 8]`, then `+ 4`, `+ 2`, `+ 1`;
//! - each element is multiplied by `1 / sum`.

use crate::exp::exp_portable;
use crate::mla::{isa, reduce_lanes, Isa, LANES};

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
    use crate::exp::x86::{exp256, exp512};
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mla::isas;
    use crate::test_values;

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
