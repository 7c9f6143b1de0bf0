//! `exp` in f32 as one fixed sequence of IEEE operations, and the SwiGLU built on it.
//!
//! The C library's scalar `expf` costs ~4 ns a value: 11K of them a V2-Lite decode layer
//! (SwiGLU over the chosen experts' hidden rows) and 65K a layer of attention at 4K
//! cached tokens. Here `exp` is Cephes' single-precision algorithm (range reduction by
//! `ln 2` in two parts, a degree-5 polynomial, scaling by `2ⁿ` through the exponent
//! bits; within 2 ulp of the exact value on its whole range, tested), written once per
//! instruction set with the same operations in the same order (fused multiply-adds
//! where the portable path calls `mul_add`), so the AVX-512, AVX2 and portable paths
//! give the same bits.

use crate::kernels::round_bf16;
use crate::mla::{isa, Isa};

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

/// `exp(x)` by the module's fixed sequence, the same operations as the vector paths, and
/// without a branch: inlined into a loop over the lanes of an array it vectorizes under
/// the caller's target features. Below `EXP_MIN` (and for NaN, as the vector paths) it
/// is 0.
#[inline(always)]
pub(crate) fn exp_portable(x: f32) -> f32 {
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // `n` is integral; out of range (x below EXP_MIN or −∞) the bits are discarded below.
    let v = y * f32::from_bits(((n as i32).wrapping_add(127) as u32) << 23);
    if x >= EXP_MIN {
        v
    } else {
        0.0
    }
}

/// Largest argument [`silu_mul`] passes to `exp`: `e^88` is finite in f32 (`2ⁿ` with
/// `n ≤ 127`), and `x / (1 + e^88)` is already 0 to within f32's range for `x ≥ −88`.
const SILU_EXP_MAX: f32 = 88.0;

/// Values per pass of [`silu_mul`] (a stack buffer of exponentials).
const CHUNK: usize = 64;

/// SwiGLU's `gate ← silu(gate) · up`, `silu(g) = g / (1 + e^−g)`, with the exponential
/// above. Under `bf16` the reference's rounding points: `round(round(silu(round(g))) ·
/// round(u))`. Every instruction set gives the same bits.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32], bf16: bool) {
    silu_mul_isa(isa(), gate, up, bf16)
}

fn silu_mul_isa(isa: Isa, gate: &mut [f32], up: &[f32], bf16: bool) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths");
    let mut e = [0.0f32; CHUNK];
    for (g, u) in gate.chunks_mut(CHUNK).zip(up.chunks(CHUNK)) {
        let e = &mut e[..g.len()];
        for (e, g) in e.iter_mut().zip(g.iter()) {
            let g = if bf16 { round_bf16(*g) } else { *g };
            // `min` keeps the bound for a NaN `g`, whose NaN then carries through below.
            *e = (-g).min(SILU_EXP_MAX);
        }
        exp_in_place(isa, e);
        for ((g, u), e) in g.iter_mut().zip(u).zip(e.iter()) {
            *g = if bf16 {
                round_bf16(round_bf16(round_bf16(*g) / (1.0 + e)) * round_bf16(*u))
            } else {
                *g / (1.0 + e) * u
            };
        }
    }
}

/// `x ← exp(x)` elementwise, for `x ≤ 88.7` (larger values are out of `exp`'s range).
fn exp_in_place(isa: Isa, x: &mut [f32]) {
    match isa {
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::exp_in_place512(x) },
        // SAFETY: the features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::exp_in_place_avx2(x) },
        Isa::Portable => x.iter_mut().for_each(|v| *v = exp_portable(*v)),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place512(x: &mut [f32]) {
        let (len, ptr) = (x.len(), x.as_mut_ptr());
        for k in (0..len).step_by(16) {
            let n = (len - k).min(16);
            let m = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: masked to the elements k..k + n of `x`.
            unsafe {
                let v = exp512(_mm512_maskz_loadu_ps(m, ptr.add(k)));
                _mm512_mask_storeu_ps(ptr.add(k), m, v);
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place_avx2(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 floats of `c`.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp256(_mm256_loadu_ps(c.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut pad = [0.0f32; 8];
            pad[..rest.len()].copy_from_slice(rest);
            // SAFETY: 8 floats of `pad`.
            unsafe { _mm256_storeu_ps(pad.as_mut_ptr(), exp256(_mm256_loadu_ps(pad.as_ptr()))) };
            rest.copy_from_slice(&pad[..rest.len()]);
        }
    }

    #[inline(always)]
    pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
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

    #[inline(always)]
    pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
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
    use crate::kernels::silu;
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
        assert_eq!(exp_portable(f32::NAN), 0.0);
    }

    #[test]
    fn silu_mul_agrees_bit_for_bit_and_with_libm() {
        for len in [1, 7, 16, 63, 64, 65, 200, 1408] {
            let gate: Vec<f32> = test_values(len, len as u64)
                .into_iter()
                .map(|v| 12.0 * v)
                .collect();
            let up = test_values(len, 7 + len as u64);
            for bf16 in [false, true] {
                let mut want = gate.clone();
                silu_mul_isa(Isa::Portable, &mut want, &up, bf16);
                if !bf16 {
                    for ((w, g), u) in want.iter().zip(&gate).zip(&up) {
                        let libm = silu(*g) * u;
                        assert!(
                            (w - libm).abs() <= 4e-7 * libm.abs() + 1e-30,
                            "{g}: {w} vs {libm}"
                        );
                    }
                }
                for isa in isas() {
                    let mut got = gate.clone();
                    silu_mul_isa(isa, &mut got, &up, bf16);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{isa:?} {len} bf16 {bf16}");
                }
            }
        }
        // Far tails: silu(−100) is (almost) 0, silu(100) is 100, NaN stays NaN.
        let mut g = vec![-100.0, 100.0, f32::NAN, -1e30, 1e30];
        silu_mul(&mut g, &[1.0; 5], false);
        assert!(g[0].abs() < 1e-35 && g[1] == 100.0 && g[2].is_nan());
        assert!(g[3].abs() < 1e-5 && g[4] == 1e30, "{g:?}");
    }
}
