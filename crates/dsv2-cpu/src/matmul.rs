//! The weight × activations product `y[m, n] = x[m, k] · w[n, k]ᵀ`, batch-invariant.
//!
//! Every output value is computed by the same arithmetic whatever `m` is: eight f32
//! lanes accumulate `x[i, l::8] * w[j, l::8]` in order of `k`, the lanes are reduced in a
//! fixed tree, then the `k % 8` tail is added. So a sequence's logits do not depend on
//! which other sequences share its batch (vLLM calls this batch invariance), and cached
//! decoding (m = 1) reproduces a prefill (m = many) bit for bit. Register tiles of up to
//! 4 rows × 3 weight rows give prefill reuse; decode streams the weights once.
//!
//! Three instruction paths, chosen once per process: AVX-512 (F + DQ), AVX2 + FMA + F16C
//! (lanes fused multiply-add), and a portable path (separate multiply and add). The
//! AVX-512 path computes exactly the AVX2 arithmetic, two weight rows per `zmm` (each
//! 256-bit half holds one row's eight lanes, the activations are broadcast to both
//! halves), so the two are bit-identical; the portable path differs from them in the
//! last bits (it does not fuse).

use std::sync::OnceLock;

use half::{bf16, f16};

use crate::kernels::{Elem, SyncPtr};

/// Weight rows per parallel task.
const ROW_BLOCK: usize = 48;
/// Activation rows per register tile.
const MR: usize = 4;
/// Weight rows per register tile (the AVX2 and portable kernels take up to
/// [`NR_SMALL`] at a time).
const NR: usize = 6;
/// Weight rows per AVX2/portable register tile.
const NR_SMALL: usize = 3;

/// Storage kinds the tile kernels read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    Bf16,
    F16,
}

/// Maps a weight element type to its [`Kind`].
pub trait KindOf: Elem {
    const KIND: Kind;
}

impl KindOf for f32 {
    const KIND: Kind = Kind::F32;
}
impl KindOf for bf16 {
    const KIND: Kind = Kind::Bf16;
}
impl KindOf for f16 {
    const KIND: Kind = Kind::F16;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// Every instruction path this CPU can run, best first.
#[allow(unused_mut, clippy::vec_init_then_push)] // x86-only pushes
fn available() -> Vec<Isa> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
            out.push(Isa::Avx512);
        }
        out.push(Isa::Avx2);
    }
    out.push(Isa::Portable);
    out
}

/// Whether [`dsv2_core::isa`]'s limit lets products take `isa`.
fn allowed(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => dsv2_core::isa::avx512(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => dsv2_core::isa::avx2(),
        Isa::Portable => true,
    }
}

/// The best path of this CPU within the limit.
fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        available()
            .into_iter()
            .find(|&i| allowed(i))
            .unwrap_or(Isa::Portable)
    })
}

/// Name of the instruction path in use (for reports).
pub fn isa_name() -> &'static str {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512+fma",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2+fma",
        Isa::Portable => "portable",
    }
}

