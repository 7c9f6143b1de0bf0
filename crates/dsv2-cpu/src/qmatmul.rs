//! `y[m, n] = x[m, k] · w[n, k]ᵀ` for `q8`/`q4` weights, batch-invariant.
//!
//! The weights are stored in the interleaved tiles of [`dsv2_core::quant`]: per 16 weight
//! rows and 32-element block, 8 (q8) or 4 (q4) 64-byte vectors that each hold 4
//! consecutive weights of each of the 16 rows, and the 16 f16 scales contiguous. One
//! AVX-512 `vpdpbusd` thus computes 4 multiply-adds for each of 16 outputs, and the
//! per-block scale work is one `vcvtph2ps` and, per activation row, one
//! `sub`/`cvt`/`mul`/`fma` for 16 outputs.
//!
//! Activations are quantized per row to int8 in blocks of 32 (scale `amax/127`, like
//! llama.cpp's `q8_0`), and so is what that rounding left over: each row becomes
//! `TERMS` = 2 int8 rows whose sum carries ~15 bits, for twice the integer
//! multiply-adds and the same weight reads (one term alone added as much logit error as
//! the int8 weights). A product reads both terms, or only the first
//! ([`QMatrix::terms`]: q4 matrices, and every matrix of a model with q4 routed experts,
//! [`activation_terms`]). The block sums `Σq` are precomputed. `vpdpbusd` multiplies an
//! unsigned by a signed byte, so q8 weights are biased to `q + 128` in the register and
//! q4 codes are used as they are (`code = q + 8`); the bias times `Σq` is subtracted.
//!
//! **Numerics (the contract every instruction path keeps):** for output `(i, r)` and each
//! term `t` of row `i` the product reads, `acc_t = 0`, then for each block `b` in order:
//! `acc_t = fma(f32(s_b), dw_b · dx_b, acc_t)` where `s_b = Σ q·x` over the block is an
//! exact integer (however it is computed), `dw_b` the weight scale (f16 widened exactly),
//! `dx_b` the term's activation scale, `dw_b · dx_b` one f32 product and `fma` one fused
//! multiply-add; the output is `acc_0 + acc_1`. Each SIMD lane is one output, and the
//! kernels see a row's terms as rows of their own in one register tile, so there is no
//! cross-lane reduction: the AVX-512 VNNI, AVX-VNNI, AVX2 and portable paths give
//! bit-identical results, and a row's result does not depend on `m` or on the other rows
//! (batch invariance).

use std::cell::RefCell;
use std::ops::Range;

use dsv2_core::quant::{QuantFormat, BLOCK, TILE};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::kernels::SyncPtr;
use crate::team;

/// Most activation rows in one register tile.
const MR_MAX: usize = 8;
/// Most weight tiles (of 16 rows) in one register tile.
const NC_MAX: usize = 2;
/// Output scratch of one register tile: `[MR_MAX][NC_MAX][TILE]`.
const OUT_LEN: usize = MR_MAX * NC_MAX * TILE;
/// q8 blocks ahead to prefetch weights in the AVX-512 kernel (0: none): 8 KiB, the same
/// distance in bytes for q4 (32 of its half-size blocks). Tiles of a task are contiguous,
/// so this runs on into the next tile. Measured: decode m = 8 from DRAM 10 → 24 GB/s (one
/// core's worth on a loaded machine).
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 16;
/// Fewest kernel rows (activation rows × terms) a register tile prefetches for. Below,
/// the instructions of the prefetches themselves cost more than they bring: a core's
/// out-of-order window covers fewer weight lines and the hardware prefetchers stream
/// these reads alone. Measured on a Zen 4 VM (`examples/stream_vs_probe.rs` with the
/// prefetch distance made switchable for the experiment; matrices from DRAM, against
/// the read probe in the same rounds): 1 kernel row (q4 m = 1) and 2
/// (q8 m = 1) stream 5-8% faster without (q8 experts 0.83 → 0.89 of the probe at
/// 35 GB/s, 0.65 → 0.69 at 58 GB/s; one thread 0.71 → 0.76), 4 and more slower (q4 m = 4
/// 0.52 → 0.65 with).
#[cfg(target_arch = "x86_64")]
const PREFETCH_MIN_ROWS: usize = 3;
/// Activation rows per parallel task in prefill (a multiple of the 6-row tile).
const ROW_CHUNK: usize = 96;

/// A quantized weight matrix borrowed from its planes.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// The interleaved `qweight` plane (`rows · format.row_bytes(cols)` bytes).
    pub q: &'a [u8],
    /// The `rows · cols/32` block scales, interleaved per tile.
    pub scales: &'a [f16],
    /// Activation terms the product reads ([`activation_terms`]): 2 or 1 for q8, 1 for q4.
    pub terms: usize,
}

impl<'a> QMatrix<'a> {
    /// The planes of a quantized tensor as a product's operand, reading `terms`
    /// activation terms ([`activation_terms`]).
    pub fn of(q: &'a dsv2_core::quant::QuantizedTensor, terms: usize) -> QMatrix<'a> {
        QMatrix {
            format: q.format,
            rows: q.rows,
            cols: q.cols,
            q: q.qweight_bytes(),
            scales: q.scales(),
            terms,
        }
    }

    fn check(&self) {
        assert!(
            self.cols.is_multiple_of(BLOCK),
            "cols {} % 32 != 0",
            self.cols
        );
        assert!(self.q.len() >= self.rows * self.format.row_bytes(self.cols));
        assert!(self.scales.len() >= self.rows * self.cols / BLOCK);
        assert!(
            self.terms == 1 || (self.terms == TERMS && self.format == QuantFormat::Q8),
            "{} activation terms for {} weights",
            self.terms,
            self.format.name()
        );
    }

    fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// Bytes of one tile (16 rows and their scales).
    pub(crate) fn tile_bytes(&self) -> usize {
        TILE * (self.format.row_bytes(self.cols) + 2 * self.cols / BLOCK)
    }
}

/// Activations quantized to int8 blocks of 32, ready for [`qmatmul_rows`]: every row as
/// `TERMS` int8 rows (the row, then its rounding residual), interleaved.
#[derive(Default)]
pub struct QActivations {
    /// `[m · TERMS, k]` int8 values: row `TERMS·i + t` is term `t` of row `i`.
    q: Vec<i8>,
    /// `[m · TERMS, k/32]` block scales.
    d: Vec<f32>,
    /// `[m · TERMS, k/32]` `128 · Σq` (the q8 bias correction).
    c128: Vec<i32>,
    /// `[m · TERMS, k/32]` `8 · Σq` (the q4 bias correction).
    c8: Vec<i32>,
    m: usize,
    k: usize,
}

/// int8 terms per activation row: the row rounded to int8 (scale `amax/127` per block),
/// then the residual `x − q·d` rounded the same way. Their sum carries ~15 bits per value,
/// so int8 kernels compute nearly the product of f32 activations with the quantized
/// weights; one term alone (llama.cpp's `q8_0` activations) adds as much logit error as
/// the int8 weights themselves (`tools/fixtures/quant_error.py`).
pub(crate) const TERMS: usize = 2;
// `Job::run` sums a row's terms as exactly two.
const _: () = assert!(TERMS == 2);

/// The terms a product with weights of `format` reads in a model whose routed experts
/// are `experts` (q8 or q4): q8 matrices of a q8 model both; q4 matrices the first (their
/// 4-bit weights' error is ~5× the activations' rounding, which then moves the logits by
/// ~5%, while a second term would slow a prefill by about a third, as it does q8's); and
/// so the q8 matrices of a q4 model (attention, shared experts, the dense MLP, `lm_head`):
/// next to the routed experts' 4-bit error their one term moves q4's logit error by
/// ~1e-3 relative (2.60 → 2.69e-2 on `lite`, `tools/fixtures/quant_error.py`), and their
/// integer work halves.
pub fn activation_terms(format: QuantFormat, experts: QuantFormat) -> usize {
    match (format, experts) {
        (QuantFormat::Q8, QuantFormat::Q8) => TERMS,
        _ => 1,
    }
}

/// `round_ties_even(y)` for `|y| < 2²²` in plain f32 arithmetic (vectorizes; no libm).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Rounds one block to int8 with the scale `amax/127`: returns the scale and `Σq`.
#[inline(always)]
fn quantize_block_impl(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
    // amax over the block (NaNs count as 0), as a fixed tree so that it vectorizes;
    // a maximum does not depend on the order anyway.
    let abs = |v: f32| if v.is_nan() { 0.0 } else { v.abs() };
    let mut mx = [0.0f32; BLOCK / 2];
    for (j, m) in mx.iter_mut().enumerate() {
        let (a, b) = (abs(xb[j]), abs(xb[j + BLOCK / 2]));
        *m = if a > b { a } else { b };
    }
    let mut width = BLOCK / 4;
    while width > 0 {
        for j in 0..width {
            mx[j] = if mx[j] > mx[j + width] {
                mx[j]
            } else {
                mx[j + width]
            };
        }
        width /= 2;
    }
    let amax = mx[0];
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut r = [0i32; BLOCK];
    for (r, v) in r.iter_mut().zip(xb) {
        let y = ((v * inv + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0);
        // `clamp` keeps a NaN (from a NaN input): map it to 0 as `as` would.
        let y = if y.is_nan() { 0.0 } else { y };
        // SAFETY: an integer-valued float within ±127.
        *r = unsafe { y.to_int_unchecked::<i32>() };
    }
    for (q, r) in qb.iter_mut().zip(&r) {
        *q = *r as i8;
    }
    (amax / 127.0, r.iter().sum())
}

/// Quantizes one row into its [`TERMS`] int8 rows (the same arithmetic on every CPU;
/// compiled per ISA for speed). `q` holds the terms' `k` values one after the other,
/// `d`/`c128`/`c8` their `k/32` block entries one after the other.
#[inline(always)]
fn quantize_row_impl(x: &[f32], q: &mut [i8], d: &mut [f32], c128: &mut [i32], c8: &mut [i32]) {
    let (k, nb) = (x.len(), x.len() / BLOCK);
    for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
        let mut rest: [f32; BLOCK] = xb.try_into().expect("a block");
        for t in 0..TERMS {
            let qb: &mut [i8; BLOCK] = (&mut q[t * k + b * BLOCK..][..BLOCK])
                .try_into()
                .expect("a block");
            let (scale, sum) = quantize_block_impl(&rest, qb);
            let e = t * nb + b;
            (d[e], c128[e], c8[e]) = (scale, 128 * sum, 8 * sum);
            // The residual `x − q·d` (a product, then a difference: no FMA).
            for (v, &qv) in rest.iter_mut().zip(qb.iter()) {
                *v -= qv as f32 * scale;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], c128: &mut [i32], c8: &mut [i32]) {
    quantize_row_impl(x, q, d, c128, c8)
}

/// [`quantize_row_impl`] with AVX-512 intrinsics: the same operations per element (the
/// maximum and the integer sum do not depend on the order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_row_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], c128: &mut [i32], c8: &mut [i32]) {
    use std::arch::x86_64::*;
    let (k, nb) = (x.len(), x.len() / BLOCK);
    assert!(q.len() >= TERMS * k && d.len() >= TERMS * nb);
    assert!(c128.len() >= TERMS * nb && c8.len() >= TERMS * nb);
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for b in 0..nb {
        // SAFETY: block b lies within x (k = nb · 32).
        let (mut v0, mut v1) = unsafe {
            let p = x.as_ptr().add(b * BLOCK);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        for t in 0..TERMS {
            let abs = |v: __m512| {
                let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
                // NaNs count as 0.
                _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), a)
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(v0), abs(v1)));
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let quant = |v: __m512| {
                let y = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, inv), magic), magic);
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
                let y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                _mm512_maskz_cvttps_epi32(ordered, y)
            };
            let (r0, r1) = (quant(v0), quant(v1));
            // SAFETY: term t's block b lies within q (asserted above).
            unsafe {
                let p = q.as_mut_ptr().add(t * k + b * BLOCK);
                _mm_storeu_si128(p as *mut __m128i, _mm512_cvtepi32_epi8(r0));
                _mm_storeu_si128(p.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(r1));
            }
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(r0, r1));
            let e = t * nb + b;
            (d[e], c128[e], c8[e]) = (scale, 128 * sum, 8 * sum);
            // The residual `x − q·d` (a product, then a difference: no FMA).
            let s = _mm512_set1_ps(scale);
            v0 = _mm512_sub_ps(v0, _mm512_mul_ps(_mm512_cvtepi32_ps(r0), s));
            v1 = _mm512_sub_ps(v1, _mm512_mul_ps(_mm512_cvtepi32_ps(r1), s));
        }
    }
}

fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], c128: &mut [i32], c8: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512Vnni {
        // SAFETY: implied by the AVX-512 VNNI path (checked in `available`); the same
        // arithmetic as the generic code (no FMA contraction).
        return unsafe { quantize_row_avx512(x, q, d, c128, c8) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: every non-portable path implies AVX2 and FMA (checked in `available`).
        // Rust does not contract `a * b + c` into an FMA, so the results are the same.
        return unsafe { quantize_row_avx2(x, q, d, c128, c8) };
    }
    quantize_row_impl(x, q, d, c128, c8)
}

impl QActivations {
    /// Quantizes `x[m, k]` row by row (reusing the buffers; rows in parallel when large).
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(k.is_multiple_of(BLOCK) && x.len() >= m * k, "x [{m}, {k}]");
        let nb = k / BLOCK;
        let (tk, tnb) = (TERMS * k, TERMS * nb);
        self.q.resize(m * tk, 0);
        self.d.resize(m * tnb, 0.0);
        self.c128.resize(m * tnb, 0);
        self.c8.resize(m * tnb, 0);
        self.m = m;
        self.k = k;
        if m == 0 || k == 0 {
            return;
        }
        let x = &x[..m * k];
        // A decode batch's rows too: on one thread, 8 rows of 2,048 took ~20 µs between
        // the team's loops, several times a layer.
        if m >= 2 && m * k >= 1 << 13 {
            let (q, d) = (SyncPtr(self.q.as_mut_ptr()), SyncPtr(self.d.as_mut_ptr()));
            let (c128, c8) = (
                SyncPtr(self.c128.as_mut_ptr()),
                SyncPtr(self.c8.as_mut_ptr()),
            );
            team::for_each(m, |i| {
                // SAFETY: row i's terms in each buffer (sized above) are written by task i
                // only.
                unsafe {
                    quantize_row(
                        &x[i * k..(i + 1) * k],
                        std::slice::from_raw_parts_mut(q.get().add(i * tk), tk),
                        std::slice::from_raw_parts_mut(d.get().add(i * tnb), tnb),
                        std::slice::from_raw_parts_mut(c128.get().add(i * tnb), tnb),
                        std::slice::from_raw_parts_mut(c8.get().add(i * tnb), tnb),
                    )
                }
            });
        } else {
            x.chunks_exact(k)
                .zip(self.q.chunks_exact_mut(tk))
                .zip(self.d.chunks_exact_mut(tnb))
                .zip(self.c128.chunks_exact_mut(tnb))
                .zip(self.c8.chunks_exact_mut(tnb))
                .for_each(|((((x, q), d), c128), c8)| quantize_row(x, q, d, c128, c8));
        }
    }

    /// Rows `rows` of `from`, in that order: bit for bit what [`quantize`](Self::quantize)
    /// gives for those rows of `from`'s input (each row is quantized on its own), by
    /// copying instead of quantizing again (a decode batch's routed experts each take a
    /// few of its tokens).
    pub(crate) fn gather_rows(&mut self, from: &QActivations, rows: &[u32]) {
        let (m, k) = (rows.len(), from.k);
        let nb = k / BLOCK;
        let (tk, tnb) = (TERMS * k, TERMS * nb);
        self.q.clear();
        self.d.clear();
        self.c128.clear();
        self.c8.clear();
        for &r in rows {
            let r = r as usize;
            assert!(r < from.m, "row {r} of {} quantized rows", from.m);
            self.q.extend_from_slice(&from.q[r * tk..][..tk]);
            self.d.extend_from_slice(&from.d[r * tnb..][..tnb]);
            self.c128.extend_from_slice(&from.c128[r * tnb..][..tnb]);
            self.c8.extend_from_slice(&from.c8[r * tnb..][..tnb]);
        }
        self.m = m;
        self.k = k;
    }

    /// Rows quantized by the last [`quantize`](Self::quantize).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns (`k`) of the last [`quantize`](Self::quantize).
    pub fn cols(&self) -> usize {
        self.k
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
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    has_avx2()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vnni")
}

/// Every instruction path this CPU can run, best first.
#[allow(unused_mut, clippy::vec_init_then_push)] // x86-only pushes
fn available() -> Vec<Isa> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512_vnni() {
            out.push(Isa::Avx512Vnni);
        }
        if has_avx2() && std::is_x86_feature_detected!("avxvnni") {
            out.push(Isa::AvxVnni);
        }
        if has_avx2() {
            out.push(Isa::Avx2);
        }
    }
    out.push(Isa::Portable);
    out
}

/// Whether [`dsv2_core::isa`]'s limit lets products take `isa`.
fn allowed(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => dsv2_core::isa::avx512_vnni(),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => dsv2_core::isa::avx_vnni(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => dsv2_core::isa::avx2(),
        Isa::Portable => true,
    }
}

/// The best path of this CPU within the limit.
fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        available()
            .into_iter()
            .find(|&i| allowed(i))
            .unwrap_or(Isa::Portable)
    })
}

/// Name of the quantized-kernel instruction path in use (for reports).
pub fn isa_name() -> &'static str {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => "avx512-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => "avx-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// One thread's `rounds` rounds of [`crate::peak::CHAINS`] independent int8 dot-product
/// chains on this CPU's quantized-kernel instruction (`vpdpbusd` on 512 or 256 bits,
/// `maddubs` + `madd` on AVX2), for the peak probe ([`crate::peak`]); returns the
/// multiply-adds done.
pub(crate) fn peak_macs(rounds: usize) -> u64 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked in `available`).
        Isa::Avx512Vnni => unsafe { x86::peak512(rounds) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and AVX-VNNI (checked in `available`).
        Isa::AvxVnni => unsafe { x86::peak_avx_vnni(rounds) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked in `available`).
        Isa::Avx2 => unsafe { x86::peak_avx2(rounds) },
        Isa::Portable => peak_portable(rounds),
    }
}

/// [`peak_macs`] in plain integer arithmetic (what the portable kernel does).
fn peak_portable(rounds: usize) -> u64 {
    use crate::peak::CHAINS;
    use std::hint::black_box;
    let (w, x) = ([3i8; CHAINS], [-5i8; CHAINS]);
    let mut acc = [0i32; CHAINS];
    for _ in 0..rounds {
        // Re-read every round, so the products are not hoisted out of the loop.
        let (w, x) = (black_box(&w), black_box(&x));
        for ((a, &w), &x) in acc.iter_mut().zip(w).zip(x) {
            *a = a.wrapping_add(w as i32 * x as i32);
        }
    }
    black_box(acc);
    (rounds * CHAINS) as u64
}

/// `y[m, n] = x[m, k] · wᵀ` for a quantized `w` `[n, k]`, in parallel over the thread team.
pub fn qmatmul(x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    qmatmul_isa(isa(), x, m, w, y)
}

