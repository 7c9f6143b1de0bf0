//! DeepSeek-V2-Lite shapes with random bf16 weights on one GPU: loads the model (31 GB),
//! sizes the latent cache from the free device memory, prefills 64 prompts and times
//! greedy decode steps at batch 64 and batch 1.
//!
//! First, unless COMPARE is 0, the same weights also run in f32 (63 GB more) and the
//! logits of one 64-token prompt are compared: how far bf16 compute lands from f32 at
//! the real dimensions.
//!
//! A first reading and a check that the model plus a large cache fit, not the benchmark
//! (that is `dsv2 bench`). Usage: `lite-bench [PROMPT_LEN] [DECODE_STEPS] [COMPARE]`.

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::{expected_tensors, Checkpoint, DType, ModelConfig, TensorView};
use dsv2_cuda::CudaBackend;
use dsv2_model::Model;
use half::bf16;

const BLOCK: usize = 64;
const BATCH: usize = 64;
/// Prompts per prefill step.
const PREFILL_SEQS: usize = 8;
const GIB: f64 = (1u64 << 30) as f64;

/// One random bf16 tensor per distinct shape, shared by every tensor of that shape (the
/// values do not matter for speed; sharing keeps host memory and start-up small).
fn random_checkpoint(config: &ModelConfig) -> Checkpoint {
    let mut by_shape: HashMap<Vec<usize>, TensorView> = HashMap::new();
    let mut seed = 0x5EEDu64;
    let tensors = expected_tensors(config)
        .into_iter()
        .map(|t| {
            let base = by_shape.entry(t.shape.clone()).or_insert_with(|| {
                seed += 1;
                let n: usize = t.shape.iter().product();
                let scale = match t.shape.as_slice() {
                    [_] => 0.0,
                    [_, fan_in] => (3.0 / *fan_in as f32).sqrt(),
                    _ => 1.0,
                };
                let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let bytes = (0..n)
                    .flat_map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let u = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                        let v = if scale == 0.0 {
                            1.0 + 0.1 * u
                        } else {
                            u * scale
                        };
                        bf16::from_f32(v).to_bits().to_le_bytes()
                    })
                    .collect();
                TensorView::owned(&t.name, DType::BF16, t.shape.clone(), bytes)
            });
            let mut v = base.clone();
            v.name = t.name.clone();
            v
        })
        .collect();
    Checkpoint::from_tensors("<random V2-Lite weights>", tensors)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let prompt_len = args.first().copied().unwrap_or(512);
    let steps = args.get(1).copied().unwrap_or(32);
    let compare = args.get(2).copied().unwrap_or(1) != 0;
    let config = ModelConfig::from_json_str(include_str!(
        "../../dsv2-core/testdata/deepseek-v2-lite-config.json"
    ))?;
    let vocab = config.vocab_size as u32;
    let backend = CudaBackend::new(0, ComputeDtype::Bf16)?;
    println!("{}", backend.describe());
    let before = backend.memory_info()?;
    let t0 = Instant::now();
    let checkpoint = random_checkpoint(&config);
    let model = Model::load(&backend, config.clone(), &checkpoint)?;
    backend.synchronize()?;
    let loaded = backend.memory_info()?;
    println!(
        "weights: {:.2} GiB on the device, loaded in {:.1} s; {:.1} of {:.1} GiB free",
        (before.free - loaded.free) as f64 / GIB,
        t0.elapsed().as_secs_f64(),
        loaded.free as f64 / GIB,
        loaded.total as f64 / GIB
    );
    if compare {
        compare_with_f32(&backend, &model, config, &checkpoint)?;
    }
    drop(checkpoint);
    let max_len = prompt_len + steps + 1;
    let blocks_per_seq = max_len.div_ceil(BLOCK);
    let prompt = |i: usize| -> Vec<u32> {
        (0..prompt_len as u32)
            .map(|j| (j * 7919 + i as u32 * 104_729) % vocab)
            .collect()
    };
    let table = |i: usize| -> Vec<u32> {
        (0..blocks_per_seq)
            .map(|b| (i * blocks_per_seq + b) as u32)
            .collect()
    };
    let mut ws = model.workspace(&backend, PREFILL_SEQS * prompt_len)?;
    // Warm-up with a small cache: the largest prefill and decode steps grow the work
    // buffers to their final sizes before the cache takes the free memory.
    {
        let mut cache = backend.alloc_cache(model.cache_spec(BATCH * blocks_per_seq, BLOCK))?;
        run_prefill(
            &backend,
            &model,
            &mut cache,
            &mut ws,
            &prompt,
            &table,
            PREFILL_SEQS,
        )?;
        decode(
            &backend, &model, &mut cache, &mut ws, &table, BATCH, prompt_len, 1,
        )?;
    }
    let free = backend.memory_info()?.free;
    let spec1 = model.cache_spec(1, BLOCK);
    let block_bytes = backend.cache_bytes_per_token(&spec1) * BLOCK * spec1.num_layers;
    let margin = 1usize << 30;
    let num_blocks = free.saturating_sub(margin) / block_bytes;
    let t1 = Instant::now();
    let mut cache = backend.alloc_cache(model.cache_spec(num_blocks, BLOCK))?;
    backend.synchronize()?;
    println!(
        "latent cache: {num_blocks} blocks of {BLOCK} tokens = {} tokens ({:.1} GiB, {} B/token), allocated in {:.1} s; {:.2} GiB left free",
        num_blocks * BLOCK,
        (num_blocks * block_bytes) as f64 / GIB,
        block_bytes / BLOCK,
        t1.elapsed().as_secs_f64(),
        backend.memory_info()?.free as f64 / GIB
    );
    let t = Instant::now();
    run_prefill(
        &backend, &model, &mut cache, &mut ws, &prompt, &table, BATCH,
    )?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "prefill: {BATCH} x {prompt_len} tokens in {secs:.2} s = {:.0} tokens/s",
        (BATCH * prompt_len) as f64 / secs
    );
    for batch in [BATCH, 1] {
        let secs = decode(
            &backend, &model, &mut cache, &mut ws, &table, batch, prompt_len, steps,
        )?;
        println!(
            "decode: batch {batch}, context {prompt_len}..{}: {:.2} ms/step = {:.0} tokens/s",
            prompt_len + steps,
            1e3 * secs / steps as f64,
            (batch * steps) as f64 / secs
        );
    }
    Ok(())
}

