//! `dsv2 bench`: load time, prefill and decode speed, peak memory, latent-cache size and
//! the fraction of the memory-bandwidth floor a decode step reaches, on a checkpoint or
//! on random weights of a real model's exact shapes (made in memory, so the real cost of
//! the format is measured without a checkpoint on disk).
//!
//! Decode at context `C`: every sequence's first `C` cache slots are filled cheaply
//! ([`Model::write_latents`]: one `kv_a_proj_with_mqa` product per layer instead of a
//! full prefill; attention costs the same whatever the cached values), three untimed
//! steps run (where a backend captures its step graphs), then `--decode-tokens` steps of
//! the whole batch are timed. The floor of a step is the bytes it must read
//! ([`floor::decode_step_bytes`]) over the read bandwidth measured in the same run: on a
//! GPU the backend's copy bandwidth ([`Backend::measure_read_bandwidth`]); on the CPU,
//! whose host bandwidth drifts within seconds, the best of one read pass of a probe
//! buffer before the first timed step and after each one ([`ReadProbe`]), so the floor
//! follows the bandwidth of the moments the steps ran. Best-of-8 probes before the load
//! and around every row are in the JSON too.

mod floor;
mod weights;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use dsv2_backend::{AttentionPath, Backend, Batch, LogitsWanted, PeakRate};
use dsv2_core::{expected_tensors, DType, ModelConfig};
use dsv2_cpu::bandwidth::ReadProbe;
use dsv2_cpu::team::{self, LoopProfile};
use dsv2_model::{Model, Workspace};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::load::{self, ModelInfo, ModelTask};
use crate::ModelArgs;
use floor::{decode_step_bytes, expected_distinct_experts, DecodeStep};
use weights::{parse_weights_dtype, random_config, RandomWeights, Stored, WeightSource};

/// Tokens the cache is filled with per [`Model::write_latents`] call, at most.
const FILL_CHUNK: usize = 512;
/// Tokens of the untimed prompt that runs before anything is timed.
const WARMUP_TOKENS: usize = 32;
/// Untimed decode steps before each decode row's timed ones: a backend that captures a
/// step graph per batch shape (CUDA) does so in these, a one-time cost per shape that a
/// server pays once, not per token.
const WARMUP_STEPS: usize = 3;

/// Runs of the decode attention kernels averaged per decode row (where timed).
const ATTENTION_REPS: usize = 20;

/// Options of `dsv2 bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Random weights of a model's exact shapes, made in memory instead of read from a
    /// checkpoint: `deepseek-v2-lite`, `deepseek-v2` or the path of a config.json.
    #[arg(long, value_name = "NAME|CONFIG", conflicts_with = "model")]
    random_weights: Option<String>,
    /// Storage of the random weights: bf16 (default), f16 or f32.
    #[arg(long, value_name = "DTYPE", value_parser = parse_weights_dtype)]
    weights_dtype: Option<DType>,
    /// Keep only the first N layers of the random-weights config (to fit in memory).
    #[arg(long, value_name = "N")]
    num_layers: Option<usize>,
    /// Prompt lengths of the prefill rows (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    prompt_lengths: Vec<usize>,
    /// Prompts prefilled together in each prefill step (all of the row's length).
    #[arg(long, default_value_t = 1)]
    prefill_batch: usize,
    /// Times each prefill row runs; the median is reported.
    #[arg(long, default_value_t = 1)]
    prefill_runs: usize,
    /// Peak dense matrix rate of the device, TFLOP/s, for the prefill's MFU (default: the
    /// backend's: on the CPU measured in the run on the instruction the prefill uses, on
    /// an H100/H200 the datasheet's dense figure for the dtype).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Cached tokens per sequence before the timed decode steps (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1024,4096")]
    contexts: Vec<usize>,
    /// Sequences decoded together (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// Timed decode steps per (batch size, context) row.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Print one JSON object with every figure as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Time the CPU thread team's parallel loops in the decode steps and report, per
    /// decode row, where a step's time went: loops, their threads' busy share, the
    /// stretches between loops (CPU only; adds two clock reads a task).
    #[arg(long)]
    loop_profile: bool,
}

/// Runs `dsv2 bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    // The host's read bandwidth varies with what else runs on it: on the CPU it is
    // probed before the load too (with nothing else resident) and the higher of the two
    // probes sets the floor, so a dip at the end cannot flatter the fractions.
    let bandwidth_before_load = (args.model.device == load::Device::Cpu)
        .then(|| dsv2_cpu::bandwidth::measure_read_bandwidth(dsv2_cpu::bandwidth::buffer_bytes()));
    let started = Instant::now();

    let (label, config, source) = open_source(&args)?;
    if args.model.device == load::Device::Cpu {
        let held = |n: &str| source.held(n);
        crate::memory::check_before_load(&label, &config, held, args.model.quantize, 0)?;
    }
    check_grid(&args, &config)?;
    load::check_activation_terms(&args.model, &label, source.quantized(&config))?;
    let weight_bytes: usize = expected_tensors(&config)
        .iter()
        .map(|t| source.tensor_bytes(t))
        .sum();
    let params: usize = expected_tensors(&config)
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let dtypes = source.dtype_label(&config);
    let heading = format!(
        "{label}: {} layers, {} parameters, {} of {dtypes} weights",
        config.num_hidden_layers,
        si(params as f64, ""),
        si(weight_bytes as f64, "B"),
    );
    eprintln!("dsv2 bench: {heading}");
    let task = BenchTask {
        args: &args,
        source: &source,
        started,
        loading: source.progress(),
        bandwidth_before_load,
    };
    // The bench reads no tokenizer or generation config, whatever the source.
    let info = ModelInfo {
        dir: None,
        config,
        generation_config: None,
    };
    let weight = |name: &str| source.weight(name);
    let report = load::with_weights(&args.model, info, &label, weight, task)?;
    report.print_table(&heading);
    if args.json {
        println!("{}", report.to_json(&label, &dtypes, params, weight_bytes));
    }
    Ok(())
}

