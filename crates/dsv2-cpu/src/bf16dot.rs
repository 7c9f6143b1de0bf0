//! `y[m, n] = x[m, k] · w[n, k]ᵀ` for bf16 weights and bf16 activations on AVX-512 BF16.
//!
//! When the backend computes in bf16 its activations are bf16 values already, and
//! `vdpbf16ps` multiplies 32 bf16 pairs into 16 f32 lanes in one instruction, twice the
//! multiply-adds per instruction of widening the weights to f32 ([`crate::matmul`]).
//! Products of two bf16 values are exact in f32, so the result differs from the f32 path
//! only in the order of the f32 additions (and in flushing f32 subnormals to zero, as
//! the instruction does).
//!
//! Per output the arithmetic is fixed: lane `l` accumulates the pairs `k = 32c + 2l,
//! 32c + 2l + 1` in order of `c` (a short last chunk is zero-padded), then the 16 lanes
//! are summed as `a[j] + a[j + 8]`, `+ 4`, `+ 2`, `+ 1`. It does not depend on `m` or on
//! a row's place in its tile, so the product is batch-invariant.
//!
//! On other architectures [`available`] is false and only the checks remain.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused_imports, dead_code))]

use half::bf16;

use crate::kernels::SyncPtr;
use crate::scratch::take;
use crate::team;

/// Activation rows per register tile.
const MR: usize = 4;
/// Weight rows per register tile.
const NR: usize = 4;
/// Weight rows per register tile of a one-row (decode) product: eight 4 KB rows of
/// V2-Lite's head in flight at once, each its own 4 KiB stretch, so a core alone keeps more of
/// its reads outstanding ([`x86::row_tile`]).
const DECODE_NR: usize = 8;
/// Weight rows per parallel task of a product of many rows.
const ROW_BLOCK: usize = 32;
/// Most activation rows of a decode product, whose tasks are large ([`row_block`]).
const DECODE_ROWS: usize = 4;

/// Weight rows per task: [`ROW_BLOCK`] for many activation rows; for a decode product
/// (≤ [`DECODE_ROWS`] rows, memory-bound) two tasks per thread of at most
/// [`team::DECODE_TASK_BYTES`], each one stream: V2-Lite's 102400 × 2048 head at m = 1
/// ran as 3,200 tasks of 128 KB, each restarting the stream.
fn row_block(m: usize, n: usize, k: usize, threads: usize) -> usize {
    if m > DECODE_ROWS {
        return ROW_BLOCK;
    }
    team::decode_task_len(n, 2 * k, threads, 2, DECODE_NR)
}

/// Whether this CPU runs [`matmul`] (AVX-512 F, BW and BF16, checked once).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            dsv2_core::isa::avx512_bf16()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// `y[m, n] = bf16(x)[m, k] · w[n, k]ᵀ`, parallel over blocks of weight rows; `x` is
/// rounded to bf16 first (exact when it holds bf16 values).
///
/// # Panics
/// If [`available`] is false or a slice is short.
pub fn matmul(x: &[f32], m: usize, w: &[bf16], n: usize, k: usize, y: &mut [f32]) {
    assert!(available(), "AVX-512 BF16 is not available");
    assert!(
        x.len() >= m * k && w.len() >= n * k && y.len() >= m * n,
        "matmul shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 {
        tiled(x, m, w, n, k, y);
    }
}

