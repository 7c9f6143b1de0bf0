//! Host memory read bandwidth, measured the way a memory-bound decode step reads its
//! weights: every core streaming its own part of a buffer far larger than the caches,
//! held in transparent huge pages like the quantized weights (`dsv2_core::hugemem`; on
//! 4 KiB pages the same read is ~15% slower, which would flatter the fraction of the
//! floor that a decode step reports).

use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering};

/// Smallest buffer read, whatever the caches (bytes).
const MIN_BYTES: usize = 512 << 20;
/// Largest buffer read, so that a machine with a huge last-level cache is not asked for
/// gigabytes of scratch memory (bytes).
const MAX_BYTES: usize = 2 << 30;
/// How many times larger than the last-level cache the buffer is.
const LLC_MULTIPLE: usize = 8;
/// Timed passes; the best one is reported.
const PASSES: usize = 8;

/// Bytes one measurement reads per pass: `LLC_MULTIPLE` times the largest cache this
/// machine reports, within `MIN_BYTES..=MAX_BYTES`.
pub fn buffer_bytes() -> usize {
    (largest_cache_bytes().unwrap_or(0) * LLC_MULTIPLE).clamp(MIN_BYTES, MAX_BYTES)
}

/// The best read bandwidth in bytes per second over a few passes of a read of `bytes`
/// bytes by the team's threads (the threads the kernels run on).
pub fn measure_read_bandwidth(bytes: usize) -> f64 {
    ReadProbe::new(bytes).best_of(PASSES)
}

/// The mean round trip, in nanoseconds, of one cache line bounced between the calling
/// thread and a second one, each waiting for the other's write (after a warm-up): tens
/// of nanoseconds when the two threads run on cores under one shared last-level cache,
/// hundreds across chips (an EPYC's separate CCDs, or sockets), where each core reaches
/// memory through its own link. On a shared VM the placement of its vCPUs can change
/// within seconds and moves the read bandwidth and the kernels' rates with it, so
/// `dsv2 bench` reports this next to each bandwidth probe. `None` with one CPU.
pub fn core_round_trip_ns() -> Option<f64> {
    const ROUNDS: u64 = 20_000;
    const WARMUP: u64 = 1_000;
    /// The bounced value, alone on its cache lines.
    #[repr(align(128))]
    struct Line(AtomicU64);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    let line = Line(AtomicU64::new(0));
    // Waits for `value`, yielding now and then in case both threads share one CPU.
    let wait_for = |value: u64| {
        let mut spins = 0u32;
        while line.0.load(Ordering::Acquire) != value {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 12) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    };
    let elapsed = std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..ROUNDS {
                wait_for(2 * i + 1);
                line.0.store(2 * i + 2, Ordering::Release);
            }
        });
        let mut started = Instant::now();
        for i in 0..ROUNDS {
            if i == WARMUP {
                started = Instant::now();
            }
            line.0.store(2 * i + 1, Ordering::Release);
            wait_for(2 * i + 2);
        }
        started.elapsed()
    });
    Some(elapsed.as_secs_f64() * 1e9 / (ROUNDS - WARMUP) as f64)
}

/// A buffer in huge pages, written once, whose timed reads measure the host's read
/// bandwidth. Kept alive across a benchmark's decode steps, one pass between two steps
/// samples the bandwidth at the moments the steps ran (on a shared host it drifts by
/// tens of percent within seconds).
pub struct ReadProbe {
    memory: dsv2_core::hugemem::HugeBuf,
    words: usize,
}