/// The model's config and where its weights come from, with a label for reports.
fn open_source(args: &BenchArgs) -> Result<(String, ModelConfig, WeightSource)> {
    match (&args.model.model, &args.random_weights) {
        (Some(spec), None) => {
            if args.weights_dtype.is_some() || args.num_layers.is_some() {
                bail!("--weights-dtype and --num-layers apply to --random-weights only");
            }
            let dir = load::resolve(Some(spec))?.context("--model names no folder")?;
            let (config, checkpoint, _) = load::open_folder(&dir)?;
            let stored = Stored::Checkpoint(checkpoint);
            let source = WeightSource::new(stored, &config, args.model.quantize)?;
            Ok((dir.display().to_string(), config, source))
        }
        (None, Some(spec)) => {
            let (label, config) = random_config(spec, args.num_layers)?;
            let dtype = args.weights_dtype.clone().unwrap_or(DType::BF16);
            let random = RandomWeights::new(&config, dtype, bytes_bar("generating weights"));
            let source = WeightSource::new(Stored::Random(random), &config, args.model.quantize)?;
            Ok((label, config, source))
        }
        _ => bail!(
            "dsv2 bench needs --model DIR or --random-weights deepseek-v2-lite|deepseek-v2|CONFIG"
        ),
    }
}

/// Checks the grid against itself and against the model's context length.
fn check_grid(args: &BenchArgs, config: &ModelConfig) -> Result<()> {
    ensure!(
        args.prompt_lengths.iter().all(|&p| p > 0),
        "--prompt-lengths must be positive"
    );
    ensure!(
        args.batch_sizes.iter().all(|&b| b > 0),
        "--batch-sizes must be positive"
    );
    ensure!(args.decode_tokens > 0, "--decode-tokens must be positive");
    ensure!(
        !args.loop_profile || args.model.device == load::Device::Cpu,
        "--loop-profile times the CPU backend's thread team: it needs --device cpu"
    );
    ensure!(args.prefill_batch > 0, "--prefill-batch must be positive");
    ensure!(args.prefill_runs > 0, "--prefill-runs must be positive");
    ensure!(
        args.peak_tflops.is_none_or(|p| p > 0.0),
        "--peak-tflops must be positive"
    );
    let max_pos = config.max_position_embeddings;
    let longest_prompt = args.prompt_lengths.iter().max().copied().unwrap_or(0);
    ensure!(
        longest_prompt <= max_pos,
        "a prompt of {longest_prompt} tokens exceeds max_position_embeddings ({max_pos})"
    );
    let last_position = max_of(&args.contexts) + WARMUP_STEPS + args.decode_tokens;
    ensure!(
        last_position < max_pos,
        "context {} plus {} decode steps reaches position {last_position}, past \
         max_position_embeddings ({max_pos})",
        max_of(&args.contexts),
        args.decode_tokens
    );
    Ok(())
}

fn max_of(values: &[usize]) -> usize {
    values.iter().max().copied().unwrap_or(0)
}

/// The benchmark, run once the model is loaded on the chosen backend.
struct BenchTask<'a> {
    args: &'a BenchArgs,
    source: &'a WeightSource,
    started: Instant,
    loading: ProgressBar,
    /// The CPU's read bandwidth probed before the load (bytes per second).
    bandwidth_before_load: Option<f64>,
}

