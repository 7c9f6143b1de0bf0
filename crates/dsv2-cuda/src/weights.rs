//! Weights on the device: matrices converted to the element type at load, vectors
//! (norm weights) in f32.

use dsv2_core::{DType, TensorView};
use half::{bf16, f16};

use crate::device::{DevMem, Device};
use crate::error::{unsupported, Result};

/// A weight resident on the device.
pub struct CudaWeight {
    mem: DevMem,
    /// `[rows, cols]`; a vector is one row.
    rows: usize,
    cols: usize,
    is_vector: bool,
    name: String,
}

impl CudaWeight {
    /// Rows of the `[rows, cols]` matrix (1 for a vector).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix (length of a vector).
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// `(rows, cols)` of a matrix; an error naming `op` for a vector.
    pub(crate) fn matrix(&self, op: &str) -> Result<(usize, usize)> {
        if self.is_vector {
            return Err(unsupported(
                op,
                format!("`{}` is a vector, a matrix is needed", self.name),
            ));
        }
        Ok((self.rows, self.cols))
    }

    /// The length of a vector; an error naming `op` for a matrix.
    pub(crate) fn vector(&self, op: &str) -> Result<usize> {
        if !self.is_vector {
            return Err(unsupported(
                op,
                format!("`{}` is a matrix, a vector is needed", self.name),
            ));
        }
        Ok(self.cols)
    }
}

/// Elements converted per host chunk (bounds the host memory a conversion takes).
const CHUNK: usize = 1 << 22;

/// Uploads `view`: a vector as f32, a matrix in the device's element type.
pub(crate) fn load(dev: &Device, view: &TensorView) -> Result<CudaWeight> {
    let (rows, cols, is_vector) = match view.shape.as_slice() {
        [n] => (1, *n, true),
        [r, c] => (*r, *c, false),
        other => {
            return Err(unsupported(
                "load_weight",
                format!("expected a vector or matrix, got shape {other:?}"),
            ));
        }
    };
    let src_size = match &view.dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        other => {
            return Err(unsupported(
                "load_weight",
                format!("dtype {other} is not supported as a dense weight"),
            ));
        }
    };
    let n = view.numel();
    let bytes = view.data.as_slice();
    if bytes.len() != n * src_size {
        return Err(unsupported(
            "load_weight",
            format!("{} bytes for {n} {} values", bytes.len(), view.dtype),
        ));
    }
    let to_f32 = !dev.bf16 || is_vector;
    let dst_size = if to_f32 { 4 } else { 2 };
    let mem = dev.alloc(n * dst_size)?;
    if !to_f32 && view.dtype == DType::BF16 {
        // Already in the element type: straight from the checkpoint's bytes.
        dev.htod(mem.ptr(), bytes, "load_weight")?;
    } else {
        let mut at = 0usize;
        for chunk in bytes.chunks(CHUNK * src_size) {
            let values = chunk.chunks_exact(src_size).map(|b| widen(&view.dtype, b));
            let dst = mem.ptr() + (at * dst_size) as u64;
            if to_f32 {
                let v: Vec<f32> = values.collect();
                dev.htod(dst, &v, "load_weight")?;
            } else {
                // Rounded to nearest even, as the bf16 reference casts its weights.
                let v: Vec<u16> = values.map(|x| bf16::from_f32(x).to_bits()).collect();
                dev.htod(dst, &v, "load_weight")?;
            }
            at += chunk.len() / src_size;
        }
    }
    Ok(CudaWeight {
        mem,
        rows,
        cols,
        is_vector,
        name: view.name.clone(),
    })
}

/// One stored little-endian element as f32 (exact for every supported dtype).
fn widen(dtype: &DType, b: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        _ => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
    }
}