fn qmatmul_isa(isa: Isa, x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    with_activations(x, m, w.cols, |acts| checked_acts_matmul(isa, acts, m, w, y))
}

/// Which rows of a product are prompt rows. Where [`prompt_rows_in_float`] holds for the
/// weights, prompt rows take float activations (`q8_bf16.rs`, `q8_f32.rs`) and the others
/// int8 terms; elsewhere every row takes int8 terms. The kind is a property of the row's
/// request (its prompt's length against a product's threshold), never of the batch or of
/// the prompt's chunking, so a row's result still does not depend on the rows beside it.
#[derive(Clone, Copy, Debug, Default)]
pub enum PromptRows<'a> {
    /// No row is a prompt row (decode rows, or a backend not using bf16 prompt rows).
    #[default]
    None,
    /// Every row is.
    All,
    /// Row `i` is a prompt row when `lens[i] >= min` (one value per row: the length of
    /// the prompt the row belongs to, 0 for a decode row).
    Lens {
        /// Each row's prompt length.
        lens: &'a [u32],
        /// The least prompt length whose rows are prompt rows in this product.
        min: u32,
    },
}

impl<'a> PromptRows<'a> {
    /// The prompt rows of a product over `rows` rows whose prompt lengths are `lens`
    /// (empty: none), those of prompts of at least `min` tokens.
    pub fn of(lens: &'a [u32], rows: usize, min: u32) -> PromptRows<'a> {
        if lens.len() != rows || !lens.iter().any(|&l| l >= min) {
            PromptRows::None
        } else if lens.iter().all(|&l| l >= min) {
            PromptRows::All
        } else {
            PromptRows::Lens { lens, min }
        }
    }

    /// Whether row `i` is a prompt row.
    pub fn contains(&self, i: usize) -> bool {
        match self {
            PromptRows::None => false,
            PromptRows::All => true,
            PromptRows::Lens { lens, min } => lens[i] >= *min,
        }
    }

    /// Whether any of the first `m` rows is a prompt row.
    pub fn any(&self, m: usize) -> bool {
        match self {
            PromptRows::None => false,
            PromptRows::All => m > 0,
            PromptRows::Lens { lens, min } => lens[..m].iter().any(|l| l >= min),
        }
    }

    /// Rows `0..m` in maximal runs of one kind: `(rows, prompt)`.
    fn runs(self, m: usize) -> impl Iterator<Item = (Range<usize>, bool)> + 'a {
        let mut start = 0;
        std::iter::from_fn(move || {
            if start >= m {
                return None;
            }
            let kind = self.contains(start);
            let mut end = start + 1;
            while end < m && self.contains(end) == kind {
                end += 1;
            }
            let run = start..end;
            start = end;
            Some((run, kind))
        })
    }
}

/// Whether prompt rows of a product with `w` take float activations: q8 weights read with
/// two activation terms (a q8 model's default: the float rows keep its accuracy, one term
/// would not), in bf16 arithmetic on a CPU with AVX-512 BF16 that keeps pace with its int8
/// dot product (`q8_bf16.rs`, `q8_bf16::preferred`), in f32 on one with AVX2 and
/// FMA but no int8 dot product (`q8_f32.rs`).
pub fn prompt_rows_in_float(w: &QMatrix<'_>) -> bool {
    w.format == QuantFormat::Q8
        && w.terms == TERMS
        && (crate::q8_bf16::preferred() || crate::q8_f32::available())
}

/// [`qmatmul`] with the prompt rows of `prompt` in float activations where
/// [`prompt_rows_in_float`] holds (each run of rows of one kind as one product).
pub fn qmatmul_prompt(x: &[f32], m: usize, w: QMatrix<'_>, prompt: PromptRows<'_>, y: &mut [f32]) {
    if !prompt.any(m) || !prompt_rows_in_float(&w) {
        return qmatmul(x, m, w, y);
    }
    let (n, k) = (w.rows, w.cols);
    assert!(
        x.len() >= m * k && y.len() >= m * n,
        "qmatmul_prompt shapes"
    );
    for (rows, in_prompt) in prompt.runs(m) {
        let x = &x[rows.start * k..rows.end * k];
        let y = &mut y[rows.start * n..rows.end * n];
        if in_prompt && crate::q8_bf16::preferred() {
            crate::q8_bf16::matmul(x, rows.len(), w, y);
        } else if in_prompt {
            crate::q8_f32::matmul(x, rows.len(), w, y);
        } else {
            qmatmul(x, rows.len(), w, y);
        }
    }
}

/// `ya = x · aᵀ` and `yb = x · bᵀ` for two quantized matrices of the same width, with `x`
/// quantized once (a prefill's gate and up projections, or query and latent ones);
/// bit-identical to two [`qmatmul_prompt`] calls.
pub(crate) fn qmatmul_pair(
    x: &[f32],
    m: usize,
    a: QMatrix<'_>,
    ya: &mut [f32],
    b: QMatrix<'_>,
    yb: &mut [f32],
    prompt: PromptRows<'_>,
) {
    assert_eq!(a.cols, b.cols, "qmatmul_pair widths");
    if prompt.any(m) && prompt_rows_in_float(&a) && prompt_rows_in_float(&b) {
        // Each run of rows of one kind as one pair of products, the input rounded or
        // quantized once for both.
        let k = a.cols;
        assert!(x.len() >= m * k && ya.len() >= m * a.rows && yb.len() >= m * b.rows);
        for (rows, in_prompt) in prompt.runs(m) {
            let x = &x[rows.start * k..rows.end * k];
            let ya = &mut ya[rows.start * a.rows..rows.end * a.rows];
            let yb = &mut yb[rows.start * b.rows..rows.end * b.rows];
            if in_prompt && crate::q8_bf16::preferred() {
                crate::q8_bf16::matmul_pair(x, rows.len(), a, ya, b, yb);
            } else if in_prompt {
                crate::q8_f32::matmul(x, rows.len(), a, ya);
                crate::q8_f32::matmul(x, rows.len(), b, yb);
            } else {
                qmatmul_pair(x, rows.len(), a, ya, b, yb, PromptRows::None);
            }
        }
        return;
    }
    if prompt.any(m) && (prompt_rows_in_float(&a) || prompt_rows_in_float(&b)) {
        qmatmul_prompt(x, m, a, prompt, ya);
        return qmatmul_prompt(x, m, b, prompt, yb);
    }
    with_activations(x, m, a.cols, |acts| {
        checked_acts_matmul(isa(), acts, m, a, ya);
        checked_acts_matmul(isa(), acts, m, b, yb);
    })
}

