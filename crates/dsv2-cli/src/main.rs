//! `dsv2`: run DeepSeek-V2 family checkpoints from the command line.

mod bench;
mod chat;
mod generate;
mod load;
mod logits;
mod memory;
mod perplexity;
mod quantize;
mod serve;
mod tokenize;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dsv2_backend::{AttentionPath, ComputeDtype};
use dsv2_core::{QuantFormat, SamplingOverrides};

use load::Device;

#[derive(Parser)]
#[command(name = "dsv2", version, about = "DeepSeek-V2 inference engine")]
struct Cli {
    /// CPU threads of the model's parallel loops (default: one per CPU this process may
    /// use). Results do not depend on it. On a machine with SMT, one thread per physical
    /// core is usually as fast for decode, which streams weights from memory.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a safetensors file.
    Logits(logits::LogitsArgs),
    /// Generate a continuation of a prompt (token ids or text), streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Chat interactively: history, /system TEXT, /reset, /exit.
    Chat(chat::ChatArgs),
    /// Tokenize text or render a chat; needs only the tokenizer files.
    Tokenize(tokenize::TokenizeArgs),
    /// Download a model from the HuggingFace hub into the HF cache without running it.
    Download(DownloadArgs),
    /// Perplexity of the model on a text (or token ids), to compare weight formats.
    Perplexity(perplexity::PerplexityArgs),
    /// Write a q8/q4 quantized copy of a checkpoint (loads memory-mapped, no re-quantizing).
    Quantize(quantize::QuantizeArgs),
    /// Serve the OpenAI- and DeepSeek-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure load time, prefill and decode speed, peak memory and the fraction of the
    /// memory-bandwidth floor reached, on a checkpoint or random weights of a model's shapes.
    Bench(bench::BenchArgs),
}

/// Options shared by every command that runs the model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model folder in the HuggingFace layout, or a hub id such as
    /// deepseek-ai/DeepSeek-V2-Lite-Chat. Without it, the small built-in model runs.
    #[arg(long)]
    pub model: Option<String>,
    /// Compute precision of activations: f32 or bf16 (weights keep their dtype).
    #[arg(long, default_value = "f32")]
    pub dtype: ComputeDtype,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Attention formulation: auto (expanded prefill, absorbed decode), expanded or absorbed.
    #[arg(long, default_value = "auto", value_parser = parse_path)]
    pub attention: AttentionPath,
    /// Quantize weights at load time: q8 or q4 (q4: routed experts at 4 bits, other
    /// matrices at q8; embeddings, norms and the router stay in their checkpoint dtype).
    #[arg(long)]
    pub quantize: Option<QuantFormat>,
    /// Storage of the latent KV cache: f32 or bf16 (default: the --dtype, and bf16 on the
    /// CPU for q4 weights). bf16 halves the cache (V2-Lite: 31,104 instead of 62,208 bytes
    /// a token) and what decode attention reads, rounding each cached value to bf16; under
    /// --dtype bf16 it is exact. On CUDA the cache always follows --dtype.
    #[arg(long)]
    pub kv_cache_dtype: Option<ComputeDtype>,
    /// int8 terms each activation row entering a q8 product is split into (CPU,
    /// quantized weights), on every row: 2 carry ~15 bits (logit error ≤ 1e-2 on the
    /// fixtures), 1 is llama.cpp's q8_0 activation rounding (the default for the q8
    /// matrices of q4 weights): about twice the logit error for a prefill 1.6-1.8× faster
    /// at q8. q4 products always take 1. Unset with q8 weights, decode rows take 2 terms
    /// and prompt rows bf16 activations where the CPU has AVX-512 BF16 (the same
    /// accuracy, a V2-Lite prefill 1.15-1.35× faster than with 2 terms), else 2 terms too.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub activation_terms: Option<u8>,
}

/// Sampling options; unset ones come from generation_config.json (or greedy).
#[derive(Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0: off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p times the most likely one.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// HF repetition penalty over prompt and output (1: off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty over generated tokens.
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty over generated tokens.
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Random seed: the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable); matched across tokens and not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The overrides these flags make to the model's generation defaults.
    pub fn overrides(&self, max_tokens: Option<usize>) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Args)]
struct DownloadArgs {
    /// Repository id, e.g. deepseek-ai/DeepSeek-V2-Lite-Chat (optionally @revision).
    repo_id: String,
}

fn parse_path(s: &str) -> Result<AttentionPath, String> {
    match s {
        "auto" => Ok(AttentionPath::Auto),
        "expanded" => Ok(AttentionPath::Expanded),
        "absorbed" => Ok(AttentionPath::Absorbed),
        other => Err(format!(
            "unknown attention path `{other}` (auto, expanded or absorbed)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line already names the problem.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see dsv2 --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sizes rayon's global pool, which the CPU backend's team of threads
/// ([`dsv2_cpu::team`]) and the `gemm` products of prefill take their size from. Runs
/// before any parallel work (the pool can be sized only once).
fn set_threads(threads: Option<usize>) -> Result<()> {
    let Some(threads) = threads else {
        return Ok(());
    };
    if threads == 0 {
        bail!("--threads 0: at least one thread is needed");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > cpus {
        // The team's workers spin between loops: more of them than CPUs take turns on
        // the same cores and every loop waits for the preempted ones.
        bail!("--threads {threads}: this process may use {cpus} CPUs (at most {cpus} threads)");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .with_context(|| format!("--threads {threads}: the thread pool was already started"))
}

fn run(cli: Cli) -> Result<()> {
    // A wrong instruction-set limit is reported before any work, not as a kernel's panic.
    dsv2_core::isa::IsaLimit::from_env().map_err(anyhow::Error::msg)?;
    set_threads(cli.threads)?;
    match cli.command {
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Download(args) => {
            let dir = dsv2_core::download(&args.repo_id)?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}
