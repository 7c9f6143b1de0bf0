//! Block-quantized weights: dsv2's `q8` and `q4` formats (layout version 2).
//!
//! A quantized matrix `[rows, cols]` (`cols` a multiple of [`BLOCK`]) is stored as two
//! planes, so both can be memory-mapped and read with aligned vector loads:
//!
//! | format | `<name>.qweight` | `<name>.scales` | value of a weight |
//! |---|---|---|---|
//! | `q8` | I8 `[rows, cols]` in −127..=127 | F16 `[rows, cols/32]` | `scale · q` |
//! | `q4` | U8 `[rows, cols/2]`: 4-bit codes 0..=15 | F16 `[rows, cols/32]` | `scale · (code − 8)` |
//!
//! That is 8.5 and 4.5 bits per weight. A block's scale comes from a small least-squares
//! search (about `amax/127` for q8) and may be negative (for q4 the extra level, code
//! 0 = −8, then lands on the block's largest positive value). The plane shapes are
//! logical sizes; the bytes are interleaved for the int8 dot-product instructions
//! (`vpdpbusd`: 16 output rows × 4 consecutive `k` per instruction):
//!
//! * Rows are grouped in tiles of [`TILE`] = 16 (the last tile of a matrix whose `rows`
//!   is not a multiple of 16 has `R = rows % 16` rows; every other tile has `R = 16`).
//!   Tile `t` starts at byte `16·t·row_bytes` of `qweight` and at element `16·t·cols/32`
//!   of `scales`; within a tile, block `b` (`k` in `32b..32b+32`) takes `R·32` bytes (q8)
//!   or `R·16` bytes (q4) at offset `b·R·32` / `b·R·16`, and its `R` scales are
//!   contiguous at `b·R` (row `r` of the tile at `b·R + r`).
//! * q8, within a block: the byte of tile row `r` and `k = 32b + 4g + j` (`g` in 0..8,
//!   `j` in 0..4) is at `g·4R + 4r + j`.
//! * q4, within a block: byte `c·4R + 4r + j` (`c` in 0..4, `j` in 0..4) holds the code of
//!   tile row `r` at `k = 32b + 8c + j` in its low nibble and at `k = 32b + 8c + 4 + j` in
//!   its high nibble.
//!
//! So a full tile's block is 8 (q8) or 4 (q4) 64-byte vectors, each holding 4 weights of
//! each of the 16 rows. `<name>` is the checkpoint's tensor name
//! (`model.layers.3.mlp.experts.7.up_proj.weight`); a file written by `dsv2 quantize`
//! records `{"dsv2_quantization": "q8"|"q4", "dsv2_quant_version": "2"}` in its
//! safetensors metadata (version 1, the row-major layout of earlier dsv2 versions, is
//! refused at load: re-quantize). Embeddings, norms, the MoE router and `kv_b_proj` (read
//! per head by the attention) are never quantized; under `q4` only the routed experts
//! take 4 bits and every other matrix is q8 (see [`quantized_format`]).

use half::f16;
use rayon::prelude::*;

use crate::checkpoint::{Bytes, DType, TensorView};

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// Weight rows per interleaved tile of the stored layout.
pub const TILE: usize = 16;

/// The layout version written to (and required in) a quantized file's metadata.
pub const LAYOUT_VERSION: &str = "2";

/// Safetensors metadata key holding [`LAYOUT_VERSION`].
pub const VERSION_KEY: &str = "dsv2_quant_version";

/// Rows of tile `t` of a `rows`-row matrix: 16, or fewer for the last tile.
pub fn tile_rows(rows: usize, t: usize) -> usize {
    (rows - t * TILE).min(TILE)
}

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 8-bit symmetric, one f16 scale per 32 weights (8.5 bits per weight).
    Q8,
    /// 4-bit symmetric, one f16 scale per 32 weights (4.5 bits per weight).
    Q4,
}

impl QuantFormat {
    /// The name used on the command line and in file metadata.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "q8",
            QuantFormat::Q4 => "q4",
        }
    }

    /// Bytes of `<name>.qweight` per row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            QuantFormat::Q8 => cols,
            QuantFormat::Q4 => cols / 2,
        }
    }

    /// Bytes of a `rows × cols` matrix in this format: both planes, the quantized
    /// values and an f16 scale per 32 weights.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        rows * (self.row_bytes(cols) + cols / BLOCK * std::mem::size_of::<f16>())
    }

    /// Bytes per 32-weight block of one row: 32 (q8) or 16 (q4).
    pub fn block_bytes(self) -> usize {
        self.row_bytes(BLOCK)
    }

    /// Storage bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            QuantFormat::Q8 => 8.5,
            QuantFormat::Q4 => 4.5,
        }
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "q8" => Ok(QuantFormat::Q8),
            "q4" => Ok(QuantFormat::Q4),
            other => Err(format!("unknown quantization `{other}` (q8 or q4)")),
        }
    }
}

/// Suffix of the quantized values plane.
pub const QWEIGHT_SUFFIX: &str = ".qweight";
/// Suffix of the scales plane.
pub const SCALES_SUFFIX: &str = ".scales";
/// Safetensors metadata key naming the format of a quantized file.
pub const METADATA_KEY: &str = "dsv2_quantization";

/// A quantized matrix: the two planes of [`crate::quant`].
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    /// The dense tensor's name (without plane suffixes).
    pub name: String,
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// I8 `[rows, cols]` (q8) or U8 `[rows, cols/2]` (q4).
    pub qweight: TensorView,
    /// F16 `[rows, cols/32]`.
    pub scales: TensorView,
}

impl QuantizedTensor {
    /// A quantized tensor over its two planes (`q`: `rows · row_bytes(cols)` bytes in the
    /// interleaved layout, `scales`: `rows · cols/32` f16 values), as `quantize_rows`
    /// writes them.
    ///
    /// # Panics
    /// If a plane's size does not match.
    pub fn from_plane_bytes(
        name: &str,
        format: QuantFormat,
        rows: usize,
        cols: usize,
        q: Bytes,
        scales: Bytes,
    ) -> QuantizedTensor {
        assert_eq!(
            q.as_slice().len(),
            rows * format.row_bytes(cols),
            "{name}: qweight size"
        );
        assert_eq!(
            scales.as_slice().len(),
            rows * cols / BLOCK * 2,
            "{name}: scales size"
        );
        let (qdtype, qshape) = match format {
            QuantFormat::Q8 => (DType::I8, vec![rows, cols]),
            QuantFormat::Q4 => (DType::U8, vec![rows, cols / 2]),
        };
        let view = |name: String, dtype, shape, data| TensorView {
            name,
            dtype,
            shape,
            data,
            file: "<in memory>".into(),
        };
        QuantizedTensor {
            name: name.to_string(),
            format,
            rows,
            cols,
            qweight: view(format!("{name}{QWEIGHT_SUFFIX}"), qdtype, qshape, q),
            scales: view(
                format!("{name}{SCALES_SUFFIX}"),
                DType::F16,
                vec![rows, cols / BLOCK],
                scales,
            ),
        }
    }

