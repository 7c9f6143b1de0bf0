//! The per-token path does not allocate: once a decode step of a given shape has run,
//! running it again (forward pass, attention over the paged cache, MoE, logits and the
//! greedy pick on the CPU backend, dense bf16 and q8/q4 weights) makes no call to the
//! allocator. Weights are never copied: they are read where they were loaded.
//!
//! A counting global allocator sees every thread (the rayon workers included); this file
//! holds one test so nothing else runs while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::{DType, QuantFormat};
use dsv2_cpu::CpuBackend;
use dsv2_model::synthetic::{builtin_config, synthetic_checkpoint};
use dsv2_model::{LoadOptions, Model};

struct Counting;

/// Counts one allocation while counting is on (and prints its stack when tracing).
fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) {
            COUNTING.store(false, Ordering::SeqCst);
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
            COUNTING.store(true, Ordering::SeqCst);
        }
    }
}

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// `NO_ALLOC_TRACE=1` prints the stack of each counted allocation.
static TRACE: AtomicBool = AtomicBool::new(false);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BLOCK: usize = 16;
const DECODE_STEPS: usize = 12;

/// Prefills three prompts, then decodes `DECODE_STEPS` greedy tokens for all three in
/// one batch per step (the serving engine's steady state). Returns the allocations made
/// during the decode steps (counted when `count`) and the generated tokens.
fn prefill_and_decode(
    backend: &CpuBackend,
    model: &Model<CpuBackend>,
    batch: &mut Batch,
    count: bool,
) -> (usize, Vec<u32>) {
    let prompts: [Vec<u32>; 3] = [20, 33, 47].map(|n| {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 100_000) + 5)
            .collect()
    });
    let blocks_per_seq = (47 + DECODE_STEPS).div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            (0..blocks_per_seq as u32)
                .map(|b| b * 3 + s as u32)
                .collect()
        })
        .collect();
    let mut cache = backend
        .alloc_cache(model.cache_spec(3 * blocks_per_seq, BLOCK))
        .unwrap();
    let mut ws = model.workspace(backend, 128).unwrap();
    batch.clear();
    for (p, t) in prompts.iter().zip(&tables) {
        batch.push_seq(p, 0, t, BLOCK, LogitsWanted::Last);
    }
    let mut next = vec![0u32; 3];
    model
        .forward_greedy(
            backend,
            batch,
            &mut cache,
            &mut ws,
            AttentionPath::Auto,
            &mut next,
        )
        .unwrap();
    let mut generated = Vec::with_capacity(3 * (DECODE_STEPS + 1));
    generated.extend_from_slice(&next);
    let mut logits = vec![0.0f32; 3 * model.config.vocab_size];
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();

    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(count, Ordering::SeqCst);
    for step in 0..DECODE_STEPS {
        batch.clear();
        for s in 0..3 {
            batch.push_seq(
                &next[s..s + 1],
                lens[s],
                &tables[s],
                BLOCK,
                LogitsWanted::Last,
            );
            lens[s] += 1;
        }
        if step % 2 == 0 {
            model
                .forward_greedy(
                    backend,
                    batch,
                    &mut cache,
                    &mut ws,
                    AttentionPath::Auto,
                    &mut next,
                )
                .unwrap();
        } else {
            // The sampling path: full logits rows, then the host's argmax.
            model
                .forward(
                    backend,
                    batch,
                    &mut cache,
                    &mut ws,
                    AttentionPath::Auto,
                    &mut logits,
                )
                .unwrap();
            for (s, row) in logits.chunks(model.config.vocab_size).enumerate() {
                next[s] = dsv2_cpu::kernels::argmax(row);
            }
        }
        generated.extend_from_slice(&next);
    }
    COUNTING.store(false, Ordering::SeqCst);
    (ALLOCATIONS.load(Ordering::SeqCst), generated)
}

#[test]
fn decode_steps_make_no_allocation_once_warm() {
    TRACE.store(
        std::env::var_os("NO_ALLOC_TRACE").is_some(),
        Ordering::SeqCst,
    );
    let config = builtin_config();
    let checkpoint = synthetic_checkpoint(&config, 3, DType::BF16);
    for (label, quantize) in [
        ("bf16", None),
        ("q8", Some(QuantFormat::Q8)),
        ("q4", Some(QuantFormat::Q4)),
    ] {
        for dtype in [ComputeDtype::F32, ComputeDtype::Bf16] {
            let backend = CpuBackend::new(dtype);
            let model = Model::load_with(
                &backend,
                config.clone(),
                &checkpoint,
                &LoadOptions { quantize },
            )
            .unwrap();
            // Run the whole pass inside the thread pool, as the engine thread does, so
            // no work is injected into the pool from outside it.
            let (first, (allocations, second)) = rayon::scope(|_| {
                // One batch for both runs, as the engine keeps one across steps.
                let mut batch = Batch::default();
                let (_, first) = prefill_and_decode(&backend, &model, &mut batch, false);
                (
                    first,
                    prefill_and_decode(&backend, &model, &mut batch, true),
                )
            });
            assert_eq!(first, second, "{label} {dtype:?}: the two runs agree");
            assert_eq!(
                allocations, 0,
                "{label} {dtype:?}: allocations in {DECODE_STEPS} warm decode steps"
            );
        }
    }
}