/// [`matmul`] after its checks: register tiles over blocks of weight rows.
#[cfg(target_arch = "x86_64")]
fn tiled(x: &[f32], m: usize, w: &[bf16], n: usize, k: usize, y: &mut [f32]) {
    // Activations as bf16 pairs, each row padded to whole 32-element chunks with zeros.
    let kp = k.next_multiple_of(32);
    let mut xb = take::<u32>(m * kp / 2);
    for (row, dst) in x[..m * k].chunks_exact(k).zip(xb.chunks_exact_mut(kp / 2)) {
        for (pair, d) in row.chunks(2).zip(dst.iter_mut()) {
            let lo = bf16::from_f32(pair[0]).to_bits() as u32;
            let hi = pair
                .get(1)
                .map_or(0, |v| bf16::from_f32(*v).to_bits() as u32);
            *d = lo | hi << 16;
        }
    }
    let xb: &[u32] = &xb;
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let block = row_block(m, n, k, team::threads());
    team::for_each(n.div_ceil(block), |b| {
        let (n0, n1) = (b * block, ((b + 1) * block).min(n));
        // Weight tiles outer, activation rows inner: a tile's later passes (m > MR) read
        // it from the first-level cache while the prefetches in `tile` keep the next
        // tile's rows coming from memory.
        let mut j0 = n0;
        if m == 1 {
            while j0 + DECODE_NR <= n1 {
                // SAFETY: `available()`; rows j0..j0 + DECODE_NR of `w` are in bounds and
                // the activation row holds `kp / 2` pairs.
                let out = unsafe {
                    x86::row_tile::<DECODE_NR>(&xb[..kp / 2], &w[j0 * k..][..DECODE_NR * k], k)
                };
                for (j, &v) in out.iter().enumerate() {
                    // SAFETY: j0 + j lies in this task's rows of `y`.
                    unsafe { *y_ptr.get().add(j0 + j) = v };
                }
                j0 += DECODE_NR;
            }
        }
        while j0 < n1 {
            let nr = (n1 - j0).min(NR);
            let rows: [&[bf16]; NR] = std::array::from_fn(|j| &w[(j0 + j.min(nr - 1)) * k..][..k]);
            let mut i0 = 0;
            while i0 < m {
                let mr = (m - i0).min(MR);
                let acts: [&[u32]; MR] =
                    std::array::from_fn(|i| &xb[(i0 + i.min(mr - 1)) * kp / 2..][..kp / 2]);
                // SAFETY: `available()` (asserted in `matmul`); every row is `k` long and
                // every activation row `kp / 2` pairs.
                let tile = unsafe {
                    match (mr, m > 1) {
                        (1, false) => x86::tile::<1, false>(acts, rows, k),
                        (1, true) => x86::tile::<1, true>(acts, rows, k),
                        (2, _) => x86::tile::<2, true>(acts, rows, k),
                        (3, _) => x86::tile::<3, true>(acts, rows, k),
                        _ => x86::tile::<MR, true>(acts, rows, k),
                    }
                };
                for (i, tile_row) in tile.iter().enumerate().take(mr) {
                    for (j, &v) in tile_row.iter().enumerate().take(nr) {
                        // SAFETY: (i0 + i, j0 + j) lies in this task's rows of `y`.
                        unsafe { *y_ptr.get().add((i0 + i) * n + j0 + j) = v };
                    }
                }
                i0 += mr;
            }
            j0 += nr;
        }
    });
}