impl ModelTask for BenchTask<'_> {
    type Output = Report;

    fn run<B: Backend>(self, backend: &B, model: &Model<B>, _info: &ModelInfo) -> Result<Report> {
        let load_s = self.started.elapsed().as_secs_f64();
        // The high-water mark of the load: the model resident, before any step's scratch
        // or cache (the grid's largest prompt and contexts add to the run's peak).
        let load_rss_bytes = peak_rss_bytes();
        self.loading.finish_and_clear();
        let args = self.args;
        let kv_bytes_per_token = model
            .cache_spec(1, dsv2_engine::BLOCK_SIZE)
            .bytes_per_token(backend.cache_value_bytes());
        let quantized = self.source.quantized(&model.config);
        let peak = match args.peak_tflops {
            Some(tflops) => Some(PeakRate {
                flops_per_s: tflops * 1e12,
                basis: "--peak-tflops".into(),
            }),
            None => backend.peak_matrix_rate(quantized)?,
        };
        let mut runner = Runner::new(backend, model, args)?;
        let rows = args.prompt_lengths.len() + args.contexts.len() * args.batch_sizes.len();
        let bar = rows_bar(rows as u64);
        bar.set_message(format!("warm-up ({WARMUP_TOKENS}-token prompt)"));
        runner.prefill(WARMUP_TOKENS.min(runner.tokens.len()), 1)?;

        let mut prefill = Vec::new();
        for &len in &args.prompt_lengths {
            bar.set_message(format!("prefill of {len} tokens"));
            let mut runs = (0..args.prefill_runs)
                .map(|_| runner.prefill(len, args.prefill_batch))
                .collect::<Result<Vec<f64>>>()?;
            runs.sort_by(f64::total_cmp);
            let seconds = runs[runs.len() / 2];
            prefill.push(PrefillRow {
                prompt_tokens: len,
                prompts: args.prefill_batch,
                seconds,
                flops: args.prefill_batch as f64 * floor::prefill_flops(&model.config, len),
            });
            bar.inc(1);
        }
        // A host that takes a core away while the peak is measured halves it (seen on a
        // shared VM: MFU above 100%), so a measured peak is the better of one before the
        // prefill rows and one after.
        let peak = match peak {
            Some(before) if args.peak_tflops.is_none() && !prefill.is_empty() => {
                match backend.peak_matrix_rate(quantized)? {
                    Some(after) if after.flops_per_s > before.flops_per_s => Some(after),
                    _ => Some(before),
                }
            }
            peak => peak,
        };

        let max_batch = max_of(&args.batch_sizes);
        let max_context = max_of(&args.contexts);
        bar.set_message(format!(
            "filling {max_batch} contexts of {max_context} tokens"
        ));
        runner.fill_contexts(max_batch, max_context)?;
        // On the CPU the host's bandwidth drifts by tens of percent within seconds (other
        // tenants of the machine). Each decode row is bracketed by best-of probes, and
        // one read pass of the same probe buffer runs before the first timed step and
        // after every one: the row's floor is the best of those passes, the best the
        // host gave while the row ran (single passes dip often; decode steps, 5-10
        // times longer, average their dips out). The probe's buffer is not counted in the peak
        // RSS: it is resident from its allocation to its drop, so the rest of the
        // process peaked at the high-water mark minus its size.
        let mut probes = Probes {
            peak_rss: peak_rss_bytes(),
            values: self.bandwidth_before_load.into_iter().collect(),
            round_trips_ns: Vec::new(),
        };
        let mut read_probe = if self.bandwidth_before_load.is_some() {
            bar.set_message("measuring the read bandwidth");
            Some(ReadProbe::new(dsv2_cpu::bandwidth::buffer_bytes()))
        } else {
            None
        };
        if let Some(read_probe) = &mut read_probe {
            probes.values.push(read_probe.best_of(PROBE_PASSES));
            probes
                .round_trips_ns
                .extend(dsv2_cpu::bandwidth::core_round_trip_ns());
        }
        let mut decode = Vec::new();
        for &context in &args.contexts {
            for &batch in &args.batch_sizes {
                bar.set_message(format!("decode: batch {batch}, context {context}"));
                let measured = runner.decode(
                    batch,
                    context,
                    args.decode_tokens,
                    read_probe.as_mut(),
                    args.loop_profile,
                )?;
                let (bandwidth, bracket) = match &mut read_probe {
                    Some(read_probe) => {
                        let before = *probes.values.last().expect("probed before the rows");
                        let after = read_probe.best_of(PROBE_PASSES);
                        probes.values.push(after);
                        probes
                            .round_trips_ns
                            .extend(dsv2_cpu::bandwidth::core_round_trip_ns());
                        (Some(best(&measured.probes)), Some(before.max(after)))
                    }
                    None => (None, None),
                };
                // The attention kernel alone over the cache the last timed step read.
                let attn_position = context + WARMUP_STEPS + args.decode_tokens - 1;
                let attention_s = runner.attention_seconds(batch, attn_position)?;
                let attention_bytes = (batch * (attn_position + 1) * kv_bytes_per_token) as f64
                    / model.config.num_hidden_layers as f64;
                // Routed experts a MoE layer read per step: counted by the backend where
                // it can, else what uniform routing would give.
                let uniform = model.config.moe.as_ref().map_or(0.0, |moe| {
                    expected_distinct_experts(batch, moe.num_experts_per_tok, moe.n_routed_experts)
                });
                let moe_layers = (0..model.config.num_hidden_layers)
                    .filter(|&i| model.config.is_moe_layer(i))
                    .count();
                let counted = measured
                    .routed_experts
                    .filter(|_| moe_layers > 0)
                    .map(|n| n as f64 / (moe_layers * args.decode_tokens) as f64);
                let bytes_per_step = mean_step_bytes(
                    &model.config,
                    self.source,
                    kv_bytes_per_token,
                    batch,
                    context,
                    args.decode_tokens,
                    counted.unwrap_or(uniform),
                );
                decode.push(DecodeRow {
                    batch,
                    context,
                    steps: args.decode_tokens,
                    seconds: measured.seconds,
                    bytes_per_step,
                    attention_s,
                    attention_bytes,
                    bandwidth,
                    step_probes: measured.probes,
                    step_seconds: measured.step_seconds,
                    bracket_bandwidth: bracket,
                    routed_experts: counted.unwrap_or(uniform),
                    routed_experts_counted: counted.is_some(),
                    routed_experts_uniform: uniform,
                    loops: measured.loops,
                });
                bar.inc(1);
            }
        }
        let peak_rss_bytes = match read_probe {
            Some(read_probe) => {
                let probe_bytes = read_probe.bytes() as u64;
                let during = peak_rss_bytes().map(|hwm| hwm.saturating_sub(probe_bytes));
                drop(read_probe);
                probes.peak_rss.max(during)
            }
            None => {
                // The peak RSS is read before the probe allocates its buffer.
                bar.set_message("measuring the read bandwidth");
                probes.probe(backend)?;
                probes.peak_rss
            }
        };
        let round_trips_ns = probes.round_trips_ns;
        let probes = probes.values;
        let bandwidth = probes.iter().copied().fold(0.0, f64::max);
        bar.finish_and_clear();
        Ok(Report {
            device: backend.describe(),
            load_s,
            load_rss_bytes,
            peak_rss_bytes,
            kv_bytes_per_token,
            bandwidth,
            bandwidth_probes: probes,
            round_trips_ns,
            peak,
            prefill,
            decode,
        })
    }
}

