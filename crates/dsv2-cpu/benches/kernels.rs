//! Kernel throughput at DeepSeek-V2-Lite shapes: decode (one row) is memory-bound, so it
//! is reported in bytes of weights streamed per second; prefill (many rows) in FLOP/s.
//!
//! `cargo bench -p dsv2-cpu --bench kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsv2_core::quant::{quantize_row, QuantFormat, BLOCK};
use dsv2_cpu::kernels::linear;
use dsv2_cpu::qmatmul::{qmatmul, QMatrix};
use half::{bf16, f16};

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

/// The dense layer-0 MLP up projection of V2-Lite: 10944 × 2048 (45 MB in bf16, far
/// larger than the caches).
const N: usize = 10944;
const K: usize = 2048;

fn quantized(format: QuantFormat) -> (Vec<u8>, Vec<f16>) {
    let src = values(N * K, 1);
    let rb = format.row_bytes(K);
    let mut q = vec![0u8; N * rb];
    let mut s = vec![f16::ZERO; N * K / BLOCK];
    for r in 0..N {
        quantize_row(
            format,
            &src[r * K..(r + 1) * K],
            &mut q[r * rb..(r + 1) * rb],
            &mut s[r * K / BLOCK..(r + 1) * K / BLOCK],
        );
    }
    (q, s)
}

fn decode(c: &mut Criterion) {
    let x = values(K, 2);
    let mut y = vec![0.0f32; N];
    let mut group = c.benchmark_group("decode_matvec_10944x2048");
    let w: Vec<bf16> = values(N * K, 3).into_iter().map(bf16::from_f32).collect();
    group.throughput(Throughput::Bytes((N * K * 2) as u64));
    group.bench_function("bf16", |b| b.iter(|| linear(&x, 1, &w, N, K, &mut y)));
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let (q, s) = quantized(format);
        let m = QMatrix {
            format,
            rows: N,
            cols: K,
            q: &q,
            scales: &s,
        };
        group.throughput(Throughput::Bytes((q.len() + s.len() * 2) as u64));
        group.bench_function(format.name(), |b| b.iter(|| qmatmul(&x, 1, m, &mut y)));
    }
    group.finish();
}

fn prefill(c: &mut Criterion) {
    const M: usize = 128;
    let x = values(M * K, 4);
    let mut y = vec![0.0f32; M * N];
    let mut group = c.benchmark_group("prefill_128x10944x2048");
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * M * N * K) as u64));
    let w: Vec<bf16> = values(N * K, 3).into_iter().map(bf16::from_f32).collect();
    group.bench_function("bf16", |b| b.iter(|| linear(&x, M, &w, N, K, &mut y)));
    let (q, s) = quantized(QuantFormat::Q8);
    let m = QMatrix {
        format: QuantFormat::Q8,
        rows: N,
        cols: K,
        q: &q,
        scales: &s,
    };
    group.bench_function("q8", |b| b.iter(|| qmatmul(&x, M, m, &mut y)));
    group.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
