//! How close the decode products come to the host's read bandwidth: rounds of a
//! read-probe pass (`dsv2 bench`'s), an `lm_head`-sized q8 product (102400 × 2048,
//! 223 MB), the same head in bf16 (419 MB, `bf16dot`, where the CPU has AVX-512 BF16: a
//! q8 model's head) and 64 expert-sized products (1408 × 2048) at q8 and at q4, each from DRAM,
//! each reported as a fraction of the better probe pass next to it (on a shared host the
//! bandwidth drifts within seconds, so only same-moment ratios compare).
//!
//! `cargo run --release -p dsv2-cpu --example stream_vs_probe -- [ROWS] [ROUNDS]`
//! (activation rows, default 1; rounds, default 20). `RAYON_NUM_THREADS=1` for one core.

use std::time::Instant;

use dsv2_core::quant::{quantize_tensor, QuantFormat, QuantizedTensor};
use dsv2_core::{DType, TensorView};
use dsv2_cpu::qmatmul::{activation_terms, qmatmul, QMatrix};

const K: usize = 2048;

/// A `[n, k]` matrix of pseudo-random values quantized as the loader does.
fn quantized(format: QuantFormat, n: usize, seed: u64) -> QuantizedTensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..n * K)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            half::bf16::from_f32(v).to_le_bytes()
        })
        .collect();
    quantize_tensor(
        &TensorView::owned("w", DType::BF16, vec![n, K], bytes),
        format,
    )
}

fn view(q: &QuantizedTensor) -> QMatrix<'_> {
    QMatrix::of(q, activation_terms(q.format, q.format))
}

fn bytes(q: &QuantizedTensor) -> f64 {
    (q.qweight_bytes().len() + 2 * q.scales().len()) as f64
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let m = args.next().unwrap_or(1).clamp(1, 8);
    let rounds = args.next().unwrap_or(20);
    let x: Vec<f32> = (0..m * K)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut y = vec![0.0f32; m * 102400];
    let mut probe = dsv2_cpu::bandwidth::ReadProbe::new(512 << 20);
    let head = quantized(QuantFormat::Q8, 102400, 5);
    let head_bf16: Vec<half::bf16> = (0..102400 * K)
        .map(|i| half::bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 1e3))
        .collect();
    let experts: Vec<(QuantFormat, Vec<QuantizedTensor>)> = [QuantFormat::Q8, QuantFormat::Q4]
        .into_iter()
        .map(|f| (f, (0..64).map(|e| quantized(f, 1408, 100 + e)).collect()))
        .collect();
    let rate = |mats: &[&QuantizedTensor], y: &mut [f32]| {
        let started = Instant::now();
        for w in mats {
            qmatmul(&x, m, view(w), y);
        }
        mats.iter().map(|w| bytes(w)).sum::<f64>() / started.elapsed().as_secs_f64() / 1e9
    };
    println!(
        "m = {m}, {} threads; GB/s and fraction of the probe",
        dsv2_cpu::team::threads()
    );
    for round in 0..rounds {
        let before = probe.pass() / 1e9;
        let mut rates = vec![rate(&[&head], &mut y)];
        let mut line = format!("head q8 {:5.1}", rates[0]);
        if dsv2_cpu::bf16dot::available() {
            let started = Instant::now();
            dsv2_cpu::bf16dot::matmul(&x, m, &head_bf16, 102400, K, &mut y);
            let r = (head_bf16.len() * 2) as f64 / started.elapsed().as_secs_f64() / 1e9;
            rates.push(r);
            line += &format!(" | head bf16 {r:5.1}");
        }
        for (format, mats) in &experts {
            let all: Vec<&QuantizedTensor> = mats.iter().collect();
            let r = rate(&all, &mut y);
            rates.push(r);
            line += &format!(" | experts {} {r:5.1}", format.name());
        }
        let best = before.max(probe.pass() / 1e9);
        // The placement of the two threads (see `core_round_trip_ns`): tens of ns share
        // one memory link, hundreds stream alone.
        let trip = dsv2_cpu::bandwidth::core_round_trip_ns().unwrap_or(0.0);
        let fractions: Vec<String> = rates.iter().map(|r| format!("{:.2}", r / best)).collect();
        println!(
            "round {round:3}: round trip {trip:4.0} ns | probe {best:5.1} | {line} | {}",
            fractions.join(" ")
        );
    }
}