/// `y = acts · wᵀ` after checking the shapes.
fn checked_acts_matmul(isa: Isa, acts: &QActivations, m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    w.check();
    assert!(acts.m >= m && acts.k == k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    acts_matmul(isa, acts, m, w, y)
}

/// Runs `f` on `x` (`m` rows of `k`) quantized into this thread's activation buffers.
fn with_activations<R>(x: &[f32], m: usize, k: usize, f: impl FnOnce(&QActivations) -> R) -> R {
    assert!(x.len() >= m * k, "activations shorter than {m} rows of {k}");
    crate::scratch::with_local(&ACTIVATIONS, |acts| {
        acts.quantize(x, m, k);
        f(acts)
    })
}

/// Weight tiles per task of a decode product: one task per thread, at most
/// [`team::DECODE_TASK_BYTES`] each. Every task restarts the weight stream (its first reads wait
/// on memory), so few large tasks stream best, most of all where each core streams
/// alone (vCPUs on two CCDs). The MoE's products run in one loop over all the chosen
/// experts' tasks (`moe::run_tiles`), so a slower thread takes fewer of them there.
/// Measured in the real decode (8 V2-Lite layers, the task count alternating step by
/// step in one run; docs/BENCHMARKS.md, session 18): at split placement one task per
/// thread took q8 steps from 24.3-24.6 to 23.4-23.7 ms and q4 from 17.4-18.4 to
/// 16.9-18.0, at one CCD within ±0.5% of two per thread. (84c7d05 measured separate
/// expert products, each its own loop, where two per thread were better: 61 against
/// 58 GiB/s at q8, 61 against 51 at q4.) On 16 threads of a Sapphire Rapids 1, 2 and 4
/// tasks a thread were within the host's noise (session 27).
pub(crate) fn decode_tiles_per_task(tiles: usize, tile_bytes: usize, threads: usize) -> usize {
    team::decode_task_len(tiles, tile_bytes, threads, 1, 1)
}

fn acts_matmul(isa: Isa, acts: &QActivations, m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    let n = w.rows;
    let tiles = w.tiles();
    let job = Job::new(isa, acts, w, 0..tiles);
    let threads = team::threads();
    let y_ptr = SyncPtr(y.as_mut_ptr());
    if m <= MR_MAX {
        // Decode: stream the weights once, both cores over disjoint row tiles.
        let per_task = decode_tiles_per_task(tiles, w.tile_bytes(), threads);
        team::for_each(tiles.div_ceil(per_task), |c| {
            let t = c * per_task..((c + 1) * per_task).min(tiles);
            // SAFETY: tasks write disjoint output columns of `y` ([m, n]).
            unsafe { job.run(0..m, t, 0..n, y_ptr.get(), n, 0) };
        });
    } else {
        let row_chunks = m.div_ceil(ROW_CHUNK);
        let per_task = (tiles * row_chunks)
            .div_ceil(threads * 4)
            .clamp(NC_MAX, 16)
            .next_multiple_of(NC_MAX);
        let tile_chunks = tiles.div_ceil(per_task);
        team::for_each(tile_chunks * row_chunks, |task| {
            let (tc, rc) = (task / row_chunks, task % row_chunks);
            let t = tc * per_task..((tc + 1) * per_task).min(tiles);
            let i = rc * ROW_CHUNK..((rc + 1) * ROW_CHUNK).min(m);
            // SAFETY: tasks write disjoint (row, column) blocks of `y` ([m, n]).
            unsafe { job.run(i, t, 0..n, y_ptr.get(), n, 0) };
        });
    }
}

/// Computes weight rows `rows` (start a multiple of 16; end a multiple of 16 or
/// `w.rows`) for the `m` quantized activation rows, serially on the calling thread:
/// `y[i·y_stride + r − rows.start] = Σ_k x[i, k] · w[r, k]`. The results are bit-identical
/// to [`qmatmul`]'s.
///
/// # Panics
/// If `acts` does not hold `m` rows of `w.cols`, the range is misaligned, or `y` is short.
pub fn qmatmul_rows(
    acts: &QActivations,
    m: usize,
    w: QMatrix<'_>,
    rows: Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    let width = rows.end.saturating_sub(rows.start);
    if m > 0 && width > 0 {
        assert!(y.len() >= (m - 1) * y_stride + width && y_stride >= width);
    }
    // SAFETY: `y` holds every value written (checked above) and is borrowed exclusively.
    unsafe { qmatmul_rows_ptr(acts, m, w, rows, y.as_mut_ptr(), y_stride) }
}

/// [`qmatmul_rows`] through a raw output pointer, so that parallel tasks can write
/// disjoint columns of the same output rows.
///
/// # Safety
/// `y[i·y_stride + r − rows.start]` must be valid for writes for `i < m` and `r` in
/// `rows`, and not accessed concurrently.
///
/// # Panics
/// As [`qmatmul_rows`] (not for the output, which is not checked).
pub(crate) unsafe fn qmatmul_rows_ptr(
    acts: &QActivations,
    m: usize,
    w: QMatrix<'_>,
    rows: Range<usize>,
    y: *mut f32,
    y_stride: usize,
) {
    w.check();
    assert!(acts.m >= m && acts.k == w.cols, "activations do not match");
    assert!(
        rows.start.is_multiple_of(TILE)
            && rows.start <= rows.end
            && rows.end <= w.rows
            && (rows.end.is_multiple_of(TILE) || rows.end == w.rows),
        "rows {rows:?} of {}",
        w.rows
    );
    let width = rows.end - rows.start;
    if m == 0 || width == 0 {
        return;
    }
    assert!(y_stride >= width);
    let tiles = rows.start / TILE..rows.end.div_ceil(TILE);
    let job = Job::new(isa(), acts, w, tiles.clone());
    // SAFETY: the caller's contract.
    unsafe { job.run(0..m, tiles, rows.clone(), y, y_stride, rows.start) };
}

/// A kernel that computes one register tile a call: activations, first kernel row, row
/// step, the tiles' weights and scales, the output scratch.
type OneTile =
    unsafe fn(&QActivations, usize, usize, [*const u8; 2], [*const f16; 2], &mut [f32; OUT_LEN]);

/// A register tile's results as each is done: its index in the call's run, the scratch.
type Emit<'e> = &'e mut dyn FnMut(usize, &[f32; OUT_LEN]);

/// The weights and scales of group `j` of `nc` consecutive tiles (of `nb` blocks, `q4` or
/// q8) that starts at `wq`/`ws`: a kernel's `j`-th register tile in a run of tiles.
#[inline(always)]
fn tile_group(
    wq: [*const u8; 2],
    ws: [*const f16; 2],
    j: usize,
    nc: usize,
    nb: usize,
    q4: bool,
) -> ([*const u8; 2], [*const f16; 2]) {
    let block_bytes = if q4 { BLOCK / 2 } else { BLOCK } * TILE;
    (
        wq.map(|p| p.wrapping_add(j * nc * nb * block_bytes)),
        ws.map(|p| p.wrapping_add(j * nc * nb * TILE)),
    )
}

/// One product's shared state: the weights, and a zero-padded copy of a ragged last tile.
struct Job<'a> {
    isa: Isa,
    acts: &'a QActivations,
    w: QMatrix<'a>,
    /// The last tile padded to 16 rows when `rows % 16 != 0` and it is used.
    pad: Option<(Vec<u8>, Vec<f16>)>,
}

