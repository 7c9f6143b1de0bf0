//! Kernel throughput at DeepSeek-V2-Lite shapes: decode (a few rows) is memory-bound, so
//! it is reported in bytes of weights streamed per second; prefill (many rows) in
//! elements = multiply-adds per second (criterion's "elem/s" is MAC/s here).
//!
//! `cargo bench -p dsv2-cpu --bench kernels`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsv2_core::quant::{quantize_tensor, QuantFormat, QuantizedTensor};
use dsv2_core::{DType, TensorView};
use dsv2_cpu::bf16dot;
use dsv2_cpu::kernels::linear;
use dsv2_cpu::qmatmul::{qmatmul, QMatrix};
use half::bf16;

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

/// A random `[n, k]` matrix quantized the way the model loader does it.
fn quantized(format: QuantFormat, n: usize, k: usize, seed: u64) -> QuantizedTensor {
    let bytes = values(n * k, seed)
        .into_iter()
        .flat_map(|v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let view = TensorView::owned("w", DType::BF16, vec![n, k], bytes);
    quantize_tensor(&view, format)
}

fn view(q: &QuantizedTensor) -> QMatrix<'_> {
    QMatrix::of(q, dsv2_cpu::qmatmul::activation_terms(q.format, q.format))
}

fn weight_bytes(q: &QuantizedTensor) -> u64 {
    (q.qweight_bytes().len() + q.scales().len() * 2) as u64
}

/// The dense layer-0 MLP up projection of V2-Lite: 10944 × 2048 (45 MB in bf16, 23 MB
/// at q8: about the size of the L3, so partly cache-served).
const N: usize = 10944;
const K: usize = 2048;

fn decode(c: &mut Criterion) {
    let x = values(8 * K, 2);
    let mut y = vec![0.0f32; 8 * N];
    let mut group = c.benchmark_group("decode_matvec_10944x2048");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    let w: Vec<bf16> = values(N * K, 3).into_iter().map(bf16::from_f32).collect();
    group.throughput(Throughput::Bytes((N * K * 2) as u64));
    group.bench_function("bf16", |b| b.iter(|| linear(&x, 1, &w, N, K, &mut y)));
    drop(w);
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let q = quantized(format, N, K, 3);
        group.throughput(Throughput::Bytes(weight_bytes(&q)));
        for m in [1usize, 4, 8] {
            group.bench_function(format!("{}_m{m}", format.name()), |b| {
                b.iter(|| qmatmul(&x, m, view(&q), &mut y))
            });
        }
    }
    group.finish();
}

/// Weights far larger than the 32 MiB L3: an lm_head-like 102400 × 2048 matrix (q8:
/// 223 MB), and 8 of 64 experts' 1408 × 2048 up projections per iteration, cycling
/// (q8: 3 MB each, 196 MB for the 64).
fn decode_dram(c: &mut Criterion) {
    let x = values(8 * K, 2);
    let mut group = c.benchmark_group("decode_dram");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    {
        // The host's read bandwidth in the same run (`dsv2 bench`'s probe), to set the
        // kernels' rates against.
        let mut probe = dsv2_cpu::bandwidth::ReadProbe::new(512 << 20);
        group.throughput(Throughput::Bytes(probe.bytes() as u64));
        group.bench_function("read_probe_512MiB", |b| b.iter(|| probe.pass()));
    }
    {
        let n = 102400;
        let q = quantized(QuantFormat::Q8, n, K, 5);
        let mut y = vec![0.0f32; 8 * n];
        group.throughput(Throughput::Bytes(weight_bytes(&q)));
        for m in [1usize, 4, 8] {
            group.bench_function(format!("lm_head_102400x2048_q8_m{m}"), |b| {
                b.iter(|| qmatmul(&x, m, view(&q), &mut y))
            });
        }
    }
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let experts: Vec<QuantizedTensor> = (0..64)
            .map(|e| quantized(format, 1408, K, 100 + e))
            .collect();
        let mut y = vec![0.0f32; 1408];
        group.throughput(Throughput::Bytes(8 * weight_bytes(&experts[0])));
        let mut next = 0;
        group.bench_function(format!("experts_8x1408x2048_{}_m1", format.name()), |b| {
            b.iter(|| {
                for _ in 0..8 {
                    qmatmul(&x, 1, view(&experts[next]), &mut y);
                    next = (next + 1) % experts.len();
                }
            })
        });
    }
    group.finish();
}

fn prefill(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    {
        const M: usize = 128;
        let x = values(M * K, 4);
        let mut y = vec![0.0f32; M * N];
        group.throughput(Throughput::Elements((M * N * K) as u64));
        let w: Vec<bf16> = values(N * K, 3).into_iter().map(bf16::from_f32).collect();
        group.bench_function("128x10944x2048_bf16", |b| {
            b.iter(|| linear(&x, M, &w, N, K, &mut y))
        });
        if bf16dot::available() {
            // bf16 activations (the bf16 backend's) on vdpbf16ps.
            group.bench_function("128x10944x2048_bf16_dpbf16", |b| {
                b.iter(|| bf16dot::matmul(&x, M, &w, N, K, &mut y))
            });
        }
        drop(w);
        let q = quantized(QuantFormat::Q8, N, K, 3);
        group.bench_function("128x10944x2048_q8", |b| {
            b.iter(|| qmatmul(&x, M, view(&q), &mut y))
        });
    }
    // A routed expert at 512-token prefill (about 48 tokens each): up and down projections.
    for (m, n, k) in [
        (48usize, 1408usize, 2048usize),
        (48, 2048, 1408),
        (512, 2048, 2048),
    ] {
        let x = values(m * k, 6);
        let mut y = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((m * n * k) as u64));
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let q = quantized(format, n, k, 7);
            group.bench_function(format!("{m}x{n}x{k}_{}", format.name()), |b| {
                b.iter(|| qmatmul(&x, m, view(&q), &mut y))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode, decode_dram, prefill);
criterion_main!(benches);