/// Mean bytes a timed decode step reads, each MoE layer reading `distinct_experts`
/// routed experts: step `i` (0-based, after the untimed ones) of each sequence attends
/// over `context + WARMUP_STEPS + i + 1` cached tokens.
fn mean_step_bytes(
    config: &ModelConfig,
    source: &WeightSource,
    kv_bytes_per_token: usize,
    batch: usize,
    context: usize,
    steps: usize,
    distinct_experts: f64,
) -> f64 {
    let total: f64 = (0..steps)
        .map(|i| {
            let step = DecodeStep {
                batch,
                cache_tokens: batch * (context + WARMUP_STEPS + i + 1),
                distinct_experts,
            };
            decode_step_bytes(config, &step, kv_bytes_per_token, |t| {
                source.tensor_bytes(t) as f64
            })
            .total()
        })
        .sum();
    total / steps as f64
}

/// The cache, buffers and block tables the rows share.
struct Runner<'m, B: Backend> {
    backend: &'m B,
    model: &'m Model<B>,
    path: AttentionPath,
    cache: B::Cache,
    ws: Workspace<B>,
    batch: Batch,
    block_size: usize,
    /// Block tables of the prefill rows' sequences (disjoint).
    prompt_tables: Vec<Vec<u32>>,
    /// Block tables of the decode rows' sequences (disjoint).
    seq_tables: Vec<Vec<u32>>,
    /// Token ids of prompts and filled contexts.
    tokens: Vec<u32>,
}

impl<'m, B: Backend> Runner<'m, B> {
    fn new(backend: &'m B, model: &'m Model<B>, args: &BenchArgs) -> Result<Self> {
        let block_size = dsv2_engine::BLOCK_SIZE;
        let max_prompt = max_of(&args.prompt_lengths).max(WARMUP_TOKENS);
        let max_context = max_of(&args.contexts);
        let max_batch = max_of(&args.batch_sizes);
        // Positions context .. context + warm-up + steps (untimed steps, then timed ones).
        let blocks_per_seq = (max_context + WARMUP_STEPS + args.decode_tokens).div_ceil(block_size);
        let prompt_blocks = max_prompt.div_ceil(block_size);
        let prompts = args.prefill_batch;
        let num_blocks = (max_batch * blocks_per_seq).max(prompts * prompt_blocks);
        let cache = backend.alloc_cache(model.cache_spec(num_blocks, block_size))?;
        let capacity = (prompts * max_prompt)
            .max(max_batch)
            .max(max_context.min(FILL_CHUNK));
        let ws = model.workspace(backend, capacity)?;
        let seq_tables = (0..max_batch)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let vocab = model.config.vocab_size;
        Ok(Runner {
            backend,
            model,
            path: args.model.attention,
            cache,
            ws,
            batch: Batch::default(),
            block_size,
            prompt_tables: (0..prompts)
                .map(|p| ((p * prompt_blocks) as u32..((p + 1) * prompt_blocks) as u32).collect())
                .collect(),
            seq_tables,
            tokens: (0..max_prompt.max(max_context))
                .map(|i| token_id(i, vocab))
                .collect(),
        })
    }