impl<'a> Job<'a> {
    fn new(isa: Isa, acts: &'a QActivations, w: QMatrix<'a>, tiles: Range<usize>) -> Job<'a> {
        let last = w.tiles().saturating_sub(1);
        let ragged = !w.rows.is_multiple_of(TILE) && tiles.contains(&last);
        Job {
            isa,
            acts,
            w,
            pad: ragged.then(|| padded_tile(&w, last)),
        }
    }

    /// The 16-row tile `t`: its bytes and scales.
    fn tile(&self, t: usize) -> (*const u8, *const f16) {
        let w = &self.w;
        if (t + 1) * TILE > w.rows {
            let (q, s) = self.pad.as_ref().expect("padded last tile");
            return (q.as_ptr(), s.as_ptr());
        }
        let (rb, nb) = (w.format.row_bytes(w.cols), w.cols / BLOCK);
        (
            w.q[t * TILE * rb..].as_ptr(),
            w.scales[t * TILE * nb..].as_ptr(),
        )
    }

    /// Register-tile shape (kernel rows, weight tiles) for a chunk of `m` kernel rows
    /// (activation terms); the rows are a multiple of the terms in use.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn shape(&self, m: usize) -> (usize, usize) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if m <= MR_MAX => (m, 1),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => (6, 2),
            _ => (4, 1),
        }
    }

    /// Outputs of activation rows `act_rows` × weight rows of `tiles` that lie in `keep`,
    /// written to `y[i·y_stride + r − origin]` (`i` counted from 0 at `act_rows.start`
    /// relative to `y`, i.e. `y` row `i` is activation row `i`).
    ///
    /// # Safety
    /// Those `y` elements must be valid for writes and not accessed concurrently.
    unsafe fn run(
        &self,
        act_rows: Range<usize>,
        tiles: Range<usize>,
        keep: Range<usize>,
        y: *mut f32,
        y_stride: usize,
        origin: usize,
    ) {
        // The kernels see each row's terms as rows of their own (`mr` is a multiple of
        // `terms`, so a register tile holds all terms of its rows); they are added here.
        let q4 = self.w.format == QuantFormat::Q4;
        let terms = self.w.terms;
        let (mr_max, nc_max) = self.shape(terms * act_rows.len());
        debug_assert!(mr_max.is_multiple_of(terms));
        let mut out = [0.0f32; OUT_LEN];
        #[cfg(target_arch = "x86_64")]
        if PREFETCH > 0 && mr_max >= PREFETCH_MIN_ROWS && !tiles.is_empty() {
            // The kernel prefetches a fixed distance ahead of the block it reads; a task
            // starting on fresh tiles has nothing in flight yet, so ask for the first
            // stretch of its first tiles now (the rest follows from the kernel).
            let ahead = PREFETCH * 512;
            for t in tiles.start..(tiles.start + nc_max).min(tiles.end) {
                let (q, _) = self.tile(t);
                for at in (0..ahead).step_by(64) {
                    // SAFETY: a prefetch of any address is harmless.
                    unsafe {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(at) as *const i8)
                    };
                }
            }
        }
        let (i_start, i_end) = (terms * act_rows.start, terms * act_rows.end);
        // With every row in one register tile (decode), one kernel call runs all the
        // full groups of tiles of the range, so the core's stream of weights does not
        // pause at each tile for the dispatch to a kernel and the glue between calls; a
        // ragged last tile (padded) runs alone.
        let one_row_tile = i_end - i_start <= mr_max;
        let full_tiles = self.w.rows / TILE;
        let mut t = tiles.start;
        while t < tiles.end {
            let nc = nc_max.min(tiles.end - t);
            let run = if one_row_tile {
                (tiles.end.min(full_tiles).saturating_sub(t) / nc).max(1)
            } else {
                1
            };
            let (q0, s0) = self.tile(t);
            let (q1, s1) = if nc > 1 { self.tile(t + 1) } else { (q0, s0) };
            let (wq, ws) = ([q0, q1], [s0, s1]);
            let mut i0 = i_start;
            while i0 < i_end {
                let mr = mr_max.min(i_end - i0);
                let mut emit = |j: usize, out: &[f32; OUT_LEN]| {
                    // SAFETY: the caller's contract.
                    unsafe { self.store(out, t + j * nc, nc, i0, mr, &keep, y, y_stride, origin) }
                };
                // SAFETY: the tile pointers hold `run` full groups of `nc` 16-row tiles
                // of `cols` columns (or one group with a padded tile) and `acts` holds
                // rows i0..i0 + mr of `cols` (checked by the callers).
                unsafe {
                    self.kernel(
                        q4,
                        mr,
                        nc,
                        i0,
                        TERMS / terms,
                        wq,
                        ws,
                        run,
                        &mut out,
                        &mut emit,
                    )
                };
                i0 += mr;
            }
            t += run * nc;
        }
    }

    /// Writes a register tile's outputs (`out`, kernel rows `i0..i0 + mr` × tiles
    /// `t..t + nc`) that lie in `keep` to `y`, each row's terms added.
    ///
    /// # Safety
    /// As [`Job::run`]'s.
    #[allow(clippy::too_many_arguments)]
    unsafe fn store(
        &self,
        out: &[f32; OUT_LEN],
        t: usize,
        nc: usize,
        i0: usize,
        mr: usize,
        keep: &Range<usize>,
        y: *mut f32,
        y_stride: usize,
        origin: usize,
    ) {
        let terms = self.w.terms;
        for c in 0..nc {
            let r0 = (t + c) * TILE;
            let (lo, hi) = (r0.max(keep.start), (r0 + TILE).min(keep.end));
            if lo >= hi {
                continue;
            }
            for i in 0..mr / terms {
                let term =
                    |t: usize| &out[((terms * i + t) * NC_MAX + c) * TILE + lo - r0..][..hi - lo];
                // SAFETY: in bounds and exclusive (the caller's contract).
                let dst = unsafe {
                    let row = i0 / terms + i;
                    let dst = y.add(row * y_stride + lo - origin);
                    std::slice::from_raw_parts_mut(dst, hi - lo)
                };
                // The terms' sum written in one pass (a copy then an add read the
                // output back; no measurable speed difference).
                if terms == 1 {
                    dst.copy_from_slice(term(0));
                } else {
                    debug_assert_eq!(terms, 2);
                    dst.iter_mut()
                        .zip(term(0).iter().zip(term(1)))
                        .for_each(|(d, (a, b))| *d = a + b);
                }
            }
        }
    }

    /// Runs the register tile `mr × nc` of this ISA over `count` consecutive groups of
    /// `nc` tiles, handing each group's results to `emit`.
    ///
    /// # Safety
    /// `wq`/`ws` point to `count · nc` full consecutive tiles; `acts` holds rows
    /// `i0..i0 + mr`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        &self,
        q4: bool,
        mr: usize,
        nc: usize,
        i0: usize,
        step: usize,
        wq: [*const u8; 2],
        ws: [*const f16; 2],
        count: usize,
        out: &mut [f32; OUT_LEN],
        emit: Emit<'_>,
    ) {
        let a = self.acts;
        // Kernels that run one register tile a call: `count` calls, `nc` tiles apart.
        let mut each = |kern: OneTile| {
            for j in 0..count {
                let (wq, ws) = tile_group(wq, ws, j, nc, a.k / BLOCK, q4);
                // SAFETY: the caller's contract (tiles j·nc.. are full and in the matrix).
                unsafe { kern(a, i0, step, wq, ws, out) };
                emit(j, out);
            }
        };
        macro_rules! arms {
            ($f:ident; $(($m:literal, $n:literal)),*) => {
                match (q4, mr, nc) {
                    $(
                        (false, $m, $n) => each($f::<false, $m, $n>),
                        (true, $m, $n) => each($f::<true, $m, $n>),
                    )*
                    _ => unreachable!("tile {mr}x{nc}"),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        macro_rules! arms_run {
            ($f:ident; $(($m:literal, $n:literal)),*) => {
                match (q4, mr, nc) {
                    $(
                        (false, $m, $n) => $f::<false, $m, $n>(a, i0, step, wq, ws, count, out, emit),
                        (true, $m, $n) => $f::<true, $m, $n>(a, i0, step, wq, ws, count, out, emit),
                    )*
                    _ => unreachable!("tile {mr}x{nc}"),
                }
            };
        }
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked in `available`).
            Isa::Avx512Vnni => unsafe {
                arms_run!(kern512; (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1),
                      (8, 1), (1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2))
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2, FMA, F16C and AVX-VNNI (checked in `available`).
            Isa::AvxVnni => unsafe { arms_run!(kern_avx_vnni; (1, 1), (2, 1), (3, 1), (4, 1)) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked in `available`).
            Isa::Avx2 => unsafe { arms_run!(kern_avx2; (1, 1), (2, 1), (3, 1), (4, 1)) },
            // SAFETY: as this function's contract.
            Isa::Portable => arms!(kern_portable; (1, 1), (2, 1), (3, 1), (4, 1)),
        }
    }
}

/// The ragged last tile `t` of `w` copied into a full 16-row tile (zero rows after).
pub(crate) fn padded_tile(w: &QMatrix<'_>, t: usize) -> (Vec<u8>, Vec<f16>) {
    let (rb, nb) = (w.format.row_bytes(w.cols), w.cols / BLOCK);
    let rt = dsv2_core::quant::tile_rows(w.rows, t);
    // 64-byte units per block: 8 (q8) or 4 (q4), each 4 bytes per row.
    let units = w.format.block_bytes() / 4;
    let src = &w.q[t * TILE * rb..][..rt * rb];
    let src_s = &w.scales[t * TILE * nb..][..rt * nb];
    let mut q = vec![0u8; TILE * rb];
    let mut s = vec![f16::ZERO; TILE * nb];
    for b in 0..nb {
        for u in 0..units {
            let from = &src[(b * units + u) * 4 * rt..][..4 * rt];
            q[(b * units + u) * 4 * TILE..][..4 * rt].copy_from_slice(from);
        }
        s[b * TILE..][..rt].copy_from_slice(&src_s[b * rt..][..rt]);
    }
    (q, s)
}

/// The portable path: one register tile of `mr` rows × one weight tile.
///
/// Written for the compiler's vectorizer (SSE2 on any x86-64, NEON on aarch64): each
/// block's 16 × 32 weights are unpacked once into rows of bytes, and each output's
/// block sum is a plain 32-long integer dot product (`pmaddwd` on SSE2).
///
/// # Safety
/// `wq[0]`/`ws[0]` point to a full tile (`NC` is 1); `a` holds rows `i0..i0 + MR`.
unsafe fn kern_portable<const Q4: bool, const MR: usize, const NC: usize>(
    a: &QActivations,
    i0: usize,
    step: usize,
    wq: [*const u8; 2],
    ws: [*const f16; 2],
    out: &mut [f32; OUT_LEN],
) {
    debug_assert_eq!(NC, 1);
    let (wq, ws) = (wq[0], ws[0]);
    let (k, nb) = (a.k, a.k / BLOCK);
    let bb = if Q4 { BLOCK / 2 } else { BLOCK } * TILE;
    // SAFETY: a full tile is 16 rows × k weights and 16 × nb scales.
    let (wq, ws) = unsafe {
        (
            std::slice::from_raw_parts(wq, nb * bb),
            std::slice::from_raw_parts(ws, nb * TILE),
        )
    };
    let mut acc = [[0.0f32; TILE]; MR];
    let mut w = [[0i8; BLOCK]; TILE];
    for b in 0..nb {
        let blk = &wq[b * bb..][..bb];
        if Q4 {
            unpack_q4_block(blk, &mut w);
        } else {
            unpack_q8_block(blk, &mut w);
        }
        let mut dw = [0.0f32; TILE];
        ws[b * TILE..][..TILE].convert_to_f32_slice(&mut dw);
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let row = i0 + i;
            let x: &[i8; BLOCK] = a.q[row * step * k + b * BLOCK..][..BLOCK]
                .try_into()
                .expect("a block of activations");
            let dx = a.d[row * step * nb + b];
            // The block sums first, then the 16 scalings as one loop the compiler
            // vectorizes (each scaling after its own sum did not vectorize).
            let sums: [i32; TILE] = std::array::from_fn(|r| dot_block(&w[r], x));
            for ((o, sum), dw) in acc_row.iter_mut().zip(sums).zip(dw) {
                *o = crate::kernels::fma(sum as f32, dw * dx, *o);
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        out[i * NC_MAX * TILE..][..TILE].copy_from_slice(acc_row);
    }
}

/// One q8 block of a tile (8 units of 16 rows × 4 consecutive weights) as rows.
#[inline(always)]
fn unpack_q8_block(blk: &[u8], w: &mut [[i8; BLOCK]; TILE]) {
    let blk: &[u8; BLOCK * TILE] = blk.try_into().expect("a q8 block of a tile");
    for (r, wr) in w.iter_mut().enumerate() {
        // Each unit's 4 bytes of row r move as one word.
        let words: [u32; BLOCK / 4] = std::array::from_fn(|u| {
            let at = u * 4 * TILE + 4 * r;
            u32::from_ne_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
        });
        for (dst, word) in wr.chunks_exact_mut(4).zip(words) {
            dst.copy_from_slice(&word.to_ne_bytes().map(|b| b as i8));
        }
    }
}

/// One q4 block of a tile (4 units of 16 rows × 4 bytes, low nibbles weights
/// `8u..8u + 4`, high nibbles `8u + 4..8u + 8`) as rows of `code − 8`.
#[inline(always)]
fn unpack_q4_block(blk: &[u8], w: &mut [[i8; BLOCK]; TILE]) {
    for u in 0..BLOCK / 8 {
        for (r, wr) in w.iter_mut().enumerate() {
            for j in 0..4 {
                let byte = blk[u * 4 * TILE + 4 * r + j];
                wr[8 * u + j] = (byte & 0x0f) as i8 - 8;
                wr[8 * u + 4 + j] = (byte >> 4) as i8 - 8;
            }
        }
    }
}

/// `Σ w·x` over one block, exact.
#[inline(always)]
fn dot_block(w: &[i8; BLOCK], x: &[i8; BLOCK]) -> i32 {
    w.iter().zip(x).map(|(&p, &q)| p as i32 * q as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// 4 activation bytes broadcast to every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> i32 {
        // SAFETY: the caller's pointer is in bounds for 4 bytes.
        unsafe { (p as *const i32).read_unaligned() }
    }

    /// Defines `$name`, the kernel of a run of `count` register tiles: `MR` activation
    /// rows × `NC` tiles of 16 weight rows, `count` consecutive groups of `NC` tiles from
    /// `wq`/`ws`, each group through the one-tile kernel `$one` (a direct call) and its results
    /// handed to `emit` in `out`. One call runs a decode task's whole stretch of tiles, so
    /// its weight stream never stops between tiles (one core over a 512 MB q8 matrix at
    /// m = 1: 24.2-25.7 → 25.3-26.9 GB/s, medians of 10 passes, builds alternating).
    macro_rules! run_of_tiles {
        ($name:ident, $one:ident, $features:literal) => {
            /// See `run_of_tiles`.
            ///
            /// # Safety
            /// The CPU features; `wq`/`ws` point to `count · NC` full consecutive tiles;
            /// `a` holds rows `i0..i0 + MR`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name<const Q4: bool, const MR: usize, const NC: usize>(
                a: &QActivations,
                i0: usize,
                step: usize,
                wq: [*const u8; 2],
                ws: [*const f16; 2],
                count: usize,
                out: &mut [f32; OUT_LEN],
                emit: Emit<'_>,
            ) {
                for j in 0..count {
                    let (wq, ws) = tile_group(wq, ws, j, NC, a.k / BLOCK, Q4);
                    // SAFETY: register tile j of the caller's `count` (full tiles).
                    unsafe { $one::<Q4, MR, NC>(a, i0, step, wq, ws, out) };
                    emit(j, out);
                }
            }
        };
    }

    run_of_tiles!(kern512, tile512, "avx512f,avx512bw,avx512vnni");

    /// AVX-512 VNNI register tile: `MR` activation rows × `NC` tiles of 16 weight rows
    /// (the tile of [`kern512`]).
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `wq`/`ws` point to `NC` full tiles; `a` holds rows
    /// `i0..i0 + MR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile512<const Q4: bool, const MR: usize, const NC: usize>(
        a: &QActivations,
        i0: usize,
        step: usize,
        wq: [*const u8; 2],
        ws: [*const f16; 2],
        out: &mut [f32; OUT_LEN],
    ) {
        let (k, nb) = (a.k, a.k / BLOCK);
        let bb = if Q4 { 256 } else { 512 };
        // The same distance in bytes for both formats (q4 blocks are half as long).
        let pf = if MR >= PREFETCH_MIN_ROWS {
            PREFETCH * 512 / bb
        } else {
            0
        };
        let corr = if Q4 { &a.c8 } else { &a.c128 };
        let xq: [*const i8; MR] = std::array::from_fn(|i| a.q[(i0 + i) * step * k..].as_ptr());
        let xd: [&[f32]; MR] = std::array::from_fn(|i| &a.d[(i0 + i) * step * nb..][..nb]);
        let xc: [&[i32]; MR] = std::array::from_fn(|i| &corr[(i0 + i) * step * nb..][..nb]);
        // With few accumulators, alternate two integer chains to hide dpbusd latency
        // (integer sums are exact: the split does not change results).
        let split = MR * NC <= 2;
        let low4 = _mm512_set1_epi8(0x0f);
        let bias = _mm512_set1_epi8(-128);
        let mut facc = [[_mm512_setzero_ps(); NC]; MR];
        for b in 0..nb {
            // The integer sums start at the block's correction `−cx` (bias times the
            // activations' sum), so no subtraction is left for the end (exact either way).
            let mut acc: [[__m512i; NC]; MR] =
                std::array::from_fn(|i| [_mm512_set1_epi32(xc[i][b].wrapping_neg()); NC]);
            let mut acc2 = [[_mm512_setzero_si512(); NC]; MR];
            // SAFETY (all loads below): block b of a full tile, k < cols of the rows.
            unsafe {
                if pf > 0 {
                    // Weights a few blocks ahead (may run past the tile: prefetches of
                    // any address are harmless).
                    for w in &wq[..NC] {
                        let ahead = w.wrapping_add((b + pf) * bb);
                        for l in (0..bb).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                        }
                    }
                }
                if Q4 {
                    for u in 0..4 {
                        let mut lo = [_mm512_setzero_si512(); NC];
                        let mut hi = [_mm512_setzero_si512(); NC];
                        for c in 0..NC {
                            let raw = _mm512_loadu_si512(wq[c].add(b * bb + u * 64) as *const _);
                            lo[c] = _mm512_and_si512(raw, low4);
                            hi[c] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                        }
                        for i in 0..MR {
                            let xl = _mm512_set1_epi32(bcast4(xq[i].add(b * BLOCK + 8 * u)));
                            let xh = _mm512_set1_epi32(bcast4(xq[i].add(b * BLOCK + 8 * u + 4)));
                            for c in 0..NC {
                                acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], lo[c], xl);
                                if split {
                                    acc2[i][c] = _mm512_dpbusd_epi32(acc2[i][c], hi[c], xh);
                                } else {
                                    acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], hi[c], xh);
                                }
                            }
                        }
                    }
                } else {
                    for g in 0..8 {
                        let mut wv = [_mm512_setzero_si512(); NC];
                        for c in 0..NC {
                            let raw = _mm512_loadu_si512(wq[c].add(b * bb + g * 64) as *const _);
                            wv[c] = _mm512_xor_si512(raw, bias);
                        }
                        for i in 0..MR {
                            let xb = _mm512_set1_epi32(bcast4(xq[i].add(b * BLOCK + 4 * g)));
                            for c in 0..NC {
                                if split && g % 2 == 1 {
                                    acc2[i][c] = _mm512_dpbusd_epi32(acc2[i][c], wv[c], xb);
                                } else {
                                    acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], wv[c], xb);
                                }
                            }
                        }
                    }
                }
            }
            let mut dw = [_mm512_setzero_ps(); NC];
            for c in 0..NC {
                // SAFETY: the 16 scales of block b of a full tile.
                let h = unsafe { _mm256_loadu_si256(ws[c].add(b * TILE) as *const _) };
                dw[c] = _mm512_cvtph_ps(h);
            }
            for i in 0..MR {
                let dx = _mm512_set1_ps(xd[i][b]);
                for c in 0..NC {
                    let mut s = acc[i][c];
                    if split {
                        s = _mm512_add_epi32(s, acc2[i][c]);
                    }
                    let s = _mm512_cvtepi32_ps(s);
                    facc[i][c] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw[c], dx), facc[i][c]);
                }
            }
        }
        for (i, row) in facc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: 16 floats at (i·NC_MAX + c)·16 < OUT_LEN.
                unsafe { _mm512_storeu_ps(out[(i * NC_MAX + c) * TILE..].as_mut_ptr(), *v) };
            }
        }
    }

    /// [`super::peak_macs`] on AVX-512 VNNI: 64 multiply-adds per `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn peak512(rounds: usize) -> u64 {
        use crate::peak::CHAINS;
        let w = _mm512_set1_epi8(std::hint::black_box(3));
        let x = _mm512_set1_epi8(std::hint::black_box(-5));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_dpbusd_epi32(*a, w, x);
            }
        }
        std::hint::black_box(acc);
        (rounds * CHAINS * 64) as u64
    }

    /// [`super::peak_macs`]'s chains on 256 bits with `dot` (32 multiply-adds each),
    /// inlined into each instruction set's function below.
    #[inline(always)]
    unsafe fn peak256(rounds: usize, dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i) -> u64 {
        use crate::peak::CHAINS;
        let w = _mm256_set1_epi8(std::hint::black_box(3));
        let x = _mm256_set1_epi8(std::hint::black_box(-5));
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = dot(*a, w, x);
            }
        }
        std::hint::black_box(acc);
        (rounds * CHAINS * 32) as u64
    }

    /// [`super::peak_macs`] on AVX-VNNI: 256-bit `vpdpbusd`.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn peak_avx_vnni(rounds: usize) -> u64 {
        // SAFETY: AVX-VNNI (this function's features).
        unsafe { peak256(rounds, |a, w, x| dot4_vnni(a, w, x)) }
    }

    /// [`super::peak_macs`] on AVX2: `maddubs` + `madd` + `add`, with the activations
    /// xored with the chain's sum first (as the q8 kernel's `vpsignb`: one operation),
    /// so that the loop-invariant `maddubs(w, x)` cannot be hoisted out of the loop (it
    /// was, and the peak read ~8× too high).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn peak_avx2(rounds: usize) -> u64 {
        // SAFETY: AVX2 (this function's features).
        unsafe { peak256(rounds, |a, w, x| dot4_avx2(a, w, _mm256_xor_si256(x, a))) }
    }

    /// q8 on AVX2: `Σ q·x` per 4 bytes via `maddubs(|q|, sign(x, q))` + `madd` (|q|,
    /// |x| ≤ 127: no saturation); no bias.
    #[inline(always)]
    unsafe fn dot8_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        unsafe {
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    }

    /// q4 codes (0..=15, unsigned) on AVX2: `maddubs` + `madd`.
    #[inline(always)]
    unsafe fn dot4_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        unsafe {
            let p = _mm256_maddubs_epi16(w, x);
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    }

    /// q8 on AVX-VNNI: `(q + 128)·x` (the bias is subtracted per block).
    #[inline(always)]
    unsafe fn dot8_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        unsafe {
            let u = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
            _mm256_dpbusd_avx_epi32(acc, u, x)
        }
    }

    #[inline(always)]
    unsafe fn dot4_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_avx_epi32(acc, w, x) }
    }

    /// How far ahead of its block the AVX2 tile asks for weights (8 KiB). Its
    /// `maddubs`/`madd` pairs are slow enough that the hardware prefetchers alone leave
    /// one core's stream short of memory: measured on a Zen 4 VM under
    /// `DSV2_CPU_ISA=avx2`, one core over a 22 MB q8 matrix at m = 1 (`qtiming`)
    /// 18.9-21.2 → 25.2-25.6 GB/s, 8 V2-Lite layers at q8 on two threads 24.3-27.0 →
    /// 26.7-28.7 tokens/s, at q4 28.7-36.7 → 39.1-47.9 (BENCHMARKS, session 17). The AVX-VNNI tile (not measured
    /// here) and the AVX-512 one at 1-2 kernel rows (slower with it) do not.
    const AVX2_PREFETCH_BYTES: usize = 8 << 10;

    /// 256-bit register tile: `MR` activation rows × one 16-row tile (two ymm halves).
    macro_rules! kern256 {
        (
            $name:ident, $one:ident, $features:literal, $dot8:ident, $dot4:ident, $q8_bias:literal,
            $prefetch:literal
        ) => {
            run_of_tiles!($name, $one, $features);

            /// The 256-bit register tile: `MR` activation rows × one 16-row tile.
            ///
            /// # Safety
            /// The CPU features; `wq`/`ws` point to one full tile (`NC` is 1); `a` holds
            /// rows `i0..i0 + MR`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $one<const Q4: bool, const MR: usize, const NC: usize>(
                a: &QActivations,
                i0: usize,
                step: usize,
                wq: [*const u8; 2],
                ws: [*const f16; 2],
                out: &mut [f32; OUT_LEN],
            ) {
                debug_assert_eq!(NC, 1);
                let (k, nb) = (a.k, a.k / BLOCK);
                let bb = if Q4 { 256 } else { 512 };
                let xq: [*const i8; MR] =
                    std::array::from_fn(|i| a.q[(i0 + i) * step * k..].as_ptr());
                let xd: [&[f32]; MR] = std::array::from_fn(|i| &a.d[(i0 + i) * step * nb..][..nb]);
                let xc: [&[i32]; MR] = std::array::from_fn(|i| {
                    if Q4 {
                        &a.c8[(i0 + i) * step * nb..][..nb]
                    } else {
                        &a.c128[(i0 + i) * step * nb..][..nb]
                    }
                });
                let low4 = _mm256_set1_epi8(0x0f);
                let mut facc = [[_mm256_setzero_ps(); 2]; MR];
                for b in 0..nb {
                    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
                    // SAFETY (loads): block b of a full tile; k within the rows.
                    unsafe {
                        let blk = wq[0].add(b * bb);
                        if $prefetch {
                            // A fixed distance ahead, running on into the next tiles of the
                            // task (a prefetch of any address is harmless).
                            let ahead = blk.wrapping_add(AVX2_PREFETCH_BYTES);
                            for l in (0..bb).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                            }
                        }
                        if Q4 {
                            for u in 0..4 {
                                for h in 0..2 {
                                    let raw = _mm256_loadu_si256(
                                        blk.add(u * 64 + h * 32) as *const __m256i
                                    );
                                    let lo = _mm256_and_si256(raw, low4);
                                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                                    for i in 0..MR {
                                        let p = xq[i].add(b * BLOCK + 8 * u);
                                        let xl = _mm256_set1_epi32(bcast4(p));
                                        let xh = _mm256_set1_epi32(bcast4(p.add(4)));
                                        acc[i][h] = $dot4(acc[i][h], lo, xl);
                                        acc[i][h] = $dot4(acc[i][h], hi, xh);
                                    }
                                }
                            }
                        } else {
                            for g in 0..8 {
                                for h in 0..2 {
                                    let wv = _mm256_loadu_si256(
                                        blk.add(g * 64 + h * 32) as *const __m256i
                                    );
                                    for i in 0..MR {
                                        let p = xq[i].add(b * BLOCK + 4 * g);
                                        let xb = _mm256_set1_epi32(bcast4(p));
                                        acc[i][h] = $dot8(acc[i][h], wv, xb);
                                    }
                                }
                            }
                        }
                    }
                    // SAFETY: the 16 scales of block b of a full tile.
                    let dwh = unsafe { _mm_loadu_si128(ws[0].add(b * TILE) as *const __m128i) };
                    let dwl = unsafe { _mm_loadu_si128(ws[0].add(b * TILE + 8) as *const __m128i) };
                    let dw = [_mm256_cvtph_ps(dwh), _mm256_cvtph_ps(dwl)];
                    for i in 0..MR {
                        let dx = _mm256_set1_ps(xd[i][b]);
                        let cx = if Q4 || $q8_bias {
                            _mm256_set1_epi32(xc[i][b])
                        } else {
                            _mm256_setzero_si256()
                        };
                        for h in 0..2 {
                            let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][h], cx));
                            let d = _mm256_mul_ps(dw[h], dx);
                            facc[i][h] = _mm256_fmadd_ps(s, d, facc[i][h]);
                        }
                    }
                }
                for (i, row) in facc.iter().enumerate() {
                    for (h, v) in row.iter().enumerate() {
                        // SAFETY: 8 floats at i·NC_MAX·16 + 8h < OUT_LEN.
                        unsafe {
                            _mm256_storeu_ps(out[i * NC_MAX * TILE + 8 * h..].as_mut_ptr(), *v)
                        };
                    }
                }
            }
        };
    }

    kern256!(
        kern_avx2,
        one_avx2,
        "avx2,fma,f16c",
        dot8_avx2,
        dot4_avx2,
        false,
        true
    );
    kern256!(
        kern_avx_vnni,
        one_avx_vnni,
        "avx2,fma,f16c,avxvnni",
        dot8_vnni,
        dot4_vnni,
        true,
        false
    );
}