    /// The same tensor with its planes copied into huge pages ([`crate::hugemem`]) when
    /// they are windows into a file mapping (a pre-quantized checkpoint): decode streams
    /// them every step, and file mappings use 4 KiB pages. The mapped pages are released
    /// after the copy, so the process does not hold both.
    pub fn into_huge_pages(self) -> QuantizedTensor {
        QuantizedTensor {
            qweight: self.qweight.into_huge_pages(),
            scales: self.scales.into_huge_pages(),
            ..self
        }
    }

    /// The quantized values as bytes (i8 for q8, packed nibbles for q4).
    pub fn qweight_bytes(&self) -> &[u8] {
        self.qweight.data.as_slice()
    }

    /// The per-block scales.
    pub fn scales(&self) -> &[f16] {
        bytemuck::cast_slice(self.scales.data.as_slice())
    }

    /// Dequantizes row `r` (for tests and reference code).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize_row(
            self.format,
            self.rows,
            self.cols,
            self.qweight_bytes(),
            self.scales(),
            r,
            out,
        );
    }
}

/// Byte offset of tile `t` in a `qweight` plane, the rows of the tile, and the offset
/// of its scales.
fn tile_at(format: QuantFormat, rows: usize, cols: usize, t: usize) -> (usize, usize, usize) {
    (
        t * TILE * format.row_bytes(cols),
        tile_rows(rows, t),
        t * TILE * (cols / BLOCK),
    )
}

