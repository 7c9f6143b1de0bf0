//! `dsv2`: run DeepSeek-V2 family checkpoints from the command line.

mod bench;
mod load;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::QuantFormat;
use dsv2_engine::{Generator, Greedy};

use dsv2_model::Model;
use load::{Device, ModelInfo, ModelTask};

#[derive(Parser)]
#[command(name = "dsv2", version, about = "DeepSeek-V2 inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a safetensors file.
    Logits(LogitsArgs),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Measure load time, prefill and decode speed, peak memory and the fraction of the
    /// memory-bandwidth floor reached, on a checkpoint or random weights of a model's shapes.
    Bench(bench::BenchArgs),
}

/// Options shared by every command that runs the model.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Model folder in the HuggingFace layout (config.json + safetensors). Without it,
    /// the small built-in model runs.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute precision of activations: f32 or bf16 (weights keep their dtype).
    #[arg(long, default_value = "f32")]
    dtype: ComputeDtype,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Attention formulation: auto (expanded prefill, absorbed decode), expanded or absorbed.
    #[arg(long, default_value = "auto", value_parser = parse_path)]
    attention: AttentionPath,
    /// Quantize the eligible dense weights at load time: q8 or q4 (8.5 or 4.5 bits per
    /// weight); embeddings, norms, routers and kv_b_proj stay dense.
    #[arg(long)]
    quantize: Option<QuantFormat>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids (no BOS is added).
    #[arg(long, value_delimiter = ',', required = true)]
    token_ids: Vec<u32>,
    /// Output safetensors file; holds one f32 tensor `logits` [tokens, vocab_size].
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated prompt token ids (used as given: no BOS is added).
    #[arg(long, value_delimiter = ',', required = true)]
    token_ids: Vec<u32>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits(args) => logits(args),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench::run(args),
    }
}

fn logits(args: LogitsArgs) -> Result<()> {
    load::with_model(&args.model.clone(), LogitsTask(args))
}

struct LogitsTask(LogitsArgs);

impl ModelTask for LogitsTask {
    type Output = ();
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, _info: &ModelInfo) -> Result<()> {
        let args = self.0;
        let n = args.token_ids.len();
        let vocab = model.config.vocab_size;
        let block = dsv2_engine::BLOCK_SIZE;
        let blocks: Vec<u32> = (0..n.div_ceil(block) as u32).collect();
        let mut cache = backend.alloc_cache(model.cache_spec(blocks.len(), block))?;
        let mut ws = model.workspace(backend, n)?;
        let mut batch = Batch::default();
        batch.push_seq(&args.token_ids, 0, &blocks, block, LogitsWanted::All);
        let mut out = vec![0.0f32; n * vocab];
        model
            .forward(
                backend,
                &batch,
                &mut cache,
                &mut ws,
                args.model.attention,
                &mut out,
            )
            .context("forward pass")?;
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, vocab], &bytes)?;
        safetensors::serialize_to_file([("logits", view)], None, &args.output)
            .with_context(|| format!("writing {}", args.output.display()))?;
        Ok(())
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    if args.temperature != 0.0 {
        bail!(
            "--temperature {} is not supported yet: only greedy decoding (--temperature 0)",
            args.temperature
        );
    }
    load::with_model(&args.model.clone(), GenerateTask(args))
}

struct GenerateTask(GenerateArgs);

impl ModelTask for GenerateTask {
    type Output = ();
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, info: &ModelInfo) -> Result<()> {
        let args = self.0;
        let mut generator = Generator::new(backend, model, args.token_ids.len() + args.max_tokens)?;
        generator.path = args.model.attention;
        let started = std::time::Instant::now();
        let mut stdout = std::io::stdout();
        let json = args.json;
        let mut on_token = |t: u32| {
            if !json {
                let _ = write!(stdout, "{t} ");
                let _ = stdout.flush();
            }
        };
        let out = generator.generate(
            &args.token_ids,
            args.max_tokens,
            &info.eos_token_ids,
            &mut Greedy,
            &mut on_token,
        )?;
        let secs = started.elapsed().as_secs_f64();
        if json {
            let value = serde_json::json!({
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason.as_str(),
                "usage": {
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.token_ids.len(),
                    "total_tokens": out.prompt_tokens + out.token_ids.len(),
                },
            });
            println!("{value}");
        } else {
            println!();
            eprintln!(
                "[{} tokens in {secs:.2}s, finish_reason {}]",
                out.token_ids.len(),
                out.finish_reason.as_str()
            );
        }
        Ok(())
    }
}