    /// Runs `prompts` prompts of `len` tokens each, in one step, from an empty cache;
    /// returns its seconds.
    fn prefill(&mut self, len: usize, prompts: usize) -> Result<f64> {
        self.batch.clear();
        for table in &self.prompt_tables[..prompts] {
            self.batch.push_seq(
                &self.tokens[..len],
                0,
                table,
                self.block_size,
                LogitsWanted::Last,
            );
        }
        let mut next = vec![0u32; prompts];
        let started = Instant::now();
        self.model.forward_greedy(
            self.backend,
            &self.batch,
            &mut self.cache,
            &mut self.ws,
            self.path,
            &mut next,
        )?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Fills the first `context` slots of the first `num_seqs` sequences.
    fn fill_contexts(&mut self, num_seqs: usize, context: usize) -> Result<()> {
        let chunk = self.ws.capacity();
        for table in &self.seq_tables[..num_seqs] {
            for start in (0..context).step_by(chunk) {
                let len = chunk.min(context - start);
                self.batch.clear();
                self.batch.push_seq(
                    &self.tokens[start..start + len],
                    start,
                    table,
                    self.block_size,
                    LogitsWanted::None,
                );
                self.model.write_latents(
                    self.backend,
                    &self.batch,
                    &mut self.cache,
                    &mut self.ws,
                )?;
            }
        }
        Ok(())
    }

    /// Decodes `steps` timed tokens for each of `batch` sequences holding `context`
    /// cached tokens, after [`WARMUP_STEPS`] untimed steps. With a probe, one read pass
    /// of it runs before the first timed step and after each one (not timed as steps).
    fn decode(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
        mut probe: Option<&mut ReadProbe>,
        loop_profile: bool,
    ) -> Result<DecodeTiming> {
        let vocab = self.model.config.vocab_size;
        let mut next: Vec<u32> = (0..batch).map(|s| token_id(context + s, vocab)).collect();
        let mut out = vec![0u32; batch];
        for i in 0..WARMUP_STEPS {
            self.decode_step(context + i, &mut next, &mut out)?;
        }
        let mut probes = Vec::with_capacity(steps + 1);
        if let Some(probe) = probe.as_deref_mut() {
            probes.push(probe.pass());
        }
        let mut step_seconds = Vec::with_capacity(steps);
        let experts_before = self.backend.routed_experts_run();
        let mut loops = loop_profile.then(LoopProfile::default);
        for i in 0..steps {
            if loops.is_some() {
                team::profile_start();
            }
            let started = Instant::now();
            self.decode_step(context + WARMUP_STEPS + i, &mut next, &mut out)?;
            step_seconds.push(started.elapsed().as_secs_f64());
            if let Some(loops) = &mut loops {
                *loops += team::profile_take();
            }
            if let Some(probe) = probe.as_deref_mut() {
                probes.push(probe.pass());
            }
        }
        let routed_experts = match (experts_before, self.backend.routed_experts_run()) {
            (Some(before), Some(after)) => Some(after - before),
            _ => None,
        };
        Ok(DecodeTiming {
            seconds: step_seconds.iter().sum(),
            step_seconds,
            probes,
            routed_experts,
            loops,
        })
    }

    /// Seconds of the decode attention kernels alone (one layer, averaged over several
    /// runs) for `batch` sequences whose token at `position` is cached, where the backend
    /// times them.
    fn attention_seconds(&mut self, batch: usize, position: usize) -> Result<Option<f64>> {
        self.batch.clear();
        let vocab = self.model.config.vocab_size;
        for s in 0..batch {
            self.batch.push_seq(
                &[token_id(position + s, vocab)],
                position,
                &self.seq_tables[s],
                self.block_size,
                LogitsWanted::None,
            );
        }
        Ok(self.model.time_decode_attention(
            self.backend,
            &self.batch,
            &self.cache,
            &mut self.ws,
            ATTENTION_REPS,
        )?)
    }

    /// One decode step of `next.len()` sequences at `position`; their greedy tokens are
    /// fed back as the next step's input.
    fn decode_step(&mut self, position: usize, next: &mut [u32], out: &mut [u32]) -> Result<()> {
        self.batch.clear();
        for (s, token) in next.iter().enumerate() {
            self.batch.push_seq(
                std::slice::from_ref(token),
                position,
                &self.seq_tables[s],
                self.block_size,
                LogitsWanted::Last,
            );
        }
        self.model.forward_greedy(
            self.backend,
            &self.batch,
            &mut self.cache,
            &mut self.ws,
            self.path,
            out,
        )?;
        next.copy_from_slice(out);
        Ok(())
    }
}

/// A deterministic, well-spread token id for position `i`.
fn token_id(i: usize, vocab: usize) -> u32 {
    let h = (i as u64 ^ 0x5DEE_CE66).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) % vocab as u64) as u32
}

/// One prefill measurement.
struct PrefillRow {
    prompt_tokens: usize,
    /// Prompts of `prompt_tokens` in the step.
    prompts: usize,
    seconds: f64,
    /// Model FLOPs of the step ([`floor::prefill_flops`]).
    flops: f64,
}

impl PrefillRow {
    fn tokens_per_s(&self) -> f64 {
        (self.prompt_tokens * self.prompts) as f64 / self.seconds
    }

    fn flops_per_s(&self) -> f64 {
        self.flops / self.seconds
    }
}

/// The timed steps of one decode row.
struct DecodeTiming {
    /// Seconds of the timed steps (probe passes excluded).
    seconds: f64,
    /// Seconds of each timed step.
    step_seconds: Vec<f64>,
    /// Read bandwidth of each probe pass between the steps, bytes per second.
    probes: Vec<f64>,
    /// Routed experts the timed steps ran, summed over MoE layers
    /// (`Backend::routed_experts_run`), where the backend counts them.
    routed_experts: Option<u64>,
    /// The thread team's loops over the timed steps (`--loop-profile`).
    loops: Option<LoopProfile>,
}