/// One thread's `rounds` rounds of [`crate::peak::CHAINS`] independent f32 multiply-add
/// chains on this CPU's instruction path (512- or 256-bit FMA, or plain multiply and
/// add), for the peak probe ([`crate::peak`]); returns the multiply-adds done.
pub(crate) fn peak_macs(rounds: usize) -> u64 {
    use crate::peak::CHAINS;
    use std::hint::black_box;
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F (checked in `available`).
        Isa::Avx512 => unsafe { x86_peak::fma512(rounds) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked in `available`).
        Isa::Avx2 => unsafe { x86_peak::fma256(rounds) },
        Isa::Portable => {
            let (a, b) = ([0.999_f32; CHAINS], [1e-3_f32; CHAINS]);
            let mut acc = [0.0f32; CHAINS];
            for _ in 0..rounds {
                // Re-read every round, so the operands are not hoisted out of the loop.
                let (a, b) = (black_box(&a), black_box(&b));
                for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
                    *s = *s * a + b;
                }
            }
            black_box(acc);
            (rounds * CHAINS) as u64
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_peak {
    use crate::peak::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// 16 multiply-adds per `vfmadd` on 512 bits.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(rounds: usize) -> u64 {
        let (a, b) = (
            _mm512_set1_ps(black_box(0.999)),
            _mm512_set1_ps(black_box(1e-3)),
        );
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..rounds {
            for s in &mut acc {
                *s = _mm512_fmadd_ps(*s, a, b);
            }
        }
        black_box(acc);
        (rounds * CHAINS * 16) as u64
    }

    /// 8 multiply-adds per `vfmadd` on 256 bits.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(rounds: usize) -> u64 {
        let (a, b) = (
            _mm256_set1_ps(black_box(0.999)),
            _mm256_set1_ps(black_box(1e-3)),
        );
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..rounds {
            for s in &mut acc {
                *s = _mm256_fmadd_ps(*s, a, b);
            }
        }
        black_box(acc);
        (rounds * CHAINS * 8) as u64
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, parallel over blocks of weight rows.
pub(crate) fn matmul<E: KindOf>(x: &[f32], m: usize, w: &[E], n: usize, k: usize, y: &mut [f32]) {
    matmul_isa(isa(), x, m, w, n, k, y)
}

fn matmul_isa<E: KindOf>(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &[E],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    assert!(x.len() >= m * k && w.len() == n * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let block = row_block(m, n, k * std::mem::size_of::<E>(), crate::team::threads());
    crate::team::for_each(n.div_ceil(block), |b| {
        let (n0, n1) = (b * block, ((b + 1) * block).min(n));
        let mut i0 = 0;
        while i0 < m {
            let mr = (m - i0).min(MR);
            let mut j0 = n0;
            while j0 < n1 {
                let nr = (n1 - j0).min(NR);
                let mut tile = [[0.0f32; NR]; MR];
                tile_dispatch(isa, mr, nr, &x[i0 * k..], &w[j0 * k..], k, &mut tile);
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
}

/// Weight rows per parallel task: [`ROW_BLOCK`] for many activation rows (fewer where that
/// leaves threads idle); for a decode
/// product (≤ [`MR`] rows, memory-bound) two tasks per thread of at most
/// [`crate::team::DECODE_TASK_BYTES`], so that each thread streams long runs of
/// consecutive rows (with [`ROW_BLOCK`], V2-Lite's `lm_head` at m = 1 ran as 2,134 tasks
/// of 192 KB, the two threads' streams interleaved).
fn row_block(m: usize, n: usize, row_bytes: usize, threads: usize) -> usize {
    if m > MR {
        // A narrow product (a decode batch's router: 64 or 160 rows) still spreads over
        // every thread.
        return n.div_ceil(2 * threads).next_multiple_of(NR).min(ROW_BLOCK);
    }
    crate::team::decode_task_len(n, row_bytes, threads, 2, NR)
}

/// Calls the tile kernel for an `mr × nr` tile (`mr ≤ MR`, `nr ≤ NR`).
fn tile_dispatch<E: KindOf>(
    isa: Isa,
    mr: usize,
    nr: usize,
    x: &[f32],
    w: &[E],
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && nr >= 2 {
        macro_rules! go512 {
            ($(($m:literal, $p:literal)),*) => {
                match (mr, nr / 2) {
                    // SAFETY: the CPU supports AVX-512 F/DQ, AVX2, FMA and F16C (checked in
                    // `available`); `x` holds mr rows and `w` nr rows of k.
                    $(($m, $p) => unsafe { tile_avx512::<E, $m, $p>(x, w, k, out) },)*
                    _ => unreachable!("tile {mr}x{nr}"),
                }
            };
        }
        go512!(
            (1, 1),
            (1, 2),
            (1, 3),
            (2, 1),
            (2, 2),
            (2, 3),
            (3, 1),
            (3, 2),
            (3, 3),
            (4, 1),
            (4, 2),
            (4, 3)
        );
        if nr % 2 == 1 {
            let mut last = [[0.0f32; NR]; MR];
            tile_small(Isa::Avx2, mr, 1, x, &w[(nr - 1) * k..], k, &mut last);
            for (o, l) in out.iter_mut().zip(&last).take(mr) {
                o[nr - 1] = l[0];
            }
        }
        return;
    }
    if mr == 1 {
        // One activation row (decode): up to NR weight rows in one tile, so NR chains of
        // fused multiply-adds are in flight (three alone wait on the FMA's latency), the
        // same arithmetic per weight row.
        return tile_small(isa, 1, nr, x, w, k, out);
    }
    let first = nr.min(NR_SMALL);
    tile_small(isa, mr, first, x, w, k, out);
    if nr > first {
        let mut rest = [[0.0f32; NR]; MR];
        tile_small(isa, mr, nr - first, x, &w[first * k..], k, &mut rest);
        for (o, r) in out.iter_mut().zip(&rest).take(mr) {
            o[first..nr].copy_from_slice(&r[..nr - first]);
        }
    }
}

/// The AVX2 or portable kernel for an `mr × nr` tile (`nr ≤ NR_SMALL`, or `nr ≤ NR` for
/// one row).
fn tile_small<E: KindOf>(
    isa: Isa,
    mr: usize,
    nr: usize,
    x: &[f32],
    w: &[E],
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    macro_rules! go {
        ($f:ident) => {
            match (mr, nr) {
                (1, 1) => $f::<E, 1, 1>(x, w, k, out),
                (1, 2) => $f::<E, 1, 2>(x, w, k, out),
                (1, 3) => $f::<E, 1, 3>(x, w, k, out),
                (1, 4) => $f::<E, 1, 4>(x, w, k, out),
                (1, 5) => $f::<E, 1, 5>(x, w, k, out),
                (1, 6) => $f::<E, 1, 6>(x, w, k, out),
                (2, 1) => $f::<E, 2, 1>(x, w, k, out),
                (2, 2) => $f::<E, 2, 2>(x, w, k, out),
                (2, 3) => $f::<E, 2, 3>(x, w, k, out),
                (3, 1) => $f::<E, 3, 1>(x, w, k, out),
                (3, 2) => $f::<E, 3, 2>(x, w, k, out),
                (3, 3) => $f::<E, 3, 3>(x, w, k, out),
                (4, 1) => $f::<E, 4, 1>(x, w, k, out),
                (4, 2) => $f::<E, 4, 2>(x, w, k, out),
                (4, 3) => $f::<E, 4, 3>(x, w, k, out),
                _ => unreachable!("tile {mr}x{nr}"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked in `available`; AVX-512
        // is only offered with them).
        Isa::Avx2 | Isa::Avx512 => unsafe { go!(tile_avx2) },
        Isa::Portable => go!(tile_portable),
    }
}

/// The fixed lane-reduction tree shared by both paths.
#[inline(always)]
fn reduce_lanes(l: [f32; 8]) -> f32 {
    let s0 = (l[0] + l[4]) + (l[1] + l[5]);
    let s1 = (l[2] + l[6]) + (l[3] + l[7]);
    s0 + s1
}

fn tile_portable<E: KindOf, const R: usize, const C: usize>(
    x: &[f32],
    w: &[E],
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    let mut acc = [[[0.0f32; 8]; C]; R];
    let chunks = k / 8;
    for c in 0..chunks {
        for j in 0..C {
            let wv = &w[j * k + c * 8..j * k + c * 8 + 8];
            for i in 0..R {
                let xv = &x[i * k + c * 8..i * k + c * 8 + 8];
                for l in 0..8 {
                    acc[i][j][l] += xv[l] * wv[l].to_f32();
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            let mut tail = 0.0f32;
            for t in chunks * 8..k {
                tail += x[i * k + t] * w[j * k + t].to_f32();
            }
            out[i][j] = reduce_lanes(acc[i][j]) + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<E: KindOf, const R: usize, const C: usize>(
    x: &[f32],
    w: &[E],
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && w.len() >= C * k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let chunks = k / 8;
    for c in 0..chunks {
        if R == 1 {
            next_tile_hint(wp, C, k, c);
        }
        let mut wv = [_mm256_setzero_ps(); C];
        for (j, v) in wv.iter_mut().enumerate() {
            // SAFETY: j*k + c*8 + 8 <= C*k, within w.
            let p = unsafe { wp.add(j * k + c * 8) };
            *v = match E::KIND {
                Kind::F32 => unsafe { _mm256_loadu_ps(p as *const f32) },
                Kind::Bf16 => unsafe {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                },
                Kind::F16 => unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) },
            };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: i*k + c*8 + 8 <= R*k, within x.
            let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + c * 8)) };
            for (a, v) in row.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(xv, *v, *a);
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            let mut lanes = [0.0f32; 8];
            // SAFETY: lanes holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]) };
            let mut tail = 0.0f32;
            for t in chunks * 8..k {
                tail = x[i * k + t].mul_add(w[j * k + t].to_f32(), tail);
            }
            out[i][j] = reduce_lanes(lanes) + tail;
        }
    }
}

/// Decode (one activation row): asks for chunk `c` (8 elements) of the `rows` weight
/// rows after this tile's `rows` (the next tile's, contiguous) to come into the
/// second-level cache, once per 64-byte line (at the chunks that start one).
/// Each 4 KB row of a V2-Lite matrix in bf16 is its own 4 KiB stretch, where the hardware
/// prefetchers' streams stop on 4 KiB pages, so without the hint a core streaming alone
/// waits at every tile
/// (see [`crate::bf16dot`]'s decode tile). Prefetches of any address are harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn next_tile_hint<E>(w: *const E, rows: usize, k: usize, c: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
    if !(c * 8 * std::mem::size_of::<E>()).is_multiple_of(64) {
        return;
    }
    for j in 0..rows {
        let ahead = w.wrapping_add((rows + j) * k + c * 8);
        // SAFETY: a prefetch does not access memory architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T2>(ahead as *const i8) };
    }
}

/// The AVX2 tile's arithmetic on AVX-512: `R` activation rows × `P` pairs of weight
/// rows, one row per 256-bit half of each `zmm` (the activations broadcast to both
/// halves), so each half runs exactly [`tile_avx2`]'s lanes.
///
/// # Safety
/// AVX-512 F/DQ, AVX2, FMA and F16C; `x` holds `R` rows and `w` `2P` rows of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
unsafe fn tile_avx512<E: KindOf, const R: usize, const P: usize>(
    x: &[f32],
    w: &[E],
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    assert!(x.len() >= R * k && w.len() >= 2 * P * k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let chunks = k / 8;
    for c in 0..chunks {
        if R == 1 {
            next_tile_hint(wp, 2 * P, k, c);
        }
        let mut wv = [_mm512_setzero_ps(); P];
        for (p, v) in wv.iter_mut().enumerate() {
            // SAFETY: rows 2p and 2p + 1 of w, elements c*8..c*8+8 < k.
            *v = unsafe {
                let (p0, p1) = (wp.add(2 * p * k + c * 8), wp.add((2 * p + 1) * k + c * 8));
                match E::KIND {
                    Kind::F32 => _mm512_insertf32x8::<1>(
                        _mm512_castps256_ps512(_mm256_loadu_ps(p0 as *const f32)),
                        _mm256_loadu_ps(p1 as *const f32),
                    ),
                    Kind::Bf16 => {
                        let h = _mm256_inserti128_si256::<1>(
                            _mm256_castsi128_si256(_mm_loadu_si128(p0 as *const __m128i)),
                            _mm_loadu_si128(p1 as *const __m128i),
                        );
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                    }
                    Kind::F16 => _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(p0 as *const __m128i)),
                        _mm_loadu_si128(p1 as *const __m128i),
                    )),
                }
            };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: i*k + c*8 + 8 <= R*k, within x.
            let xv = _mm512_broadcast_f32x8(unsafe { _mm256_loadu_ps(xp.add(i * k + c * 8)) });
            for (a, v) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, *v, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (p, a) in row.iter().enumerate() {
            let mut lanes = [0.0f32; 16];
            // SAFETY: lanes holds 16 f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
            for h in 0..2 {
                let j = 2 * p + h;
                let mut tail = 0.0f32;
                for t in chunks * 8..k {
                    tail = x[i * k + t].mul_add(w[j * k + t].to_f32(), tail);
                }
                let l: [f32; 8] = lanes[8 * h..8 * h + 8].try_into().expect("8 lanes");
                out[i][j] = reduce_lanes(l) + tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    fn check<E: KindOf>(m: usize, n: usize, k: usize, conv: impl Fn(f32) -> E) {
        let x = values(m * k, 1);
        let w: Vec<E> = values(n * k, 2).into_iter().map(&conv).collect();
        let mut y = vec![f32::NAN; m * n];
        matmul(&x, m, &w, n, k, &mut y);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f32() as f64)
                    .sum();
                let got = y[i * n + j] as f64;
                assert!(
                    (got - r).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + r.abs()),
                    "m={m} n={n} k={k} ({i},{j}): {got} vs {r}"
                );
            }
        }
    }

    #[test]
    fn matches_plain_reference_on_ragged_sizes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 130, 67),
            (3, 65, 1408),
            (5, 64, 33),
            (17, 200, 96),
        ] {
            check(m, n, k, |v| v);
            check(m, n, k, bf16::from_f32);
            check(m, n, k, f16::from_f32);
        }
    }

    #[test]
    fn simd_paths_are_bit_identical() {
        fn agree<E: KindOf>(conv: impl Fn(f32) -> E) {
            let paths: Vec<Isa> = available()
                .into_iter()
                .filter(|&i| i != Isa::Portable)
                .collect();
            for &(m, n, k) in &[
                (1, 1, 1),
                (1, 130, 67),
                (3, 65, 1408),
                (7, 50, 2048),
                (13, 97, 96),
            ] {
                let x = values(m * k, 3);
                let w: Vec<E> = values(n * k, 4).into_iter().map(&conv).collect();
                let mut want = vec![f32::NAN; m * n];
                matmul_isa(paths[paths.len() - 1], &x, m, &w, n, k, &mut want);
                for &isa in &paths {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_isa(isa, &x, m, &w, n, k, &mut y);
                    for (a, b) in y.iter().zip(&want) {
                        assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} m={m} n={n} k={k}");
                    }
                }
            }
        }
        if available().len() > 1 {
            agree(|v| v);
            agree(bf16::from_f32);
            agree(f16::from_f32);
        }
    }

    #[test]
    fn rows_are_bitwise_independent_of_the_batch() {
        let (n, k) = (101, 1411);
        let x = values(37 * k, 5);
        let w: Vec<bf16> = values(n * k, 6).into_iter().map(bf16::from_f32).collect();
        let mut all = vec![0.0f32; 37 * n];
        matmul(&x, 37, &w, n, k, &mut all);
        for m in [1usize, 2, 3, 4, 5, 9] {
            for start in [0usize, 7, 30] {
                let rows = m.min(37 - start);
                let mut part = vec![0.0f32; rows * n];
                matmul(&x[start * k..], rows, &w, n, k, &mut part);
                for (a, b) in part.iter().zip(&all[start * n..(start + rows) * n]) {
                    assert_eq!(a.to_bits(), b.to_bits(), "m={m} start={start}");
                }
            }
        }
    }
}

/// Min-of-N timings per path: `cargo test --release -p dsv2-cpu dtiming -- --ignored
/// --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    use crate::test_values as values;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn dtiming() {
        let (n, k) = (10944, 2048);
        let w: Vec<bf16> = values(n * k, 3).into_iter().map(bf16::from_f32).collect();
        let x = values(128 * k, 4);
        let mut y = vec![0.0f32; 128 * n];
        for isa in available() {
            if isa == Isa::Portable {
                continue;
            }
            for m in [1usize, 4, 128] {
                let mut best = f64::INFINITY;
                for _ in 0..if m == 128 { 5 } else { 30 } {
                    let t = Instant::now();
                    matmul_isa(isa, &x, m, &w, n, k, &mut y);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                eprintln!(
                    "{isa:?} bf16 m={m}: {:.1} GB/s, {:.0} GMAC/s",
                    (n * k * 2) as f64 / best / 1e9,
                    (m * n * k) as f64 / best / 1e9
                );
            }
        }
    }
}