/// The integer weights (q8: −127..=127, q4: code − 8) of row `r`, block `b` of a
/// quantized matrix stored in the layout of [`crate::quant`], and the block's scale.
pub fn weight_block(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    q: &[u8],
    scales: &[f16],
    r: usize,
    b: usize,
) -> ([i8; BLOCK], f16) {
    let (t, rr) = (r / TILE, r % TILE);
    let (qt, rt, st) = tile_at(format, rows, cols, t);
    let qb = &q[qt + b * rt * format.block_bytes()..][..rt * format.block_bytes()];
    let mut out = [0i8; BLOCK];
    match format {
        QuantFormat::Q8 => {
            for (k, o) in out.iter_mut().enumerate() {
                *o = qb[(k / 4) * 4 * rt + 4 * rr + k % 4] as i8;
            }
        }
        QuantFormat::Q4 => {
            for (k, o) in out.iter_mut().enumerate() {
                let byte = qb[(k / 8) * 4 * rt + 4 * rr + k % 4];
                let code = if (k / 4) % 2 == 0 {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                *o = code as i8 - 8;
            }
        }
    }
    (out, scales[st + b * rt + rr])
}

/// Dequantizes row `r` of a quantized matrix stored in the layout of [`crate::quant`].
pub fn dequantize_row(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    q: &[u8],
    scales: &[f16],
    r: usize,
    out: &mut [f32],
) {
    for (b, o) in out[..cols].chunks_exact_mut(BLOCK).enumerate() {
        let (w, d) = weight_block(format, rows, cols, q, scales, r, b);
        let d = d.to_f32();
        for (o, w) in o.iter_mut().zip(w) {
            *o = d * w as f32;
        }
    }
}

/// Whether a tensor is quantized under `format`, and to which format.
///
/// Under `q8`, `lm_head` stays in its checkpoint dtype (as vLLM's quantized formats leave
/// it): its rounding reaches the logits unamplified and was a third of q8's logit error
/// on the fixtures; it costs 0.2 GB more per decode step on V2-Lite (~7%).
///
/// Under `q4` only the routed experts (`mlp.experts.N.*`, ~92% of V2-Lite's parameters and
/// ~55% of a decode step's reads) take 4 bits; attention, the shared experts, the dense
/// MLP and `lm_head` stay at q8, as llama.cpp's `Q4_K_M` mixes formats by tensor. Every
/// token passes through those with weight 1, while a routed expert's output is scaled by
/// its routing weight, so 4-bit error there costs far more: on the golden fixtures, q4
/// everywhere gives 0.09..0.18 relative logit error, routed-only q4 0.021..0.10
/// (`tests/fixtures`, see `crates/dsv2-engine/tests/fixtures.rs`).
pub fn quantized_format(name: &str, shape: &[usize], format: QuantFormat) -> Option<QuantFormat> {
    let [_, cols] = shape else { return None };
    let never = name.contains("embed_tokens")
        || name.ends_with("mlp.gate.weight")
        || name.contains("kv_b_proj")
        || name.contains("layernorm")
        || name.ends_with("norm.weight");
    if never || cols % BLOCK != 0 {
        return None;
    }
    match format {
        QuantFormat::Q8 if name == "lm_head.weight" => None,
        QuantFormat::Q4 if name.contains(".mlp.experts.") => Some(QuantFormat::Q4),
        _ => Some(QuantFormat::Q8),
    }
}

/// Whether a tensor that stays dense in a quantized model is a matrix that decode reads
/// whole every step (`lm_head` under q8, `kv_b_proj`, the routers; not the embeddings,
/// of which a step reads a few rows, nor the norm vectors): such matrices join the
/// quantized planes in huge pages ([`crate::hugemem`]).
pub fn dense_streamed_matrix(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.contains("embed_tokens")
}

/// Quantizes one block: its scale and integer weights (q8: −127..=127, q4: −8..=7).
///
/// Both formats take the scale search of [`search_block`]: it lowers the weights' RMS
/// error below the absmax scale's by ~8% (q8) and ~7-10% (q4) for ~2.2× the quantization
/// time of the compiler-vectorized code (`tools/fixtures/quant_error.py`; the ignored
/// `quantize_speed` test), which the explicit AVX-512 path more than wins back.
#[inline(always)]
fn quantize_block(format: QuantFormat, block: &[f32; BLOCK]) -> (f16, [i8; BLOCK]) {
    let (lo, hi, base, divisors) = search_params(format);
    search_block(block, lo, hi, base, divisors)
}

/// [`search_block`]'s arguments for a format: the code range `lo..=hi`, the absmax
/// divisor `base` and the candidate divisors.
#[inline(always)]
fn search_params(format: QuantFormat) -> (f32, f32, f32, [f32; 8]) {
    match format {
        QuantFormat::Q8 => (-127.0, 127.0, -127.0, Q8_DIVISORS),
        QuantFormat::Q4 => (-8.0, 7.0, -8.0, Q4_DIVISORS),
    }
}

/// Candidate divisors of the q8 scale search: `d = m / D` maps the block's value of
/// largest magnitude `m` to code −125.25 .. −128.75 in steps of 0.5 (codes clamp to
/// ±127).
const Q8_DIVISORS: [f32; 8] = [
    -125.25, -125.75, -126.25, -126.75, -127.25, -127.75, -128.25, -128.75,
];

/// Candidate divisors of the q4 scale search: `d = m / D` maps the block's value of
/// largest magnitude `m` to code −7 .. −8.75 in steps of 0.25 (codes clamp to −8..=7, so
/// the extra negative level lands on `m`'s side).
const Q4_DIVISORS: [f32; 8] = [-7.0, -7.25, -7.5, -7.75, -8.0, -8.25, -8.5, -8.75];

/// The scale and codes (`lo..=hi`: q8 ±127, q4 −8..=7) of one block that the scale
/// search picks:
///
/// 1. the absmax scale `m/base` (`m` the signed value of largest magnitude, `+amax` if
///    both signs have it; `base` −127 or −8, so for q4 `m` takes the extra level −8
///    exactly: the scale is negative when `m` is positive), rounded to f16;
/// 2. for each candidate `d = m/D` (`D` in `divisors`), the codes `round(v/d)` (here
///    and below: to nearest, ties to even) and the least-squares scale for those codes,
///    `Σ v·q / Σ q²`, whose squared error is `Σ v² − (Σ v·q)²/Σ q²`; the candidate of
///    least error wins (llama.cpp's `make_qx_quants` does the same), its scale rounded
///    to f16;
/// 3. of the two f16 scales, with codes re-rounded for each, the one with the smaller
///    squared error over the block (the absmax one on a tie), so the search never does
///    worse than absmax.
///
/// The candidates sit in SIMD lanes and every sum runs in a fixed order, so the compiler
/// vectorizes it and every instruction set gives the same bytes.
#[inline(always)]
fn search_block(
    block: &[f32; BLOCK],
    lo: f32,
    hi: f32,
    base: f32,
    divisors: [f32; 8],
) -> (f16, [i8; BLOCK]) {
    let amax = abs_max(block);
    if amax == 0.0 {
        return (f16::ZERO, [0; BLOCK]);
    }
    let m = if signed_max(block) >= amax {
        amax
    } else {
        -amax
    };
    let base = f16::from_f32(m / base);
    let mut inv = [0.0f32; 8];
    for (i, d) in inv.iter_mut().zip(divisors) {
        *i = d / m;
    }
    // Two elements at a time in 16 lanes (lane `8h + c`: element `2i + h`, candidate `c`),
    // one AVX-512 vector; the two halves are partial sums, which also halves the
    // dependency chains.
    let mut inv16 = [0.0f32; 16];
    inv16[..8].copy_from_slice(&inv);
    inv16[8..].copy_from_slice(&inv);
    let (mut sxq, mut sqq) = ([0.0f32; 16], [0.0f32; 16]);
    for pair in block.chunks_exact(2) {
        let v: [f32; 16] = std::array::from_fn(|l| pair[l / 8]);
        for l in 0..16 {
            let q = round_half_even(v[l] * inv16[l]).clamp(lo, hi);
            sxq[l] += v[l] * q;
            sqq[l] += q * q;
        }
    }
    let mut score = [0.0f32; 8];
    let mut refit = [0.0f32; 8];
    for c in 0..8 {
        let (xq, qq) = (sxq[c] + sxq[8 + c], sqq[c] + sqq[8 + c]);
        // qq ≥ 49: m itself takes a code of magnitude ≥ 7 (≥ 125 for q8).
        refit[c] = xq / qq;
        score[c] = xq * refit[c];
    }
    let fit = best_fit(&refit, &score);
    let (q0, e0) = round_block(block, base, lo, hi);
    let (q1, e1) = round_block(block, fit, lo, hi);
    if e1 < e0 {
        (fit, q1)
    } else {
        (base, q0)
    }
}

/// The least-squares scale of the candidate whose score is largest (the first of equal
/// ones), rounded to f16: step 2 of [`search_block`], shared by every instruction set.
#[inline(always)]
fn best_fit(refit: &[f32; 8], score: &[f32; 8]) -> f16 {
    let mut best = 0;
    for c in 1..8 {
        if score[c] > score[best] {
            best = c;
        }
    }
    f16::from_f32(refit[best])
}

/// The codes `round(v/d)` clamped to `lo..=hi` (0 where `d` is 0) and the block's
/// squared error `Σ (v − d·q)²`, summed in 8 lanes and then in a fixed order.
#[inline(always)]
fn round_block(block: &[f32; BLOCK], d: f16, lo: f32, hi: f32) -> ([i8; BLOCK], f32) {
    let d = d.to_f32();
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut lanes = [0.0f32; 8];
    for (qs, vs) in q.chunks_exact_mut(8).zip(block.chunks_exact(8)) {
        for j in 0..8 {
            let r = round_half_even(vs[j] * inv).clamp(lo, hi);
            let e = vs[j] - d * r;
            lanes[j] += e * e;
            qs[j] = r as i8;
        }
    }
    let e = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    (q, e)
}

/// The scale search in explicit AVX-512 ([`quantize_block`]'s operations, in the same
/// order, so the same bytes): the compiler's vectorization of [`search_block`] leaves the
/// clamps and the float-to-int8 conversions scalar, ~17 cycles a value.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{QuantFormat, BLOCK};

    /// [`super::quantize_block`] of each block of `values` (1 or
    /// [`super::BLOCKS_AT_ONCE`] blocks) into `out`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/DQ and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c")]
    pub(super) unsafe fn quantize_blocks(
        format: QuantFormat,
        values: &[f32],
        out: &mut [(f16, [i8; BLOCK])],
    ) {
        let (lo, hi, base, divisors) = super::search_params(format);
        match out.len() {
            1 => out.copy_from_slice(&search_blocks::<1>(values, lo, hi, base, divisors)),
            2 => out.copy_from_slice(&search_blocks::<2>(values, lo, hi, base, divisors)),
            n => unreachable!("{n} blocks at once"),
        }
    }

    /// `round_half_even(y).clamp(lo, hi)` of [`super::search_block`] (`y` finite).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round_clamp(y: __m512, lo: __m512, hi: __m512) -> __m512 {
        let magic = _mm512_set1_ps(12_582_912.0);
        let r = _mm512_sub_ps(_mm512_add_ps(y, magic), magic);
        // `clamp` for values that are not NaN: `r` is never −0 (`(y + M) − M` of an
        // exact `M` gives +0), so `max`/`min` agree with its comparisons.
        _mm512_min_ps(_mm512_max_ps(r, lo), hi)
    }

    /// [`super::search_block`] of the `N` blocks of `values`, each step of the `N`
    /// together (independent work for the core while one block's chain waits).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c")]
    fn search_blocks<const N: usize>(
        values: &[f32],
        lo: f32,
        hi: f32,
        base: f32,
        divisors: [f32; 8],
    ) -> [(f16, [i8; BLOCK]); N] {
        assert_eq!(values.len(), N * BLOCK);
        // Plain loops over the blocks, not closures: a closure does not take this
        // function's target features, so its intrinsics would not inline.
        let mut v = [[_mm512_setzero_ps(); 2]; N];
        for (n, vn) in v.iter_mut().enumerate() {
            // SAFETY: 32 values per block (checked).
            unsafe {
                let p = values.as_ptr().add(n * BLOCK);
                *vn = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            }
        }
        // abs_max: the largest magnitude bits; signed_max: the largest of the keys that
        // order floats as signed integers; the absmax scale; the candidates' 1/d.
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        // SAFETY: 8 divisors.
        let divisors = unsafe { _mm256_loadu_ps(divisors.as_ptr()) };
        let (mut amax, mut base_scale) = ([0.0f32; N], [f16::ZERO; N]);
        let mut inv = [_mm512_setzero_ps(); N];
        for n in 0..N {
            let (b0, b1) = (_mm512_castps_si512(v[n][0]), _mm512_castps_si512(v[n][1]));
            amax[n] = f32::from_bits(_mm512_reduce_max_epu32(_mm512_max_epu32(
                _mm512_and_si512(b0, magnitude),
                _mm512_and_si512(b1, magnitude),
            )));
            let k0 = _mm512_xor_si512(b0, _mm512_srli_epi32(_mm512_srai_epi32(b0, 31), 1));
            let k1 = _mm512_xor_si512(b1, _mm512_srli_epi32(_mm512_srai_epi32(b1, 31), 1));
            let k = _mm512_reduce_max_epi32(_mm512_max_epi32(k0, k1));
            let signed_max = f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32);
            let m = if signed_max >= amax[n] {
                amax[n]
            } else {
                -amax[n]
            };
            base_scale[n] = f16::from_f32(m / base);
            // (A block of zeros divides by 0 here; its results are replaced below.)
            let inv8 = _mm256_div_ps(divisors, _mm256_set1_ps(m));
            inv[n] = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(inv8), inv8);
        }
        let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        // Lane 8h + c: element 2i + h, candidate c (as the generic code).
        let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut sxq = [_mm512_setzero_ps(); N];
        let mut sqq = [_mm512_setzero_ps(); N];
        for i in 0..BLOCK / 2 {
            let idx = _mm512_add_epi32(pair, _mm512_set1_epi32(2 * (i % 8) as i32));
            for n in 0..N {
                let x = _mm512_permutexvar_ps(idx, v[n][i / 8]);
                let q = round_clamp(_mm512_mul_ps(x, inv[n]), vlo, vhi);
                sxq[n] = _mm512_add_ps(sxq[n], _mm512_mul_ps(x, q));
                sqq[n] = _mm512_add_ps(sqq[n], _mm512_mul_ps(q, q));
            }
        }
        let mut fit = [f16::ZERO; N];
        for n in 0..N {
            // Lane c + lane 8 + c: the generic code's `sxq[c] + sxq[8 + c]`.
            let (xq, qq) = (halves(sxq[n]), halves(sqq[n]));
            fit[n] = super::avx2::fit_from_sums(xq, qq);
        }
        let mut rounded = [[([_mm512_setzero_si512(); 2], 0.0f32); 2]; N];
        for n in 0..N {
            rounded[n][0] = round_block(v[n], base_scale[n], vlo, vhi);
        }
        for n in 0..N {
            rounded[n][1] = round_block(v[n], fit[n], vlo, vhi);
        }
        let mut out = [(f16::ZERO, [0i8; BLOCK]); N];
        for n in 0..N {
            if amax[n] == 0.0 {
                continue;
            }
            let [(q0, e0), (q1, e1)] = rounded[n];
            let (d, q) = if e1 < e0 {
                (fit[n], q1)
            } else {
                (base_scale[n], q0)
            };
            out[n].0 = d;
            // SAFETY: 32 bytes.
            unsafe {
                let p = out[n].1.as_mut_ptr() as *mut __m128i;
                _mm_storeu_si128(p, _mm512_cvtepi32_epi8(q[0]));
                _mm_storeu_si128(p.add(1), _mm512_cvtepi32_epi8(q[1]));
            }
        }
        out
    }

    /// Lane `j` of the low half plus lane `j` of the high half (8 sums).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn halves(v: __m512) -> __m256 {
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v))
    }

    /// [`super::round_block`]: the codes as 32-bit integers, and the squared error.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,f16c")]
    fn round_block(v: [__m512; 2], d: f16, lo: __m512, hi: __m512) -> ([__m512i; 2], f32) {
        let [v0, v1] = v;
        let d = d.to_f32();
        let inv = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let dv = _mm512_set1_ps(d);
        let r0 = round_clamp(_mm512_mul_ps(v0, inv), lo, hi);
        let r1 = round_clamp(_mm512_mul_ps(v1, inv), lo, hi);
        let e0 = _mm512_sub_ps(v0, _mm512_mul_ps(dv, r0));
        let e1 = _mm512_sub_ps(v1, _mm512_mul_ps(dv, r1));
        let (s0, s1) = (_mm512_mul_ps(e0, e0), _mm512_mul_ps(e1, e1));
        // Lane j sums elements j, 8 + j, 16 + j, 24 + j in order (from 0: 0 + x = x).
        let mut lanes8 = halves(s0);
        lanes8 = _mm256_add_ps(lanes8, _mm512_castps512_ps256(s1));
        lanes8 = _mm256_add_ps(lanes8, _mm512_extractf32x8_ps::<1>(s1));
        let mut l = [0.0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes8) };
        let e = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        ([_mm512_cvtps_epi32(r0), _mm512_cvtps_epi32(r1)], e)
    }
}