/// One decode measurement.
struct DecodeRow {
    batch: usize,
    context: usize,
    steps: usize,
    seconds: f64,
    /// Mean bytes a timed step must read (weights touched and latent cache).
    bytes_per_step: f64,
    /// Seconds of one layer's decode attention kernels alone over the cache of the last
    /// timed step (`Model::time_decode_attention`), where the backend times them.
    attention_s: Option<f64>,
    /// The cache bytes that attention reads (one layer's latents of every sequence).
    attention_bytes: f64,
    /// The read bandwidth of this row's floor where probe passes ran between its steps
    /// (the best of them); else the run's.
    bandwidth: Option<f64>,
    /// The probe passes between the steps, bytes per second.
    step_probes: Vec<f64>,
    /// Seconds of each timed step.
    step_seconds: Vec<f64>,
    /// The higher of the best-of probes just before and after the row, where they ran.
    bracket_bandwidth: Option<f64>,
    /// Distinct routed experts a MoE layer ran per timed step (in `bytes_per_step`).
    routed_experts: f64,
    /// Whether `routed_experts` was counted by the backend (else it is the uniform one).
    routed_experts_counted: bool,
    /// What uniform routing would give ([`expected_distinct_experts`]).
    routed_experts_uniform: f64,
    /// The thread team's loops over the timed steps (`--loop-profile`).
    loops: Option<LoopProfile>,
}

impl DecodeRow {
    fn tokens_per_s(&self) -> f64 {
        (self.batch * self.steps) as f64 / self.seconds
    }

    fn step_s(&self) -> f64 {
        self.seconds / self.steps as f64
    }

    /// Tokens per second if every step took exactly its bytes over `bandwidth`.
    fn floor_tokens_per_s(&self, bandwidth: f64) -> f64 {
        self.batch as f64 * bandwidth / self.bytes_per_step
    }

    /// Fraction of the floor reached: achieved read rate over `bandwidth`.
    fn bandwidth_fraction(&self, bandwidth: f64) -> f64 {
        self.bytes_per_step / self.step_s() / bandwidth
    }

    /// Fraction of the floor with each step held against the better of the probe passes
    /// just before and just after it (`None` without passes between the steps). The best
    /// of all passes (`bandwidth`) rises with the number of steps on a host whose
    /// bandwidth swings within seconds; a step's neighbours are milliseconds from it.
    fn neighbour_fraction(&self) -> Option<f64> {
        let (passes, steps) = (&self.step_probes, &self.step_seconds);
        if steps.is_empty() || passes.len() != steps.len() + 1 {
            return None;
        }
        let floor_s: f64 = (0..steps.len())
            .map(|i| self.bytes_per_step / passes[i].max(passes[i + 1]))
            .sum();
        Some(floor_s / steps.iter().sum::<f64>())
    }

    /// The attention kernels' read rate over the cache, bytes per second.
    fn attention_rate(&self) -> Option<f64> {
        self.attention_s.map(|s| self.attention_bytes / s)
    }
}

/// Every figure of a run.
struct Report {
    device: String,
    load_s: f64,
    /// Peak RSS at the end of the load (the model alone).
    load_rss_bytes: Option<u64>,
    /// Peak RSS of the whole run (the grid's scratch and latent cache too), the probe's
    /// buffer excluded.
    peak_rss_bytes: Option<u64>,
    kv_bytes_per_token: usize,
    /// Read bandwidth, bytes per second: the highest of `bandwidth_probes`.
    bandwidth: f64,
    /// Each probe of the read bandwidth, in order (bytes per second).
    bandwidth_probes: Vec<f64>,
    /// On the CPU, the threads' core-to-core round trip next to each probe after the load
    /// (nanoseconds; [`dsv2_cpu::bandwidth::core_round_trip_ns`]).
    round_trips_ns: Vec<f64>,
    /// Peak matrix rate the MFU is reckoned against (none known: no MFU).
    peak: Option<PeakRate>,
    prefill: Vec<PrefillRow>,
    decode: Vec<DecodeRow>,
}

