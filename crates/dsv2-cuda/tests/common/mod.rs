//! Helpers shared by the GPU tests: opening the device (or skipping), random values,
//! weights as checkpoint tensors, and error measures.
#![allow(dead_code)]

use dsv2_backend::ComputeDtype;
use dsv2_core::{DType, TensorView};
use dsv2_cuda::CudaBackend;
use half::bf16;

/// The CUDA backend on device 0, or `None` (test skipped) when there is no usable GPU.
/// With `DSV2_REQUIRE_GPU` set (as scripts/gpu-check.sh does), a missing GPU fails.
pub fn cuda(dtype: ComputeDtype) -> Option<CudaBackend> {
    match CudaBackend::new(0, dtype) {
        Ok(b) => Some(b),
        Err(e) if std::env::var_os("DSV2_REQUIRE_GPU").is_none() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("DSV2_REQUIRE_GPU is set but the GPU is unusable: {e}"),
    }
}

/// Deterministic values uniform in [-scale, scale).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

/// Values rounded to bf16 (exactly representable in both element types).
pub fn bf16_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    values(n, seed, scale)
        .into_iter()
        .map(|v| bf16::from_f32(v).to_f32())
        .collect()
}

/// A bf16 checkpoint tensor of the given shape with values in [-scale, scale).
pub fn tensor(name: &str, shape: &[usize], seed: u64, scale: f32) -> TensorView {
    let n = shape.iter().product();
    let bytes = values(n, seed, scale)
        .into_iter()
        .flat_map(|v| bf16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    TensorView::owned(name, DType::BF16, shape.to_vec(), bytes)
}

/// A norm-like vector tensor (values near 1).
pub fn norm_tensor(name: &str, n: usize, seed: u64) -> TensorView {
    let bytes = values(n, seed, 0.2)
        .into_iter()
        .flat_map(|v| bf16::from_f32(1.0 + v).to_bits().to_le_bytes())
        .collect();
    TensorView::owned(name, DType::BF16, vec![n], bytes)
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere gives infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Index of the largest value (first on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Tolerance of an op-level comparison against the CPU backend of the same dtype: f32
/// differs by summation order only; bf16 outputs may differ by one rounding of an
/// intermediate.
pub fn op_tolerance(dtype: ComputeDtype) -> f64 {
    match dtype {
        ComputeDtype::F32 => 1e-5,
        ComputeDtype::Bf16 => 1e-2,
    }
}
