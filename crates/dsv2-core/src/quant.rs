//! Block-quantized weights: dsv2's `q8` and `q4` formats.
//!
//! A quantized matrix `[rows, cols]` (`cols` a multiple of [`BLOCK`]) is stored as two
//! planes, so both can be memory-mapped and read with aligned vector loads:
//!
//! | format | `<name>.qweight` | `<name>.scales` | value of element `j` of a block |
//! |---|---|---|---|
//! | `q8` | I8 `[rows, cols]` in −127..=127 | F16 `[rows, cols/32]` | `scale · q[j]` |
//! | `q4` | U8 `[rows, cols/2]`: byte `i` of a block's 16 holds element `i` in its low nibble and element `i+16` in its high nibble | F16 `[rows, cols/32]` | `scale · (nibble − 8)` |
//!
//! That is 8.5 and 4.5 bits per weight. `<name>` is the checkpoint's tensor name
//! (`model.layers.3.mlp.experts.7.up_proj.weight`); a file written by `dsv2 quantize`
//! records `{"dsv2_quantization": "q8"|"q4", "dsv2_quant_version": "1"}` in its
//! safetensors metadata. Embeddings, norms, the MoE router and `kv_b_proj` (read per head
//! by the attention) are never quantized; under `q4` only the routed experts take 4 bits
//! and every other matrix is q8 (see [`quantized_format`]).

use half::f16;
use rayon::prelude::*;

use crate::checkpoint::{DType, TensorView};

/// Elements per quantization block.
pub const BLOCK: usize = 32;

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
        let nb = self.cols / BLOCK;
        let rb = self.format.row_bytes(self.cols);
        let q = &self.qweight_bytes()[r * rb..(r + 1) * rb];
        let s = &self.scales()[r * nb..(r + 1) * nb];
        for b in 0..nb {
            let d = s[b].to_f32();
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            match self.format {
                QuantFormat::Q8 => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = d * (q[b * BLOCK + j] as i8) as f32;
                    }
                }
                QuantFormat::Q4 => {
                    let qb = &q[b * BLOCK / 2..(b + 1) * BLOCK / 2];
                    for i in 0..BLOCK / 2 {
                        o[i] = d * ((qb[i] & 0x0f) as i32 - 8) as f32;
                        o[i + BLOCK / 2] = d * ((qb[i] >> 4) as i32 - 8) as f32;
                    }
                }
            }
        }
    }
}

/// Whether a tensor is quantized under `format`, and to which format.
///
/// Under `q4` only the routed experts (`mlp.experts.N.*`, ~92% of V2-Lite's parameters and
/// ~55% of a decode step's reads) take 4 bits; attention, the shared experts, the dense
/// MLP and `lm_head` stay at q8, as llama.cpp's `Q4_K_M` mixes formats by tensor. Every
/// token passes through those with weight 1, while a routed expert's output is scaled by
/// its routing weight, so 4-bit error there costs far more: on the golden fixtures, q4
/// everywhere gives 0.09..0.18 relative logit error, routed-only q4 0.025..0.11
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
        QuantFormat::Q4 if name.contains(".mlp.experts.") => Some(QuantFormat::Q4),
        _ => Some(QuantFormat::Q8),
    }
}

/// Quantizes one row of `cols` values into `q` (row bytes) and `scales` (`cols/32`).
pub fn quantize_row(format: QuantFormat, x: &[f32], q: &mut [u8], scales: &mut [f16]) {
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        match format {
            QuantFormat::Q8 => {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let inv = if d.to_f32() > 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                for (j, v) in block.iter().enumerate() {
                    q[b * BLOCK + j] = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                }
                scales[b] = d;
            }
            QuantFormat::Q4 => {
                let (d, codes) = best_q4_block(block);
                for i in 0..BLOCK / 2 {
                    q[b * BLOCK / 2 + i] = codes[i] | (codes[i + BLOCK / 2] << 4);
                }
                scales[b] = d;
            }
        }
    }
}

/// The 4-bit codes (0..=15, value `code − 8`) and scale minimizing the block's squared
/// error, searched over scales around `amax / 8` (a small grid, as llama.cpp's
/// `make_qx_quants` does).
fn best_q4_block(block: &[f32]) -> (f16, [u8; BLOCK]) {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut best = (f16::ZERO, [8u8; BLOCK], f32::INFINITY);
    if amax == 0.0 {
        return (best.0, best.1);
    }
    for step in 0..=16 {
        // Candidate scales from amax/8 (no clipping of the negative end) to amax/6.
        let d = f16::from_f32(amax / (8.0 - step as f32 * 0.125));
        let df = d.to_f32();
        if df == 0.0 {
            continue;
        }
        let mut codes = [0u8; BLOCK];
        let mut err = 0.0f32;
        for (j, v) in block.iter().enumerate() {
            let c = ((v / df).round() + 8.0).clamp(0.0, 15.0);
            codes[j] = c as u8;
            let e = v - df * (c - 8.0);
            err += e * e;
        }
        if err < best.2 {
            best = (d, codes, err);
        }
    }
    (best.0, best.1)
}

/// Quantizes a dense 2-D tensor (BF16, F16 or F32) into `format`, in parallel over rows.
///
/// # Panics
/// If the tensor is not 2-D with `cols % 32 == 0` (check with [`quantized_format`]).
pub fn quantize_tensor(view: &TensorView, format: QuantFormat) -> QuantizedTensor {
    let [rows, cols] = view.shape[..] else {
        panic!("{}: quantize needs a matrix", view.name)
    };
    assert!(cols % BLOCK == 0, "{}: cols % 32 != 0", view.name);
    let rb = format.row_bytes(cols);
    let nb = cols / BLOCK;
    let mut q = vec![0u8; rows * rb];
    let mut scales = vec![f16::ZERO; rows * nb];
    q.par_chunks_mut(rb)
        .zip(scales.par_chunks_mut(nb))
        .enumerate()
        .for_each_init(
            || vec![0.0f32; cols],
            |row, (r, (qr, sr))| {
                view.row_to_f32(r, row);
                quantize_row(format, row, qr, sr);
            },
        );
    let (qdtype, qshape) = match format {
        QuantFormat::Q8 => (DType::I8, vec![rows, cols]),
        QuantFormat::Q4 => (DType::U8, vec![rows, cols / 2]),
    };
    let scale_bytes: Vec<u8> = bytemuck::cast_slice(&scales).to_vec();
    QuantizedTensor {
        name: view.name.clone(),
        format,
        rows,
        cols,
        qweight: TensorView::owned(&format!("{}{QWEIGHT_SUFFIX}", view.name), qdtype, qshape, q),
        scales: TensorView::owned(
            &format!("{}{SCALES_SUFFIX}", view.name),
            DType::F16,
            vec![rows, nb],
            scale_bytes,
        ),
    }
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
        let view = dense("w", 8, 96, 3);
        let qt = quantize_tensor(&view, format);
        let src = view.as_f32();
        let mut row = vec![0.0; 96];
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for r in 0..8 {
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

    #[test]
    fn q4_packs_low_and_high_nibbles() {
        let mut x = vec![0.0f32; 32];
        x[0] = -8.0;
        x[16] = 7.0;
        x[1] = 1.0;
        let mut q = vec![0u8; 16];
        let mut s = vec![f16::ZERO; 1];
        quantize_row(QuantFormat::Q4, &x, &mut q, &mut s);
        assert_eq!(s[0].to_f32(), 1.0);
        assert_eq!(q[0], 0x0f << 4); // element 0 -> code 0, element 16 -> code 15
        assert_eq!(q[1] & 0x0f, 9);
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