/// The scale search in explicit AVX2 (CPUs without AVX-512: [`quantize_block`]'s
/// operations in the same order, so the same bytes). The generic code's lane layout maps
/// onto two 8-lane registers: lane `c` of register `h` is element `2i + h`, candidate `c`.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{QuantFormat, BLOCK};

    /// [`super::quantize_block`] of each block of `values` (1 or
    /// [`super::BLOCKS_AT_ONCE`] blocks) into `out`.
    ///
    /// # Safety
    /// AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_blocks(
        format: QuantFormat,
        values: &[f32],
        out: &mut [(f16, [i8; BLOCK])],
    ) {
        let (lo, hi, base, divisors) = super::search_params(format);
        match out.len() {
            1 => out.copy_from_slice(&search_blocks::<1>(values, lo, hi, base, divisors)),
            2 => out.copy_from_slice(&search_blocks::<2>(values, lo, hi, base, divisors)),
            n => unreachable!("{n} blocks at once"),
        }
    }

    /// `round_half_even(y).clamp(lo, hi)` of [`super::search_block`] (`y` finite).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn round_clamp(y: __m256, lo: __m256, hi: __m256) -> __m256 {
        let magic = _mm256_set1_ps(12_582_912.0);
        let r = _mm256_sub_ps(_mm256_add_ps(y, magic), magic);
        // As the AVX-512 path: `r` is never −0, so `max`/`min` agree with `clamp`.
        _mm256_min_ps(_mm256_max_ps(r, lo), hi)
    }

    /// [`super::best_fit`] of the candidates' sums `Σ v·q` (`xq`) and `Σ q²` (`qq`):
    /// `refit = xq / qq`, `score = xq · refit`. The AVX-512 search shares it.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn fit_from_sums(xq: __m256, qq: __m256) -> f16 {
        let refit_v = _mm256_div_ps(xq, qq);
        let (mut refit, mut score) = ([0.0f32; 8], [0.0f32; 8]);
        // SAFETY: 8 floats each.
        unsafe {
            _mm256_storeu_ps(refit.as_mut_ptr(), refit_v);
            _mm256_storeu_ps(score.as_mut_ptr(), _mm256_mul_ps(xq, refit_v));
        }
        super::best_fit(&refit, &score)
    }

    /// The 8 lanes of an integer register, stored.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes_i32(v: __m256i) -> [i32; 8] {
        let mut l = [0i32; 8];
        // SAFETY: 8 integers.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, v) };
        l
    }

    /// [`super::search_block`] of the `N` blocks of `values`, each step of the `N`
    /// together.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn search_blocks<const N: usize>(
        values: &[f32],
        lo: f32,
        hi: f32,
        base: f32,
        divisors: [f32; 8],
    ) -> [(f16, [i8; BLOCK]); N] {
        assert_eq!(values.len(), N * BLOCK);
        let mut v = [[_mm256_setzero_ps(); 4]; N];
        for (n, vn) in v.iter_mut().enumerate() {
            for (j, vj) in vn.iter_mut().enumerate() {
                // SAFETY: 32 values per block (checked).
                *vj = unsafe { _mm256_loadu_ps(values.as_ptr().add(n * BLOCK + 8 * j)) };
            }
        }
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        // SAFETY: 8 divisors.
        let divisors = unsafe { _mm256_loadu_ps(divisors.as_ptr()) };
        let (mut amax, mut base_scale) = ([0.0f32; N], [f16::ZERO; N]);
        let mut inv = [_mm256_setzero_ps(); N];
        for n in 0..N {
            // abs_max over the magnitude bits; signed_max over keys ordered like the
            // floats (see the generic code).
            let (mut mag, mut key) = (_mm256_setzero_si256(), _mm256_set1_epi32(i32::MIN));
            for vj in v[n] {
                let b = _mm256_castps_si256(vj);
                mag = _mm256_max_epu32(mag, _mm256_and_si256(b, magnitude));
                let k = _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1));
                key = _mm256_max_epi32(key, k);
            }
            let m_bits = lanes_i32(mag).iter().map(|&b| b as u32).max().unwrap_or(0);
            amax[n] = f32::from_bits(m_bits);
            let k = lanes_i32(key).into_iter().max().unwrap_or(i32::MIN);
            let signed_max = f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32);
            let m = if signed_max >= amax[n] {
                amax[n]
            } else {
                -amax[n]
            };
            base_scale[n] = f16::from_f32(m / base);
            // (A block of zeros divides by 0 here; its results are replaced below.)
            inv[n] = _mm256_div_ps(divisors, _mm256_set1_ps(m));
        }
        let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mut sxq = [[_mm256_setzero_ps(); 2]; N];
        let mut sqq = [[_mm256_setzero_ps(); 2]; N];
        for i in 0..BLOCK / 2 {
            for n in 0..N {
                for h in 0..2 {
                    let x = _mm256_set1_ps(values[n * BLOCK + 2 * i + h]);
                    let q = round_clamp(_mm256_mul_ps(x, inv[n]), vlo, vhi);
                    sxq[n][h] = _mm256_add_ps(sxq[n][h], _mm256_mul_ps(x, q));
                    sqq[n][h] = _mm256_add_ps(sqq[n][h], _mm256_mul_ps(q, q));
                }
            }
        }
        let mut fit = [f16::ZERO; N];
        for n in 0..N {
            // The generic code's `sxq[c] + sxq[8 + c]`.
            let xq = _mm256_add_ps(sxq[n][0], sxq[n][1]);
            let qq = _mm256_add_ps(sqq[n][0], sqq[n][1]);
            fit[n] = fit_from_sums(xq, qq);
        }
        let mut out = [(f16::ZERO, [0i8; BLOCK]); N];
        for n in 0..N {
            if amax[n] == 0.0 {
                continue;
            }
            let (q0, e0) = round_block(v[n], base_scale[n], vlo, vhi);
            let (q1, e1) = round_block(v[n], fit[n], vlo, vhi);
            let (d, q) = if e1 < e0 {
                (fit[n], q1)
            } else {
                (base_scale[n], q0)
            };
            out[n] = (d, q);
        }
        out
    }

    /// [`super::round_block`]: the codes and the squared error.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn round_block(v: [__m256; 4], d: f16, lo: __m256, hi: __m256) -> ([i8; BLOCK], f32) {
        let d = d.to_f32();
        let inv = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let dv = _mm256_set1_ps(d);
        let mut lanes8 = _mm256_setzero_ps();
        let mut codes = [_mm256_setzero_si256(); 4];
        for (j, vj) in v.into_iter().enumerate() {
            let r = round_clamp(_mm256_mul_ps(vj, inv), lo, hi);
            let e = _mm256_sub_ps(vj, _mm256_mul_ps(dv, r));
            // Lane j sums elements j, 8 + j, 16 + j, 24 + j in order (from 0).
            lanes8 = _mm256_add_ps(lanes8, _mm256_mul_ps(e, e));
            codes[j] = _mm256_cvtps_epi32(r);
        }
        let mut l = [0.0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes8) };
        let e = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        // Four registers of 8 codes (within ±127) to 32 bytes in order: the packs
        // interleave 128-bit halves, the dword permutation puts them back.
        let p01 = _mm256_packs_epi32(codes[0], codes[1]);
        let p23 = _mm256_packs_epi32(codes[2], codes[3]);
        let bytes = _mm256_packs_epi16(p01, p23);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut q = [0i8; BLOCK];
        // SAFETY: 32 bytes.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered) };
        (q, e)
    }
}