impl ReadProbe {
    /// Allocates and writes a buffer of `bytes` bytes (at least 1 MiB).
    pub fn new(bytes: usize) -> ReadProbe {
        // At least 1 MiB, so the buffer is a mapping (8-byte aligned).
        let words = (bytes / 8).max(1 << 17);
        let mut memory = dsv2_core::hugemem::alloc(words * 8);
        let buf: &mut [u64] = bytemuck::cast_slice_mut(memory.as_mut_slice());
        // Written with distinct non-zero values first: a page never written reads the
        // shared zero page, which would measure the caches instead of memory.
        crate::team::for_each_chunk_mut(buf, 1 << 16, |c, chunk| {
            let first = (c << 16) as u64;
            for (i, w) in chunk.iter_mut().enumerate() {
                *w = (first + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            }
        });
        ReadProbe { memory, words }
    }

    /// Bytes one pass reads.
    pub fn bytes(&self) -> usize {
        self.words * 8
    }

    /// One timed read of the whole buffer by the team; bytes per second.
    pub fn pass(&mut self) -> f64 {
        let buf: &[u64] = bytemuck::cast_slice(self.memory.as_mut_slice());
        let threads = crate::team::threads();
        let chunk = self.words.div_ceil(threads * 8).max(1 << 12);
        let tasks = self.words.div_ceil(chunk);
        let sum = AtomicU64::new(0);
        let started = Instant::now();
        crate::team::for_each(tasks, |t| {
            let part = &buf[t * chunk..((t + 1) * chunk).min(buf.len())];
            sum.fetch_add(sum_words(part), Ordering::Relaxed);
        });
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box(sum.into_inner());
        self.bytes() as f64 / seconds.max(1e-9)
    }

    /// The best of `passes` passes; bytes per second.
    pub fn best_of(&mut self, passes: usize) -> f64 {
        (0..passes.max(1)).map(|_| self.pass()).fold(0.0, f64::max)
    }
}

/// Wrapping sum of `words` with eight independent accumulators, so the loop is bound by
/// loads, not by the latency of one add chain (it vectorizes on every target).
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut blocks = words.chunks_exact(8);
    for block in &mut blocks {
        for (a, w) in acc.iter_mut().zip(block) {
            *a = a.wrapping_add(*w);
        }
    }
    acc.iter()
        .chain(blocks.remainder())
        .fold(0, |s, &w| s.wrapping_add(w))
}

/// Size of the largest CPU cache Linux reports for cpu0 (`None` elsewhere).
fn largest_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| {
        let text = std::fs::read_to_string(entry.ok()?.path().join("size")).ok()?;
        parse_cache_size(text.trim())
    })
    .max()
}

/// Parses sysfs cache sizes such as `32768K`, `2M` or `512`.
fn parse_cache_size(text: &str) -> Option<usize> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok().map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word() {
        let words: Vec<u64> = (1..=1003).collect();
        assert_eq!(sum_words(&words), 1003 * 1004 / 2);
        assert_eq!(sum_words(&[]), 0);
    }

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_cache_size("32768K"), Some(32 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("big"), None);
        assert!((MIN_BYTES..=MAX_BYTES).contains(&buffer_bytes()));
    }

    #[test]
    fn measures_a_plausible_bandwidth() {
        // A small buffer (mostly cache-resident): only the arithmetic is checked here,
        // never a speed (the aarch64 tests run under qemu, on a shared host).
        let bw = measure_read_bandwidth(8 << 20);
        assert!(bw.is_finite() && bw > 0.0, "{bw}");
        let mut probe = ReadProbe::new(4 << 20);
        assert_eq!(probe.bytes(), 4 << 20);
        let pass = probe.pass();
        assert!(pass.is_finite() && pass > 0.0, "{pass}");
        assert!(probe.best_of(3) > 0.0);
    }

    /// Two threads bounce a cache line: a round trip takes more than a nanosecond and,
    /// on any machine this runs on, well under a millisecond.
    #[test]
    fn measures_a_plausible_round_trip() {
        match core_round_trip_ns() {
            Some(ns) => assert!(ns.is_finite() && (1.0..1e6).contains(&ns), "{ns} ns"),
            None => assert_eq!(std::thread::available_parallelism().unwrap().get(), 1),
        }
    }
}