impl Report {
    fn print_table(&self, heading: &str) {
        let rss = |b: Option<u64>| b.map_or("unknown".into(), |b| si(b as f64, "B"));
        println!("{heading}");
        println!("device: {}", self.device);
        println!(
            "load {:.2} s (RSS {}) | peak RSS {} | latent cache {} B/token | read bandwidth {:.1} \
             GB/s (best of the probes: {})",
            self.load_s,
            rss(self.load_rss_bytes),
            rss(self.peak_rss_bytes),
            self.kv_bytes_per_token,
            self.bandwidth / 1e9,
            self.bandwidth_probes
                .iter()
                .map(|b| format!("{:.1}", b / 1e9))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !self.round_trips_ns.is_empty() {
            println!(
                "core-to-core round trip at the probes after the load: {} ns (tens of ns: \
                 the threads' cores share a last-level cache and its memory link; hundreds: \
                 separate chips, each core streaming alone)",
                self.round_trips_ns
                    .iter()
                    .map(|ns| format!("{ns:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!();
        println!(
            "{:>14} {:>8} {:>10} {:>10} {:>9} {:>6}  {}",
            "prompt tokens",
            "prompts",
            "seconds",
            "tokens/s",
            "TFLOP/s",
            "MFU",
            match &self.peak {
                Some(p) => format!(
                    "(MFU against {} TFLOP/s: {})",
                    significant(p.flops_per_s / 1e12),
                    p.basis
                ),
                None => "(no peak rate known for this device: give --peak-tflops)".into(),
            }
        );
        for row in &self.prefill {
            let mfu = self.peak.as_ref().map_or("-".into(), |p| {
                format!("{:.1}%", 100.0 * row.flops_per_s() / p.flops_per_s)
            });
            println!(
                "{:>14} {:>8} {:>10.3} {:>10.1} {:>9.3} {:>6}",
                row.prompt_tokens,
                row.prompts,
                row.seconds,
                row.tokens_per_s(),
                row.flops_per_s() / 1e12,
                mfu
            );
        }
        println!();
        println!(
            "{:>6} {:>8} {:>10} {:>10} {:>9} {:>10} {:>12} {:>9} {:>9} {:>10} {:>8}",
            "batch",
            "context",
            "ms/step",
            "tokens/s",
            "MB/step",
            "floor GB/s",
            "floor tok/s",
            "of floor",
            "attn us",
            "attn GB/s",
            "of copy"
        );
        for row in &self.decode {
            let attention = match (row.attention_s, row.attention_rate()) {
                (Some(s), Some(rate)) => format!(
                    "{:>9.1} {:>10.1} {:>7.1}%",
                    s * 1e6,
                    rate / 1e9,
                    100.0 * rate / self.bandwidth
                ),
                _ => format!("{:>9} {:>10} {:>8}", "-", "-", "-"),
            };
            let floor_bandwidth = row.bandwidth.unwrap_or(self.bandwidth);
            println!(
                "{:>6} {:>8} {:>10.2} {:>10.2} {:>9.2} {:>10.1} {:>12.2} {:>8.1}% {attention}",
                row.batch,
                row.context,
                row.step_s() * 1e3,
                row.tokens_per_s(),
                row.bytes_per_step / 1e6,
                floor_bandwidth / 1e9,
                row.floor_tokens_per_s(floor_bandwidth),
                100.0 * row.bandwidth_fraction(floor_bandwidth)
            );
        }
        if self.decode.iter().any(|r| !r.step_probes.is_empty()) {
            println!(
                "floor GB/s: the best of one read pass of the probe before the first timed \
                 step and after each one"
            );
            for row in &self.decode {
                if let Some(f) = row.neighbour_fraction() {
                    println!(
                        "batch {} context {}: {:.1}% of the floor with each step against the \
                         better of the passes next to it",
                        row.batch,
                        row.context,
                        100.0 * f
                    );
                }
            }
        }
        if self.decode.iter().any(|r| r.routed_experts > 0.0) {
            let counted = self.decode.iter().all(|r| r.routed_experts_counted);
            println!(
                "routed experts a MoE layer read per step ({}; uniform routing would read): {}",
                if counted {
                    "counted by the backend"
                } else {
                    "not counted by this backend: the uniform figure is in MB/step"
                },
                self.decode
                    .iter()
                    .map(|r| format!(
                        "batch {} context {} {:.2} ({:.2})",
                        r.batch, r.context, r.routed_experts, r.routed_experts_uniform
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for row in &self.decode {
            if let Some(profile) = &row.loops {
                print_loop_profile(row, profile);
            }
        }
        if self.decode.iter().any(|r| r.attention_s.is_some()) {
            println!(
                "attn: one layer's decode attention kernels alone over the cache (bytes: the \
                 latents read), against the copy bandwidth"
            );
        }
    }

    fn to_json(
        &self,
        label: &str,
        dtypes: &str,
        params: usize,
        weight_bytes: usize,
    ) -> serde_json::Value {
        let prefill: Vec<_> = self
            .prefill
            .iter()
            .map(|r| {
                json!({
                    "prompt_tokens": r.prompt_tokens,
                    "prompts": r.prompts,
                    "seconds": r.seconds,
                    "tokens_per_s": r.tokens_per_s(),
                    "flops": r.flops,
                    "tflops_per_s": r.flops_per_s() / 1e12,
                    "mfu": self.peak.as_ref().map(|p| r.flops_per_s() / p.flops_per_s),
                })
            })
            .collect();
        let decode: Vec<_> = self
            .decode
            .iter()
            .map(|r| {
                json!({
                    "batch": r.batch,
                    "context": r.context,
                    "steps": r.steps,
                    "seconds": r.seconds,
                    "tokens_per_s": r.tokens_per_s(),
                    "bytes_per_step": r.bytes_per_step,
                    "floor_tokens_per_s": r.floor_tokens_per_s(r.bandwidth.unwrap_or(self.bandwidth)),
                    "bandwidth_fraction": r.bandwidth_fraction(r.bandwidth.unwrap_or(self.bandwidth)),
                    "bandwidth_gbps": r.bandwidth.unwrap_or(self.bandwidth) / 1e9,
                    "step_probes_gbps": r.step_probes.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
                    "step_seconds": r.step_seconds,
                    "bracket_bandwidth_gbps": r.bracket_bandwidth.map(|b| b / 1e9),
                    "bracket_bandwidth_fraction": r.bracket_bandwidth.map(|b| r.bandwidth_fraction(b)),
                    "neighbour_bandwidth_fraction": r.neighbour_fraction(),
                    "routed_experts_per_layer": r.routed_experts,
                    "routed_experts_counted": r.routed_experts_counted,
                    "routed_experts_uniform": r.routed_experts_uniform,
                    "attention_seconds": r.attention_s,
                    "attention_bytes": r.attention_bytes,
                    "attention_gbps": r.attention_rate().map(|b| b / 1e9),
                    "attention_copy_fraction": r.attention_rate().map(|b| b / self.bandwidth),
                    "loop_profile": r.loops.as_ref().map(|l| json!({
                        "threads": l.threads,
                        "sites": l.sites.iter().map(|s| json!({
                            "site": s.site.to_string(),
                            "serial": s.serial,
                            "loops": s.loops,
                            "tasks": s.tasks,
                            "loop_seconds": s.loop_s,
                            "busy_seconds": s.busy_s,
                            "before_seconds": s.before_s,
                        })).collect::<Vec<_>>(),
                    })),
                })
            })
            .collect();
        json!({
            "model": label,
            "device": self.device,
            "weights_dtype": dtypes,
            "params": params,
            "weight_bytes": weight_bytes,
            "load_s": self.load_s,
            "load_rss_bytes": self.load_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "bandwidth_gbps": self.bandwidth / 1e9,
            "bandwidth_probes_gbps": self.bandwidth_probes.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
            "core_round_trip_ns": self.round_trips_ns,
            "peak_tflops": self.peak.as_ref().map(|p| p.flops_per_s / 1e12),
            "peak_basis": self.peak.as_ref().map(|p| p.basis.clone()),
            "prefill": prefill,
            "decode": decode,
        })
    }
}

/// Sites of a loop profile printed per decode row, the costliest first.
const LOOP_SITES_SHOWN: usize = 12;

/// `--loop-profile`'s lines for one decode row: the totals, then the call sites that
/// cost most (their loops and the serial work just before them), per step.
fn print_loop_profile(row: &DecodeRow, profile: &LoopProfile) {
    let per_step = |x: f64| x / row.steps as f64;
    let ms = |s: f64| per_step(s) * 1e3;
    let (spread, serial) = (profile.total(false), profile.total(true));
    let between = profile.between_s();
    println!(
        "loops, batch {} context {}, per step of {:.2} ms: {:.0} loops of {:.1} tasks on {} \
         threads, {:.2} ms (threads busy {:.1}% of it); {:.0} loops on one thread, {:.2} ms; \
         {:.2} ms between loops; {:.2} ms after the last",
        row.batch,
        row.context,
        ms(row.seconds),
        per_step(spread.loops as f64),
        spread.tasks as f64 / spread.loops.max(1) as f64,
        profile.threads,
        ms(spread.loop_s),
        100.0 * spread.busy_fraction(profile.threads),
        per_step(serial.loops as f64),
        ms(serial.loop_s),
        ms(between),
        ms(row.seconds - spread.loop_s - serial.loop_s - between),
    );
    let mut sites: Vec<_> = profile.sites.iter().collect();
    sites.sort_by(|a, b| (b.loop_s + b.before_s).total_cmp(&(a.loop_s + a.before_s)));
    for s in sites.iter().take(LOOP_SITES_SHOWN) {
        println!(
            "  {:<40} {:>5.1} loops {:>7.3} ms{} | {:>7.3} ms before",
            s.site.to_string(),
            per_step(s.loops as f64),
            ms(s.loop_s),
            match s.serial {
                true => " (one thread)     ".to_string(),
                false => format!(" (busy {:>5.1}%)", 100.0 * s.busy_fraction(profile.threads)),
            },
            ms(s.before_s),
        );
    }
}

/// `x` with three significant digits at most (`989`, `2.18`, `0.541`).
fn significant(x: f64) -> String {
    match x {
        x if x >= 100.0 => format!("{x:.0}"),
        x if x >= 10.0 => format!("{x:.1}"),
        x if x >= 1.0 => format!("{x:.2}"),
        x => format!("{x:.3}"),
    }
}

/// `x` with a decimal SI prefix (`1.23 G` + `unit`).
fn si(x: f64, unit: &str) -> String {
    let (value, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(scale, _)| x >= scale)
        .map_or((x, ""), |(scale, prefix)| (x / scale, prefix));
    format!("{value:.2} {prefix}{unit}")
}

/// Peak resident memory of this process (`VmHWM`), where Linux reports it.
/// Best-of passes of each bracketing bandwidth probe.
const PROBE_PASSES: usize = 8;

fn best(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// Bandwidth probes of a run, and the peak RSS outside them.
struct Probes {
    /// The highest peak RSS read before a probe.
    peak_rss: Option<u64>,
    /// Each probe's bandwidth, bytes per second.
    values: Vec<f64>,
    /// The core-to-core round trip next to each CPU probe after the load, nanoseconds.
    round_trips_ns: Vec<f64>,
}

impl Probes {
    /// Reads the peak RSS, probes the bandwidth, then resets the peak RSS (where
    /// possible) so the probe's buffer does not count.
    fn probe<B: Backend>(&mut self, backend: &B) -> Result<f64> {
        self.peak_rss = self.peak_rss.max(peak_rss_bytes());
        let bandwidth = backend.measure_read_bandwidth()?;
        reset_peak_rss();
        self.values.push(bandwidth);
        Ok(bandwidth)
    }
}

/// Resets the peak RSS to the current RSS (Linux: `5` into `/proc/self/clear_refs`);
/// false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A progress bar in bytes (drawn on stderr when it is a terminal).
fn bytes_bar(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("a valid template"),
    );
    bar.set_message(message);
    bar
}

/// A progress bar over the benchmark's rows, ticking while a row runs.
fn rows_bar(rows: u64) -> ProgressBar {
    let bar = ProgressBar::new(rows);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows: {msg}",
        )
        .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