/// One thread's `rounds` rounds of [`crate::peak::CHAINS`] independent `vdpbf16ps`
/// chains (32 multiply-adds each), for the peak probe ([`crate::peak`]); returns the
/// multiply-adds done.
///
/// # Panics
/// If [`available`] is false.
pub(crate) fn peak_macs(rounds: usize) -> u64 {
    assert!(available(), "AVX-512 BF16 is not available");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512 F/BW/BF16 (checked above).
    return unsafe { x86::peak(rounds) };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{rounds}")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::peak_macs`]: `vdpbf16ps` chains in registers.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn peak(rounds: usize) -> u64 {
        use crate::peak::CHAINS;
        use std::hint::black_box;
        let one = _mm512_set1_ps(black_box(1.0));
        let small = _mm512_set1_ps(black_box(1e-3));
        let (a, b) = (
            _mm512_cvtne2ps_pbh(one, one),
            _mm512_cvtne2ps_pbh(small, small),
        );
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..rounds {
            for s in &mut acc {
                *s = _mm512_dpbf16_ps(*s, a, b);
            }
        }
        black_box(acc);
        (rounds * CHAINS * 32) as u64
    }

    /// One activation row × `N` consecutive weight rows (`rows`, `N · k` long) over all of
    /// `k`, with each output's arithmetic exactly [`tile`]'s (so a row's result does not
    /// depend on which kernel computed it).
    ///
    /// While it computes, the same chunk of the next `N` rows is prefetched into the
    /// second-level cache: every 4 KB row of V2-Lite's head is its own 4 KiB stretch, where
    /// the hardware prefetchers' streams stop on 4 KiB pages (the hint paid too over the
    /// huge pages a quantized model's head lives in), and without it one core alone read the head at
    /// ~0.55 of its read probe (NR = 4, no hint) against ~0.74 with eight rows and the
    /// hint (two cores sharing a link 0.74-0.82 → 0.92-0.98; `stream_vs_probe`,
    /// docs/BENCHMARKS.md).
    ///
    /// # Safety
    /// AVX-512 F + BF16; `act` holds `k.next_multiple_of(32) / 2` pairs.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn row_tile<const N: usize>(
        act: &[u32],
        rows: &[half::bf16],
        k: usize,
    ) -> [f32; N] {
        assert!(rows.len() >= N * k && act.len() >= k.div_ceil(32) * 16);
        let mut acc = [_mm512_setzero_ps(); N];
        let full = k / 32;
        let base = rows.as_ptr();
        // SAFETY (loads): chunk c covers elements 32c..32c + 32 ≤ k of each row (or a
        // mask of the k − 32c that exist) and pairs 16c..16c + 16 of the activations;
        // prefetches of any address are harmless.
        unsafe {
            for c in 0..k.div_ceil(32) {
                for j in 0..N {
                    let ahead = base.wrapping_add((N + j) * k + 32 * c);
                    _mm_prefetch::<_MM_HINT_T2>(ahead as *const i8);
                }
                let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    act.as_ptr().add(16 * c) as *const _,
                ));
                for (j, a) in acc.iter_mut().enumerate() {
                    let p = base.add(j * k + 32 * c) as *const i16;
                    let v = if c < full {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        let mask: __mmask32 = ((1u64 << (k - 32 * c)) - 1) as u32;
                        _mm512_maskz_loadu_epi16(mask, p)
                    };
                    *a = _mm512_dpbf16_ps(*a, xv, std::mem::transmute::<__m512i, __m512bh>(v));
                }
            }
        }
        // SAFETY: AVX-512 F (this function's features).
        std::array::from_fn(|j| unsafe { crate::mla::reduce512(acc[j]) })
    }

    /// One `M × NR` register tile over all of `k` (`M ≤ MR`: the first `M` of `acts`);
    /// rows `M..MR` of the result are zero.
    ///
    /// # Safety
    /// AVX-512 F + BF16; `rows` are `k` long, `acts` `k.next_multiple_of(32) / 2` pairs.
    /// `PREFETCH_NEXT` asks for the next tile's rows while this one computes.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn tile<const M: usize, const PREFETCH_NEXT: bool>(
        acts: [&[u32]; MR],
        rows: [&[half::bf16]; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        let mut acc = [[_mm512_setzero_ps(); NR]; M];
        let full = k / 32;
        // SAFETY (loads): chunk c covers elements 32c..32c + 32 ≤ k of the weight rows
        // (or a mask of the k − 32c that exist) and pairs 16c..16c + 16 of the padded
        // activation rows.
        unsafe {
            for c in 0..k.div_ceil(32) {
                // With more than one activation row, the same chunk of the next tile's
                // rows (rows are contiguous: `NR · k` elements on), so that memory keeps
                // streaming while this tile computes: without it m = 4, 8 and 16 read
                // the `lm_head` at 38, 32 and 22 GB/s where m = 1 read 55 (with it ~43,
                // ~37, ~28; m = 1 needs none). Prefetches of any address are harmless.
                if PREFETCH_NEXT {
                    for row in &rows {
                        let ahead = row.as_ptr().wrapping_add(NR * k + 32 * c);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
                let wv: [__m512bh; NR] = std::array::from_fn(|j| {
                    let p = rows[j].as_ptr().add(32 * c) as *const i16;
                    let v = if c < full {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        let mask: __mmask32 = ((1u64 << (k - 32 * c)) - 1) as u32;
                        _mm512_maskz_loadu_epi16(mask, p)
                    };
                    std::mem::transmute::<__m512i, __m512bh>(v)
                });
                for i in 0..M {
                    let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        acts[i].as_ptr().add(16 * c) as *const _,
                    ));
                    for j in 0..NR {
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
                    }
                }
            }
        }
        let mut out = [[0.0; NR]; MR];
        for i in 0..M {
            for j in 0..NR {
                // SAFETY: AVX-512 F (this function's features).
                out[i][j] = unsafe { crate::mla::reduce512(acc[i][j]) };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    /// Values rounded to bf16 (what the bf16 backend's activations are).
    fn bf16_values(n: usize, seed: u64) -> Vec<f32> {
        test_values(n, seed)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect()
    }

    #[test]
    fn matches_f64_reference_and_is_batch_invariant() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 37, 64),
            (5, 33, 100),
            (13, 70, 2048),
            (3, 9, 31),
            // Decode products: a few large tasks, the last one ragged.
            (2, 1001, 64),
            (4, 515, 96),
            // One row: tiles of DECODE_NR rows, then a ragged rest.
            (1, 203, 2048),
            (1, 21, 70),
        ] {
            let x = bf16_values(m * k, 1 + k as u64);
            let w: Vec<bf16> = test_values(n * k, 2)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut y = vec![f32::NAN; m * n];
            matmul(&x, m, &w, n, k, &mut y);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64())
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + exact.abs()),
                        "m={m} n={n} k={k} ({i},{j}): {got} vs {exact}"
                    );
                }
                // Row i alone gives the same bits as inside the batch.
                let mut one = vec![f32::NAN; n];
                matmul(&x[i * k..(i + 1) * k], 1, &w, n, k, &mut one);
                assert_eq!(
                    one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    y[i * n..(i + 1) * n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "batch invariance m={m} n={n} k={k} row {i}"
                );
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// `lm_head`-shaped products from memory (`cargo test --release -p dsv2-cpu --lib
    /// bf16dot_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bf16dot_timing() {
        if !available() {
            return;
        }
        let (n, k) = (102_400, 2048);
        let w: Vec<bf16> = crate::test_values(n * k, 3)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let x = crate::test_values(16 * k, 4);
        let mut y = vec![0.0f32; 16 * n];
        for m in [1usize, 4, 8, 16] {
            let best = (0..8)
                .map(|_| {
                    let t = Instant::now();
                    matmul(&x, m, &w, n, k, &mut y);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            eprintln!(
                "bf16 head m={m}: {:.2} ms, {:.1} GB/s, {:.0} G multiply-adds/s",
                best * 1e3,
                (n * k * 2) as f64 / best / 1e9,
                (m * n * k) as f64 / best / 1e9
            );
        }
    }
}