#[cfg(target_arch = "x86_64")]
use x86::{kern512, kern_avx2, kern_avx_vnni};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;
    use dsv2_core::quant::{quantize_rows, weight_block};

    struct Owned {
        format: QuantFormat,
        rows: usize,
        cols: usize,
        q: Vec<u8>,
        scales: Vec<f16>,
        terms: usize,
    }

    /// Every weight format with every activation-term count it is run with.
    const CASES: [(QuantFormat, usize); 3] = [
        (QuantFormat::Q8, TERMS),
        (QuantFormat::Q8, 1),
        (QuantFormat::Q4, 1),
    ];

    impl Owned {
        fn new(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> Owned {
            let src = values(rows * cols, seed);
            let mut q = vec![0u8; rows * format.row_bytes(cols)];
            let mut scales = vec![f16::ZERO; rows * cols / BLOCK];
            quantize_rows(format, &src, cols, &mut q, &mut scales);
            Owned {
                format,
                rows,
                cols,
                q,
                scales,
                terms: activation_terms(format, format),
            }
        }

        /// The same matrix read with `terms` activation terms.
        fn with_terms(mut self, terms: usize) -> Owned {
            self.terms = terms;
            self
        }

        fn view(&self) -> QMatrix<'_> {
            QMatrix {
                format: self.format,
                rows: self.rows,
                cols: self.cols,
                q: &self.q,
                scales: &self.scales,
                terms: self.terms,
            }
        }
    }

    /// Plain scalar reference of the documented arithmetic, from the layout's own
    /// accessor (not the kernels' addressing): per block, the exact integer dot, then
    /// `acc = fma(s, dw·dx, acc)`. Also returns an f64 sum for a sanity bound.
    fn reference(x: &[f32], m: usize, w: &QMatrix<'_>) -> (Vec<f32>, Vec<f64>) {
        let (n, k) = (w.rows, w.cols);
        let mut acts = QActivations::default();
        acts.quantize(x, m, k);
        let (mut y, mut y64) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let mut s64 = 0.0f64;
                for t in 0..w.terms {
                    let row = TERMS * i + t;
                    let mut acc = 0.0f32;
                    for b in 0..k / BLOCK {
                        let (wb, dw) = weight_block(w.format, n, k, w.q, w.scales, j, b);
                        let dx = acts.d[row * k / BLOCK + b];
                        let xb = &acts.q[row * k + b * BLOCK..][..BLOCK];
                        let s: i32 = wb.iter().zip(xb).map(|(&a, &b)| a as i32 * b as i32).sum();
                        acc = (s as f32).mul_add(dw.to_f32() * dx, acc);
                        s64 += dw.to_f32() as f64 * dx as f64 * s as f64;
                    }
                    y[i * n + j] = if t == 0 { acc } else { y[i * n + j] + acc };
                }
                y64[i * n + j] = s64;
            }
        }
        (y, y64)
    }

    const SIZES: [(usize, usize, usize); 8] = [
        (1, 1, 32),
        (1, 67, 1408),
        (2, 16, 64),
        (3, 33, 64),
        (6, 65, 96),
        (8, 40, 2048),
        (9, 40, 1408),
        (13, 100, 160),
    ];

    #[test]
    fn every_path_matches_the_scalar_reference_bit_for_bit() {
        let paths = available();
        eprintln!("paths: {paths:?}");
        for (format, terms) in CASES {
            for &(m, n, k) in &SIZES {
                let w = Owned::new(format, n, k, 7 + n as u64).with_terms(terms);
                let x = values(m * k, 8 + k as u64);
                let (want, want64) = reference(&x, m, &w.view());
                for (a, b) in want.iter().zip(&want64) {
                    assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f64).sqrt());
                }
                for &isa in &paths {
                    let mut y = vec![f32::NAN; m * n];
                    qmatmul_isa(isa, &x, m, w.view(), &mut y);
                    for (j, (a, b)) in y.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{isa:?} {format:?} {terms} terms m={m} n={n} k={k} at {j}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantization_is_the_same_on_every_path() {
        let (m, k) = (7, 1408);
        let mut x = values(m * k, 21);
        x[5] = f32::NAN;
        x[70 + 2 * k] = f32::INFINITY;
        x[3 * k + 33] = f32::NEG_INFINITY;
        x[40] = 0.5; // exact ties after scaling land on both sides
        x[64..96].iter_mut().for_each(|v| *v = 0.0);
        let mut a = QActivations::default();
        a.quantize(&x, m, k);
        let (nb, tk, tnb) = (k / BLOCK, TERMS * k, TERMS * k / BLOCK);
        let (mut q, mut d) = (vec![0i8; m * tk], vec![0.0f32; m * tnb]);
        let (mut c128, mut c8) = (vec![0i32; m * tnb], vec![0i32; m * tnb]);
        for i in 0..m {
            let r = i * tnb..(i + 1) * tnb;
            quantize_row_impl(
                &x[i * k..(i + 1) * k],
                &mut q[i * tk..(i + 1) * tk],
                &mut d[r.clone()],
                &mut c128[r.clone()],
                &mut c8[r],
            );
        }
        assert_eq!(a.q, q);
        assert_eq!(a.c128, c128);
        assert_eq!(a.c8, c8);
        assert!(a.d.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!((q[5], q[k + 5]), (0, 0));
        let s: i32 = q[..BLOCK].iter().map(|&v| v as i32).sum();
        assert_eq!(c8[0], 8 * s);
        let s: i32 = q[k..k + BLOCK].iter().map(|&v| v as i32).sum();
        assert_eq!(c128[nb], 128 * s);
        // The terms add up to the row within the second term's rounding (~amax/64516 a
        // block), where the first alone is off by up to amax/254.
        let (mut worst1, mut worst2) = (0.0f32, 0.0f32);
        for i in [0, 1, 4, 6] {
            for (b, xb) in x[i * k..(i + 1) * k].chunks_exact(BLOCK).enumerate() {
                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                if !amax.is_finite() || amax == 0.0 {
                    continue;
                }
                for (j, &v) in xb.iter().enumerate() {
                    let at = |t: usize| {
                        let e = i * tnb + t * nb + b;
                        q[i * tk + t * k + b * BLOCK + j] as f32 * d[e]
                    };
                    worst1 = worst1.max((v - at(0)).abs() / amax);
                    worst2 = worst2.max((v - at(0) - at(1)).abs() / amax);
                }
            }
        }
        assert!(worst1 > 1e-3 && worst1 <= 0.5 / 127.0 + 1e-6, "{worst1}");
        assert!(worst2 <= 0.5 / 127.0 / 254.0 + 1e-6, "{worst2}");
    }

    /// With both terms the product is that of the f32 activations with the quantized
    /// weights to ~1e-5; with one to ~4e-3.
    #[test]
    fn the_terms_carry_the_activations_almost_exactly() {
        for (format, terms) in CASES {
            let (m, n, k) = (3, 40, 1408);
            let w = Owned::new(format, n, k, 31).with_terms(terms);
            let x = values(m * k, 32);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, w.view(), &mut y);
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for i in 0..m {
                for j in 0..n {
                    let mut exact = 0.0f64;
                    for b in 0..k / BLOCK {
                        let (wb, dw) = weight_block(format, n, k, &w.q, &w.scales, j, b);
                        for (jj, &q) in wb.iter().enumerate() {
                            let xv = x[i * k + b * BLOCK + jj] as f64;
                            exact += xv * q as f64 * dw.to_f32() as f64;
                        }
                    }
                    err += (y[i * n + j] as f64 - exact).powi(2);
                    norm += exact * exact;
                }
            }
            let rel = (err / norm).sqrt();
            let bound = match terms {
                TERMS => 0.0..2e-5,
                _ => 1e-3..8e-3, // one term
            };
            assert!(
                bound.contains(&rel),
                "{format:?} {terms} terms: relative error {rel}"
            );
        }
    }

    #[test]
    fn rows_are_batch_invariant() {
        for (format, terms) in CASES {
            let (n, k) = (37, 1408);
            let w = Owned::new(format, n, k, 9).with_terms(terms);
            let x = values(200 * k, 10);
            for &isa in &available() {
                let mut all = vec![0.0f32; 200 * n];
                qmatmul_isa(isa, &x, 200, w.view(), &mut all);
                for (start, m) in [(3usize, 1usize), (3, 2), (0, 5), (7, 8), (3, 13), (101, 99)] {
                    let mut part = vec![0.0f32; m * n];
                    qmatmul_isa(isa, &x[start * k..], m, w.view(), &mut part);
                    for (a, b) in part.iter().zip(&all[start * n..(start + m) * n]) {
                        assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} {format:?} m={m}");
                    }
                }
            }
        }
    }

    #[test]
    fn qmatmul_rows_computes_a_strided_slice_of_the_product() {
        // m = 5 runs a tile at a time (more kernel rows than one register tile holds);
        // m = 1 and 3 run each range's full tiles in one kernel call, then the ragged one.
        for ((format, terms), m) in CASES.into_iter().flat_map(|c| [(c, 5), (c, 1), (c, 3)]) {
            let (n, k) = (45, 96);
            let w = Owned::new(format, n, k, 11).with_terms(terms);
            let x = values(m * k, 12);
            let mut full = vec![0.0f32; m * n];
            qmatmul(&x, m, w.view(), &mut full);
            let mut acts = QActivations::default();
            acts.quantize(&x, m, k);
            for rows in [0..16, 16..45, 32..45, 0..45, 16..32] {
                let stride = rows.len() + 3;
                let mut y = vec![f32::NAN; m * stride];
                qmatmul_rows(&acts, m, w.view(), rows.clone(), &mut y, stride);
                for i in 0..m {
                    for r in rows.clone() {
                        let got = y[i * stride + r - rows.start];
                        assert_eq!(got.to_bits(), full[i * n + r].to_bits(), "{rows:?}");
                    }
                    for pad in rows.len()..stride {
                        assert!(y[i * stride + pad].is_nan());
                    }
                }
            }
        }
    }
}

