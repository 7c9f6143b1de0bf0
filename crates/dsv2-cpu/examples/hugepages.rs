//! A/B measurement behind `dsv2_core::hugemem`: the same 64 quantized expert matrices
//! (1408 × 2048) stored on 4 KiB pages and on transparent huge pages, 8 of them
//! multiplied by one activation row per run (a decode step's pattern), the two layouts
//! alternating run by run so that a busy machine affects both alike.
//!
//! `cargo run --release -p dsv2-cpu --example hugepages`
use dsv2_core::quant::{quantize_tensor, QuantFormat};
use dsv2_core::{DType, TensorView};
use dsv2_cpu::qmatmul::{qmatmul, QMatrix};
use half::{bf16, f16};
use std::time::Instant;

fn main() {
    let (n, k) = (1408, 2048);
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let bytes: Vec<u8> = (0..n * k)
            .flat_map(|j| bf16::from_f32((((j * 17) % 97) as f32 - 48.0) * 0.01).to_le_bytes())
            .collect();
        let q = quantize_tensor(
            &TensorView::owned("w", DType::BF16, vec![n, k], bytes),
            format,
        );
        let (qb, sb) = (q.qweight_bytes(), q.scales());
        let per = qb.len() + sb.len() * 2;
        let count = 64;
        let total = per * count;
        let mut heap = vec![0u8; total + 64];
        let mut anon = memmap2::MmapMut::map_anon(total + 64).unwrap();
        anon.advise(memmap2::Advice::HugePage).unwrap();
        for buf in [&mut heap[..], &mut anon[..]] {
            for e in 0..count {
                let o = e * per;
                buf[o..o + qb.len()].copy_from_slice(qb);
                let sbytes: &[u8] = bytemuck::cast_slice(sb);
                buf[o + qb.len()..o + per].copy_from_slice(sbytes);
            }
        }
        fn view<'a>(
            buf: &'a [u8],
            e: usize,
            per: usize,
            ql: usize,
            format: QuantFormat,
            n: usize,
            k: usize,
        ) -> QMatrix<'a> {
            let o = e * per;
            let s: &[f16] = bytemuck::cast_slice(&buf[o + ql..o + per]);
            QMatrix {
                format,
                rows: n,
                cols: k,
                q: &buf[o..o + ql],
                scales: s,
                terms: dsv2_cpu::qmatmul::activation_terms(format, format),
            }
        }
        let x: Vec<f32> = (0..k).map(|j| ((j % 13) as f32 - 6.0) * 0.1).collect();
        let mut y = vec![0.0f32; n];
        let rounds = 300;
        let (mut sum, mut best) = ([0.0f64; 2], [f64::MAX; 2]);
        let mut next = 0;
        for _ in 0..rounds {
            for v in 0..2 {
                let buf: &[u8] = if v == 0 { &heap } else { &anon };
                let t = Instant::now();
                for _ in 0..8 {
                    qmatmul(&x, 1, view(buf, next, per, qb.len(), format, n, k), &mut y);
                    next = (next + 1) % count;
                }
                let s = t.elapsed().as_secs_f64();
                sum[v] += s;
                best[v] = best[v].min(s);
            }
        }
        let b = (8 * per) as f64;
        for (v, name) in ["4k pages", "huge pages"].iter().enumerate() {
            println!(
                "{format:?} {name}: mean {:.1} GB/s best {:.1} GB/s",
                b / (sum[v] / rounds as f64) / 1e9,
                b / best[v] / 1e9
            );
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
        println!(
            "{}",
            smaps
                .lines()
                .filter(|l| l.contains("AnonHugePages"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