/// `y` rounded to the nearest integer, ties to even, for `|y| < 2²²` (larger values stay
/// beyond every clamp bound), in plain f32 arithmetic: vectorizes on every instruction
/// set, without libm.
#[inline(always)]
fn round_half_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    (y + MAGIC) - MAGIC
}

/// The largest value of a block (signed), as an integer maximum over keys ordered like
/// the floats (vectorizes where a float `max` fold cannot).
#[inline(always)]
fn signed_max(block: &[f32; BLOCK]) -> f32 {
    // The key flips the magnitude bits of negative values: an involution that orders
    // finite floats as signed integers.
    let key = |b: i32| b ^ (((b >> 31) as u32) >> 1) as i32;
    let mut k = i32::MIN;
    for v in block {
        k = k.max(key(v.to_bits() as i32));
    }
    f32::from_bits(key(k) as u32)
}

/// `max |v|` of a block, as an integer maximum over the magnitude bits (the same order
/// as the floats' for finite values), which vectorizes where a float `max` fold cannot.
#[inline(always)]
fn abs_max(block: &[f32; BLOCK]) -> f32 {
    let mut m = 0u32;
    for v in block {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    f32::from_bits(m)
}

/// Quantizes `x` (`x.len() / cols` rows of `cols` values) into `q`
/// (`rows · row_bytes(cols)` bytes) and `scales` (`rows · cols/32`) in the interleaved
/// layout of [`crate::quant`]. A matrix's tiles are independent: quantizing rows
/// `16t..16t+16` alone gives exactly tile `t`'s bytes.
pub fn quantize_rows(
    format: QuantFormat,
    x: &[f32],
    cols: usize,
    q: &mut [u8],
    scales: &mut [f16],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx512() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { quantize_rows_avx512(format, x, cols, q, scales) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx2() {
        // SAFETY: the features were just detected.
        return unsafe { quantize_rows_avx2(format, x, cols, q, scales) };
    }
    quantize_rows_impl(format, x, cols, q, scales)
}

/// [`quantize_rows`] compiled for AVX-512: the same IEEE operations (`round` lowered
/// inline exactly, no FMA contraction), auto-vectorized, so the same bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c")]
unsafe fn quantize_rows_avx512(
    format: QuantFormat,
    x: &[f32],
    cols: usize,
    q: &mut [u8],
    scales: &mut [f16],
) {
    quantize_rows_with(format, x, cols, q, scales, |format, values, out| {
        // SAFETY: this function's features, which the caller checked.
        unsafe { avx512::quantize_blocks(format, values, out) }
    })
}

/// [`quantize_rows`] on AVX2/F16C through the explicit search of [`avx2`] (the same IEEE
/// operations in the same order, so the same bytes; the compiler's vectorization of the
/// generic code took ~17 cycles a value).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn quantize_rows_avx2(
    format: QuantFormat,
    x: &[f32],
    cols: usize,
    q: &mut [u8],
    scales: &mut [f16],
) {
    quantize_rows_with(format, x, cols, q, scales, |format, values, out| {
        // SAFETY: this function's features, which the caller checked.
        unsafe { avx2::quantize_blocks(format, values, out) }
    })
}

#[inline(always)]
fn quantize_rows_impl(
    format: QuantFormat,
    x: &[f32],
    cols: usize,
    q: &mut [u8],
    scales: &mut [f16],
) {
    quantize_rows_with(format, x, cols, q, scales, |format, values, out| {
        for (o, block) in out.iter_mut().zip(values.chunks_exact(BLOCK)) {
            *o = quantize_block(format, block.try_into().expect("32 values"));
        }
    })
}

/// [`quantize_rows`] with `blocks(format, values, out)` quantizing the blocks of
/// `values` (one or [`BLOCKS_AT_ONCE`] of them) into `out` as [`quantize_block`] does.
#[inline(always)]
fn quantize_rows_with(
    format: QuantFormat,
    x: &[f32],
    cols: usize,
    q: &mut [u8],
    scales: &mut [f16],
    blocks: impl Fn(QuantFormat, &[f32], &mut [(f16, [i8; BLOCK])]),
) {
    assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
    let rows = x.len() / cols;
    let nb = cols / BLOCK;
    let bb = format.block_bytes();
    assert!(q.len() >= rows * format.row_bytes(cols) && scales.len() >= rows * nb);
    let mut out = [(f16::ZERO, [0i8; BLOCK]); BLOCKS_AT_ONCE];
    for t in 0..rows.div_ceil(TILE) {
        let (qt, rt, st) = tile_at(format, rows, cols, t);
        for rr in 0..rt {
            let row = &x[(t * TILE + rr) * cols..][..cols];
            for (c, chunk) in row.chunks(BLOCKS_AT_ONCE * BLOCK).enumerate() {
                let out = &mut out[..chunk.len() / BLOCK];
                blocks(format, chunk, out);
                for (i, &(d, w)) in out.iter().enumerate() {
                    let b = c * BLOCKS_AT_ONCE + i;
                    scales[st + b * rt + rr] = d;
                    let qb = &mut q[qt + b * rt * bb..][..rt * bb];
                    match format {
                        QuantFormat::Q8 => {
                            for (g, four) in w.chunks_exact(4).enumerate() {
                                let at = g * 4 * rt + 4 * rr;
                                for (o, &v) in qb[at..at + 4].iter_mut().zip(four) {
                                    *o = v as u8;
                                }
                            }
                        }
                        QuantFormat::Q4 => {
                            for c in 0..4 {
                                for j in 0..4 {
                                    let lo = (w[8 * c + j] + 8) as u8;
                                    let hi = (w[8 * c + 4 + j] + 8) as u8;
                                    qb[c * 4 * rt + 4 * rr + j] = lo | (hi << 4);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Blocks a quantizer takes at once: the AVX-512 search interleaves two blocks' work,
/// whose long dependency chains (reductions, divisions, in-order sums) one block alone
/// leaves the core waiting on.
const BLOCKS_AT_ONCE: usize = 2;

/// Quantizes a dense 2-D tensor (BF16, F16 or F32) into `format`, in parallel over rows.
///
/// # Panics
/// If the tensor is not 2-D with `cols % 32 == 0` (check with [`quantized_format`]).
pub fn quantize_tensor(view: &TensorView, format: QuantFormat) -> QuantizedTensor {
    let [rows, cols] = view.shape[..] else {
        panic!("{}: quantize needs a matrix", view.name)
    };
    quantize_with(&view.name, format, rows, cols, |first_row, tile| {
        for (rr, row) in tile.chunks_exact_mut(cols).enumerate() {
            view.row_to_f32(first_row + rr, row);
        }
    })
}

/// Quantizes a `[rows, cols]` matrix whose values `fill(first_row, tile)` writes, tile
/// of 16 rows by tile (`tile` holds `tile_rows · cols` f32), in parallel: no dense copy
/// of the whole matrix ever exists.
///
/// # Panics
/// If `cols % 32 != 0`.
pub fn quantize_with(
    name: &str,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> QuantizedTensor {
    assert!(cols.is_multiple_of(BLOCK), "{name}: cols % 32 != 0");
    let rb = format.row_bytes(cols);
    let nb = cols / BLOCK;
    // Huge pages: decode streams these planes from DRAM every step (see `hugemem`).
    let mut q_buf = crate::hugemem::alloc(rows * rb);
    let mut scale_buf = crate::hugemem::alloc(rows * nb * 2);
    let q = q_buf.as_mut_slice();
    let scales: &mut [f16] = bytemuck::cast_slice_mut(scale_buf.as_mut_slice());
    q.par_chunks_mut(TILE * rb)
        .zip(scales.par_chunks_mut(TILE * nb))
        .enumerate()
        .for_each_init(
            || vec![0.0f32; TILE * cols],
            |tile, (t, (qt, st))| {
                let n = tile_rows(rows, t) * cols;
                fill(t * TILE, &mut tile[..n]);
                quantize_rows(format, &tile[..n], cols, qt, st);
            },
        );
    QuantizedTensor::from_plane_bytes(name, format, rows, cols, q_buf.freeze(), scale_buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn dense(name: &str, rows: usize, cols: usize, seed: u64) -> TensorView {
        let v = values(rows * cols, seed);
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        TensorView::owned(name, DType::F32, vec![rows, cols], bytes)
    }

    fn rel_err(format: QuantFormat) -> f64 {
        let view = dense("w", 40, 96, 3);
        let qt = quantize_tensor(&view, format);
        let src = view.as_f32();
        let mut row = vec![0.0; 96];
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for r in 0..40 {
            qt.dequantize_row(r, &mut row);
            for (a, b) in row.iter().zip(&src[r * 96..(r + 1) * 96]) {
                num += ((a - b) as f64).powi(2);
                den += (*b as f64).powi(2);
            }
        }
        (num / den).sqrt()
    }

    #[test]
    fn round_trip_error_is_what_the_bit_width_allows() {
        // Uniform values: step amax/127 (q8) and about amax/7.5 (q4).
        let q8 = rel_err(QuantFormat::Q8);
        let q4 = rel_err(QuantFormat::Q4);
        assert!(q8 < 5e-3, "q8 {q8}");
        assert!(q4 < 8e-2, "q4 {q4}");
        assert!(q4 > q8);
    }

    /// Every instruction path (the explicit AVX-512 one, the AVX2 compilation, the
    /// generic code) gives the same bytes, on random rows and on rows of special blocks.
    #[test]
    fn every_quantizer_path_gives_the_same_bytes() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let (rows, cols) = (21, 256);
            let mut x = values(rows * cols, 9);
            // Exact ties of the rounding: multiples of half a step.
            for (i, v) in x.iter_mut().enumerate().take(cols) {
                *v = (i % 17) as f32 * 0.5 - 4.0;
            }
            // Row 1, block by block: zeros; values so small the f16 scale underflows to
            // 0 or to a subnormal; the largest magnitude negative; both signs at the
            // largest magnitude; one value alone; huge values; a ramp.
            let specials: [fn(usize) -> f32; 8] = [
                |_| 0.0,
                |i| (i as f32 - 15.0) * 1e-9,
                |i| (i as f32 - 15.0) * 3e-7,
                |i| if i == 5 { -2.5 } else { (i as f32) * 0.01 },
                |i| if i % 2 == 0 { 1.75 } else { -1.75 },
                |i| if i == 31 { 0.3 } else { 0.0 },
                |i| (i as f32 - 16.0) * 1.5e4,
                |i| i as f32 / 31.0,
            ];
            for (b, f) in specials.iter().enumerate() {
                for i in 0..BLOCK {
                    x[cols + b * BLOCK + i] = f(i);
                }
            }
            same_bytes_on_every_path(format, &x, cols);
            // An odd number of blocks a row (the last one alone).
            same_bytes_on_every_path(format, &values(5 * 96, 4), 96);
        }
    }

    /// The explicit AVX-512 path where the CPU has it ([`quantize_rows`]) and the AVX2
    /// compilation against the generic code.
    fn same_bytes_on_every_path(format: QuantFormat, x: &[f32], cols: usize) {
        let rows = x.len() / cols;
        let (mut q1, mut q2) = (vec![0u8; rows * cols], vec![0u8; rows * cols]);
        let nb = cols / BLOCK;
        let (mut s1, mut s2) = (vec![f16::ZERO; rows * nb], vec![f16::ZERO; rows * nb]);
        quantize_rows_impl(format, x, cols, &mut q2, &mut s2);
        quantize_rows(format, x, cols, &mut q1, &mut s1);
        assert_eq!(q1, q2, "{format:?}");
        assert_eq!(s1, s2, "{format:?}");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
            q1.fill(0);
            s1.fill(f16::ZERO);
            // SAFETY: the features were just detected.
            unsafe { quantize_rows_avx2(format, x, cols, &mut q1, &mut s1) };
            assert_eq!(q1, q2, "{format:?} avx2");
            assert_eq!(s1, s2, "{format:?} avx2");
        }
    }

    #[test]
    #[ignore]
    fn quantize_speed() {
        let (rows, cols) = (1408, 2048);
        let x = values(rows * cols, 1);
        let mut q = vec![0u8; rows * cols];
        let mut s = vec![f16::ZERO; rows * cols / BLOCK];
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            // The fastest of 5 runs: other processes only ever add time.
            let time = |f: &mut dyn FnMut()| {
                (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed()
                    })
                    .min()
                    .unwrap()
            };
            let fast = time(&mut || quantize_rows(format, &x, cols, &mut q, &mut s));
            let generic = time(&mut || quantize_rows_impl(format, &x, cols, &mut q, &mut s));
            eprintln!("{format:?}: {fast:?} (generic {generic:?})");
        }
    }

    #[test]
    fn q4_packs_low_and_high_nibbles() {
        let mut x = vec![0.0f32; 64];
        x[0] = -8.0;
        x[4] = 7.0;
        x[1] = 1.0;
        x[32 + 8] = 7.0; // row 1, k = 8: byte c = 1, low nibble
        let mut q = vec![0u8; 32];
        let mut s = vec![f16::ZERO; 2];
        quantize_rows(QuantFormat::Q4, &x, 32, &mut q, &mut s);
        assert_eq!(s[0].to_f32(), 1.0);
        assert_eq!(q[0], 0x0f << 4); // k = 0 -> code 0 (low), k = 4 -> code 15 (high)
        assert_eq!(q[1] & 0x0f, 9);
        // Row 1's largest magnitude is positive: the scale is negative so that 7 takes the
        // extra level, code 0 (7 = −0.875 · (0 − 8)), and the zeros code 8.
        assert_eq!(s[1].to_f32(), -0.875);
        // Two rows: byte c·4R + 4r + j = 1·8 + 4 + 0 (k = 8 low, k = 12 high).
        assert_eq!(q[12], 0x80);
    }

    /// The squared error of a block at scale `d` with round-to-nearest codes.
    fn block_err(block: &[f32], d: f32, lo: f32, hi: f32) -> f64 {
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        block
            .iter()
            .map(|&v| {
                let q = (v * inv).round_ties_even().clamp(lo, hi);
                (v as f64 - (d * q) as f64).powi(2)
            })
            .sum()
    }

    #[test]
    fn the_scale_search_never_does_worse_than_absmax_and_usually_better() {
        // Gaussian-like blocks (sum of uniforms), uniform ones, a few outliers, ties.
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        for i in 0..4000u64 {
            let u = values(4 * BLOCK, 100 + i);
            let mut b: Vec<f32> = (0..BLOCK)
                .map(|k| u[4 * k..4 * k + 4].iter().sum::<f32>() * 0.02)
                .collect();
            match i % 4 {
                1 => b.copy_from_slice(&u[..BLOCK]),
                2 => b[(i as usize / 4) % BLOCK] *= 6.0,
                3 if i % 8 == 3 => b.iter_mut().for_each(|v| *v = (*v * 40.0).round() / 8.0),
                _ => {}
            }
            blocks.push(b);
        }
        // (format, code range, absmax divisor, least gain of RMS error over absmax)
        // Measured on these blocks: q4 9.6 %, q8 5.2 %.
        for (format, lo, hi, base, least) in [
            (QuantFormat::Q4, -8.0, 7.0, -8.0, 0.09),
            (QuantFormat::Q8, -127.0, 127.0, -127.0, 0.04),
        ] {
            let (mut searched, mut absmax) = (0.0f64, 0.0f64);
            for b in &blocks {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // m: the value of largest magnitude, +amax when both signs have it.
                let m = if b.contains(&amax) { amax } else { -amax };
                // The plain absmax scale m/base: m takes code base (−8 or −127).
                let d0 = f16::from_f32(m / base).to_f32();
                let e0 = block_err(b, d0, lo, hi);
                let (d, w) = quantize_block(format, b.as_slice().try_into().unwrap());
                let e: f64 = b
                    .iter()
                    .zip(w)
                    .map(|(&v, q)| (v as f64 - (d.to_f32() * q as f32) as f64).powi(2))
                    .sum();
                // The stored codes are the nearest ones for the stored scale.
                assert_eq!(e, block_err(b, d.to_f32(), lo, hi));
                assert!(e <= e0, "{format:?}: {e} > absmax {e0} on {b:?}");
                searched += e;
                absmax += e0;
            }
            let gain = 1.0 - (searched / absmax).sqrt();
            eprintln!("{format:?}: RMS error {gain:.3} below absmax");
            assert!(gain > least, "{format:?}: {gain}");
        }
    }

    #[test]
    fn blocks_of_zeros_and_single_values_round_trip() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let (d, w) = quantize_block(format, &[0.0; BLOCK]);
            assert_eq!((d, w), (f16::ZERO, [0; BLOCK]));
            for v in [1.5f32, -3.0, 1e-3] {
                let mut b = [0.0f32; BLOCK];
                b[7] = v;
                let (d, w) = quantize_block(format, &b);
                let got: Vec<f32> = w.iter().map(|&q| d.to_f32() * q as f32).collect();
                assert!(
                    (got[7] - v).abs() <= v.abs() * 1e-3,
                    "{format:?} {v}: {got:?}"
                );
                assert!(got.iter().enumerate().all(|(k, g)| k == 7 || *g == 0.0));
            }
        }
    }

    #[test]
    fn the_interleaved_layout_round_trips_on_ragged_tiles() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let (rows, cols) = (37, 96);
            let x = values(rows * cols, 5);
            let mut q = vec![0u8; rows * format.row_bytes(cols)];
            let mut s = vec![f16::ZERO; rows * cols / BLOCK];
            quantize_rows(format, &x, cols, &mut q, &mut s);
            let mut out = vec![0.0f32; cols];
            for r in 0..rows {
                dequantize_row(format, rows, cols, &q, &s, r, &mut out);
                for (b, block) in x[r * cols..(r + 1) * cols].chunks_exact(BLOCK).enumerate() {
                    let (d, w) = quantize_block(format, block.try_into().unwrap());
                    for (j, v) in w.iter().enumerate() {
                        assert_eq!(out[b * BLOCK + j], d.to_f32() * *v as f32);
                    }
                }
            }
            // q8 at row 17 (tile 1, R = 16), k = 32 + 4·2 + 1: byte 16·96 + 512 + 128 + 4 + 1.
            if format == QuantFormat::Q8 {
                let (w, _) = weight_block(format, rows, cols, &q, &s, 17, 1);
                assert_eq!(q[16 * 96 + 512 + 2 * 64 + 4 + 1] as i8, w[9]);
            }
        }
    }

    #[test]
    fn policy_keeps_sensitive_tensors_dense() {
        let f = QuantFormat::Q4;
        assert_eq!(
            quantized_format("model.embed_tokens.weight", &[100, 64], f),
            None
        );
        assert_eq!(
            quantized_format("model.layers.1.mlp.gate.weight", &[64, 64], f),
            None
        );
        assert_eq!(
            quantized_format("model.layers.1.self_attn.kv_b_proj.weight", &[64, 64], f),
            None
        );
        assert_eq!(quantized_format("model.norm.weight", &[64], f), None);
        assert_eq!(
            quantized_format("model.layers.0.self_attn.q_b_proj.weight", &[64, 24], f),
            None
        );
        assert_eq!(
            quantized_format("lm_head.weight", &[100, 64], f),
            Some(QuantFormat::Q8)
        );
        assert_eq!(
            quantized_format("model.layers.1.mlp.experts.3.up_proj.weight", &[32, 64], f),
            Some(f)
        );
        assert_eq!(
            quantized_format("lm_head.weight", &[100, 64], QuantFormat::Q8),
            None
        );
        // Under q4 everything but the routed experts stays at q8.
        for name in [
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            assert_eq!(
                quantized_format(name, &[64, 64], f),
                Some(QuantFormat::Q8),
                "{name}"
            );
        }
        assert_eq!(
            quantized_format(
                "model.layers.1.mlp.experts.3.up_proj.weight",
                &[32, 64],
                QuantFormat::Q8
            ),
            Some(QuantFormat::Q8)
        );
    }
}
