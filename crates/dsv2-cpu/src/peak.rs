//! The CPU's peak multiply-add rate, measured on the instructions the matrix kernels use,
//! so that a prefill's MFU is stated against this machine (a datasheet figure does not
//! exist for a virtual machine's cores, whose clock and sharing are unknown).
//!
//! Every team thread runs chains of independent multiply-adds in registers (12
//! accumulators, enough to cover the instruction's latency on two pipes) with no memory
//! traffic: the rate is the cores' arithmetic ceiling for that instruction, which no
//! kernel exceeds. Measured like the read bandwidth: the best of a few short passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::team;

/// Independent accumulators per thread.
pub(crate) const CHAINS: usize = 12;

/// The matrix instruction family a prefill product runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MatrixOp {
    /// f32 fused multiply-add (f32 and bf16 weights under f32 activations).
    F32,
    /// `vdpbf16ps` (bf16 weights under bf16 activations where the CPU has AVX-512 BF16).
    Bf16,
    /// int8 dot products (`vpdpbusd` / `maddubs`: the q8 and q4 kernels).
    Int8,
    /// AMX bf16 tiles (`tdpbf16ps`: q8 prompt rows where the CPU has them).
    AmxBf16,
}

impl MatrixOp {
    /// One thread's `rounds` rounds of [`CHAINS`] multiply-add chains on this CPU's
    /// instruction path for the op; returns the multiply-adds done.
    fn run(self, rounds: usize) -> u64 {
        match self {
            MatrixOp::F32 => crate::matmul::peak_macs(rounds),
            MatrixOp::Bf16 => crate::bf16dot::peak_macs(rounds),
            MatrixOp::Int8 => crate::qmatmul::peak_macs(rounds),
            MatrixOp::AmxBf16 => crate::amx::peak_macs(rounds),
        }
    }
}

/// Wall time one task aims for.
const TASK_TIME: Duration = Duration::from_millis(2);
/// Tasks per thread in a pass.
const TASKS_PER_THREAD: usize = 4;
/// Passes; the best is reported.
const PASSES: usize = 5;

/// The team's peak rate of `op` in multiply-adds per second (all threads together).
///
/// # Panics
/// For [`MatrixOp::Bf16`] on a CPU without AVX-512 BF16 ([`crate::bf16dot::available`]),
/// [`MatrixOp::AmxBf16`] on one without AMX tiles.
pub fn measure_peak_macs(op: MatrixOp) -> f64 {
    // Rounds for one task of about TASK_TIME, from a short run on this thread.
    let probe_rounds = 20_000;
    let started = Instant::now();
    op.run(probe_rounds);
    let per_round = started.elapsed().as_secs_f64().max(1e-9) / probe_rounds as f64;
    let rounds = ((TASK_TIME.as_secs_f64() / per_round) as usize).max(1_000);
    let tasks = team::threads() * TASKS_PER_THREAD;
    (0..PASSES)
        .map(|_| {
            let macs = AtomicU64::new(0);
            let started = Instant::now();
            team::for_each(tasks, |_| {
                macs.fetch_add(op.run(rounds), Ordering::Relaxed);
            });
            macs.into_inner() as f64 / started.elapsed().as_secs_f64().max(1e-9)
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_counts_its_multiply_adds() {
        let mut ops = vec![MatrixOp::F32, MatrixOp::Int8];
        if crate::bf16dot::available() {
            ops.push(MatrixOp::Bf16);
        }
        if crate::amx::available() {
            ops.push(MatrixOp::AmxBf16);
        }
        for op in ops {
            // Lanes per instruction: 1 (portable) .. 64 (a zmm of int8 pairs), 8,192 for
            // a tile.
            let macs = op.run(10);
            assert!(
                macs.is_multiple_of(10 * CHAINS as u64)
                    && (10 * CHAINS as u64..=81_920 * CHAINS as u64).contains(&macs),
                "{op:?}: {macs}"
            );
            // A rate, not a speed bound: under qemu (the aarch64 tests) or a busy host it
            // falls below any floor one could name (0.098 G multiply-adds/s seen in CI).
            let rate = measure_peak_macs(op);
            eprintln!("{op:?}: {:.1} G multiply-adds/s", rate / 1e9);
            assert!(rate.is_finite() && rate > 0.0, "{op:?}: {rate}");
        }
    }
}