/// Quick min-of-N timings (robust to the noise of a shared machine):
/// `cargo test --release -p dsv2-cpu qtiming -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    use crate::test_values as values;
    use dsv2_core::quant::quantize_rows;

    fn matrix(format: QuantFormat, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f16>) {
        let src = values(n * k, seed);
        let mut q = vec![0u8; n * format.row_bytes(k)];
        let mut s = vec![f16::ZERO; n * k / BLOCK];
        quantize_rows(format, &src, k, &mut q, &mut s);
        (q, s)
    }

    use crate::min_time;

    #[test]
    #[ignore]
    fn qtiming() {
        let only = std::env::var("QT").unwrap_or_default();
        if std::env::var("QBW").is_ok() {
            let bw = crate::bandwidth::measure_read_bandwidth(crate::bandwidth::buffer_bytes());
            eprintln!("read bandwidth {:.1} GB/s", bw / 1e9);
        }
        let k = 2048;
        let x = values(512 * k, 2);
        if only.is_empty() || only == "overhead" {
            // Fixed cost of one call: a 16 × 2048 q8 matrix (34 KB, L2-resident).
            let (q, s) = matrix(QuantFormat::Q8, 16, k, 9);
            let w = QMatrix {
                format: QuantFormat::Q8,
                rows: 16,
                cols: k,
                q: &q,
                scales: &s,
                terms: TERMS,
            };
            let mut y = vec![0.0f32; 16];
            let t = min_time(200, || qmatmul(&x, 1, w, &mut y));
            let mut acts = QActivations::default();
            acts.quantize(&x, 1, k);
            let t_rows = min_time(200, || qmatmul_rows(&acts, 1, w, 0..16, &mut y, 16));
            eprintln!(
                "overhead: qmatmul 16x2048 m=1 {:.1} us, qmatmul_rows {:.1} us",
                t * 1e6,
                t_rows * 1e6
            );
            let t_q = min_time(20, || acts.quantize(&x, 48, k));
            eprintln!("quantize 48x2048 activations: {:.1} us", t_q * 1e6);
        }
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for n in [10944usize, 102400] {
                if !only.is_empty() && !format!("{}{n}", format.name()).contains(&only) {
                    continue;
                }
                let (q, s) = matrix(format, n, k, 3);
                let w = QMatrix {
                    format,
                    rows: n,
                    cols: k,
                    q: &q,
                    scales: &s,
                    terms: activation_terms(format, format),
                };
                let bytes = (q.len() + 2 * s.len()) as f64;
                let mut y = vec![0.0f32; 8 * n];
                for m in [1usize, 2, 4, 8] {
                    if std::env::var("QM").is_ok_and(|v| v != m.to_string()) {
                        continue;
                    }
                    let t = min_time(30, || qmatmul(&x, m, w, &mut y));
                    eprintln!(
                        "decode {} n={n} m={m}: {:.1} GB/s",
                        format.name(),
                        bytes / t / 1e9
                    );
                }
            }
            if only.is_empty() || format!("{}exp", format.name()).contains(&only) {
                let experts: Vec<_> = (0..64).map(|e| matrix(format, 1408, k, 50 + e)).collect();
                let mut y = vec![0.0f32; 1408];
                let mut next = 0;
                let t = min_time(30, || {
                    for _ in 0..8 {
                        let (q, s) = &experts[next];
                        let w = QMatrix {
                            format,
                            rows: 1408,
                            cols: k,
                            q,
                            scales: s,
                            terms: activation_terms(format, format),
                        };
                        qmatmul(&x, 1, w, &mut y);
                        next = (next + 1) % 64;
                    }
                });
                let bytes = 8.0 * (experts[0].0.len() + 2 * experts[0].1.len()) as f64;
                eprintln!(
                    "decode {} 8 experts m=1: {:.1} GB/s",
                    format.name(),
                    bytes / t / 1e9
                );
            }
            for (m, n, kk) in [
                (48usize, 1408usize, 2048usize),
                (48, 2048, 1408),
                (512, 2048, 2048),
                (128, 10944, 2048),
            ] {
                if !only.is_empty() && !format!("{}p{m}", format.name()).contains(&only) {
                    continue;
                }
                let (q, s) = matrix(format, n, kk, 4);
                let w = QMatrix {
                    format,
                    rows: n,
                    cols: kk,
                    q: &q,
                    scales: &s,
                    terms: activation_terms(format, format),
                };
                let mut y = vec![0.0f32; m * n];
                let t = min_time(10, || qmatmul(&x, m, w, &mut y));
                let macs = (m * n * kk) as f64;
                eprintln!(
                    "prefill {} {m}x{n}x{kk}: {:.0} GMAC/s",
                    format.name(),
                    macs / t / 1e9
                );
            }
        }
    }
}