/// Logits of every position of a 64-token prompt, bf16 model against the same weights in
/// f32 (loaded here and freed afterwards).
fn compare_with_f32(
    be16: &CudaBackend,
    m16: &Model<CudaBackend>,
    config: ModelConfig,
    checkpoint: &Checkpoint,
) -> Result<(), Box<dyn Error>> {
    let t = Instant::now();
    let be32 = CudaBackend::new(0, ComputeDtype::F32)?;
    let m32 = Model::load(&be32, config, checkpoint)?;
    be32.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    let vocab = m16.config.vocab_size;
    let prompt: Vec<u32> = (0..64u32).map(|j| (j * 7919 + 17) % vocab as u32).collect();
    let l16 = all_logits(be16, m16, &prompt)?;
    let l32 = all_logits(&be32, &m32, &prompt)?;
    let num: f64 = l16
        .iter()
        .zip(&l32)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = l32.iter().map(|b| (*b as f64).powi(2)).sum();
    let argmax = |x: &[f32]| {
        x.iter()
            .enumerate()
            .fold(0, |best, (i, &v)| if v > x[best] { i } else { best })
    };
    let agree = (0..prompt.len())
        .filter(|&r| {
            argmax(&l16[r * vocab..(r + 1) * vocab]) == argmax(&l32[r * vocab..(r + 1) * vocab])
        })
        .count();
    println!(
        "bf16 vs f32 compute (V2-Lite shapes, random weights, 64 positions): rel err {:.3e}, argmax {agree}/64 (f32 model loaded in {load_s:.1} s)",
        (num / den).sqrt()
    );
    Ok(())
}

fn all_logits<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompt: &[u32],
) -> Result<Vec<f32>, Box<dyn Error>> {
    let table: Vec<u32> = (0..prompt.len().div_ceil(BLOCK) as u32).collect();
    let mut cache = be.alloc_cache(model.cache_spec(table.len(), BLOCK))?;
    let mut ws = model.workspace(be, prompt.len())?;
    let mut batch = Batch::default();
    batch.push_seq(prompt, 0, &table, BLOCK, LogitsWanted::All);
    let mut out = vec![0.0; prompt.len() * model.config.vocab_size];
    model.forward(
        be,
        &batch,
        &mut cache,
        &mut ws,
        AttentionPath::Auto,
        &mut out,
    )?;
    Ok(out)
}

type Ws = dsv2_model::Workspace<CudaBackend>;

fn run_prefill(
    be: &CudaBackend,
    model: &Model<CudaBackend>,
    cache: &mut dsv2_cuda::CudaCache,
    ws: &mut Ws,
    prompt: &dyn Fn(usize) -> Vec<u32>,
    table: &dyn Fn(usize) -> Vec<u32>,
    seqs: usize,
) -> Result<(), Box<dyn Error>> {
    let mut ids = vec![0u32; PREFILL_SEQS];
    for chunk in (0..seqs).collect::<Vec<_>>().chunks(PREFILL_SEQS) {
        let mut batch = Batch::default();
        for &i in chunk {
            batch.push_seq(&prompt(i), 0, &table(i), BLOCK, LogitsWanted::Last);
        }
        model.forward_greedy(be, &batch, cache, ws, AttentionPath::Auto, &mut ids)?;
    }
    Ok(())
}

/// `steps` greedy decode steps of sequences 0..batch (each at context `past`, growing);
/// returns the seconds they took.
#[allow(clippy::too_many_arguments)]
fn decode(
    be: &CudaBackend,
    model: &Model<CudaBackend>,
    cache: &mut dsv2_cuda::CudaCache,
    ws: &mut Ws,
    table: &dyn Fn(usize) -> Vec<u32>,
    batch_size: usize,
    past: usize,
    steps: usize,
) -> Result<f64, Box<dyn Error>> {
    let tables: Vec<Vec<u32>> = (0..batch_size).map(table).collect();
    let mut next = vec![1u32; batch_size];
    let mut batch = Batch::default();
    let t = Instant::now();
    for s in 0..steps {
        batch.clear();
        for (i, tb) in tables.iter().enumerate() {
            batch.push_seq(&[next[i]], past + s, tb, BLOCK, LogitsWanted::Last);
        }
        model.forward_greedy(be, &batch, cache, ws, AttentionPath::Auto, &mut next)?;
    }
    Ok(t.elapsed().as_secs_f64())
}
