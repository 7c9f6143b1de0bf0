//! `dsv2 perplexity`: perplexity of a model on a text, the usual quality check of a
//! weight format (as llama.cpp's `llama-perplexity`).
//!
//! The tokens are cut into chunks of `--context` tokens (each text chunk starts with BOS,
//! like llama.cpp's); each chunk runs from an empty cache and only the predictions of its
//! second half are scored, so every scored token sees at least half a context.
//! Perplexity = exp(mean negative log-likelihood), with the standard error of the mean
//! NLL carried through.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv2_backend::{Backend, Batch, LogitsWanted};
use dsv2_model::Model;

use crate::load::{self, ModelInfo, ModelTask};
use crate::ModelArgs;

/// Arguments of `dsv2 perplexity`.
#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score (tokenized with the model's tokenizer).
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    file: Option<PathBuf>,
    /// Comma-separated token ids to score instead of a text (no BOS is added).
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// Tokens per chunk (BOS included).
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Score at most this many chunks.
    #[arg(long)]
    max_chunks: Option<usize>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    pub perplexity: f64,
    /// Standard error of the perplexity (from that of the mean NLL).
    pub perplexity_std_error: f64,
    pub mean_nll: f64,
    pub chunks: usize,
    pub context: usize,
    pub tokens_scored: usize,
}

/// Runs `dsv2 perplexity`.
pub fn run(args: PerplexityArgs) -> Result<()> {
    load::with_model(&args.model.clone(), PerplexityTask(args))
}

struct PerplexityTask(PerplexityArgs);

impl ModelTask for PerplexityTask {
    type Output = ();
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, info: &ModelInfo) -> Result<()> {
        let args = self.0;
        if args.context < 4 {
            bail!("--context must be at least 4 tokens");
        }
        let limit = model.config.max_position_embeddings;
        if args.context > limit {
            bail!(
                "--context {} exceeds the model's {limit} positions",
                args.context
            );
        }
        let chunks: Vec<Vec<u32>> = match (&args.file, &args.token_ids) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let tokenizer = info
                    .tokenizer()?
                    .context("--file needs a tokenizer.json in the model folder")?;
                let ids = tokenizer.encode(&text, false)?;
                let bos = tokenizer.bos().map(|b| b.id);
                let body = args.context - usize::from(bos.is_some());
                ids.chunks_exact(body)
                    .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
                    .collect()
            }
            (None, Some(ids)) => ids
                .chunks_exact(args.context)
                .map(<[u32]>::to_vec)
                .collect(),
            (None, None) => unreachable!("clap requires one of them"),
        };
        let chunks = &chunks[..chunks.len().min(args.max_chunks.unwrap_or(usize::MAX))];
        if chunks.is_empty() {
            bail!(
                "the input holds fewer than one chunk of {} tokens: lower --context",
                args.context
            );
        }
        let report = score(backend, model, chunks, args.model.attention, !args.json)?;
        if args.json {
            let json = serde_json::json!({
                "perplexity": report.perplexity,
                "perplexity_std_error": report.perplexity_std_error,
                "mean_nll": report.mean_nll,
                "chunks": report.chunks,
                "context": report.context,
                "tokens_scored": report.tokens_scored,
            });
            println!("{json}");
        } else {
            println!(
                "perplexity {:.4} ± {:.4} over {} tokens ({} chunks of {})",
                report.perplexity,
                report.perplexity_std_error,
                report.tokens_scored,
                report.chunks,
                report.context
            );
        }
        Ok(())
    }
}

/// Scores the second half of each chunk.
fn score<B: Backend>(
    backend: &B,
    model: &Model<B>,
    chunks: &[Vec<u32>],
    path: dsv2_backend::AttentionPath,
    progress: bool,
) -> Result<PerplexityReport> {
    let n = chunks[0].len();
    let vocab = model.config.vocab_size;
    let block = dsv2_engine::BLOCK_SIZE;
    let blocks: Vec<u32> = (0..n.div_ceil(block) as u32).collect();
    let mut cache = backend.alloc_cache(model.cache_spec(blocks.len(), block))?;
    let mut ws = model.workspace(backend, n)?;
    let mut batch = Batch::default();
    let mut logits = vec![0.0f32; n * vocab];
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for (c, chunk) in chunks.iter().enumerate() {
        batch.clear();
        batch.push_seq(chunk, 0, &blocks, block, LogitsWanted::All);
        model
            .forward(backend, &batch, &mut cache, &mut ws, path, &mut logits)
            .with_context(|| format!("forward pass of chunk {c}"))?;
        for pos in n / 2..n - 1 {
            let nll = nll(&logits[pos * vocab..(pos + 1) * vocab], chunk[pos + 1]);
            sum += nll;
            sum_sq += nll * nll;
            count += 1;
        }
        if progress {
            eprintln!(
                "chunk {}/{}: running perplexity {:.4}",
                c + 1,
                chunks.len(),
                (sum / count as f64).exp()
            );
        }
    }
    let mean = sum / count as f64;
    let var = (sum_sq / count as f64 - mean * mean).max(0.0);
    let se_mean = (var / (count.max(2) - 1) as f64).sqrt();
    let ppl = mean.exp();
    Ok(PerplexityReport {
        perplexity: ppl,
        perplexity_std_error: ppl * se_mean,
        mean_nll: mean,
        chunks: chunks.len(),
        context: n,
        tokens_scored: count,
    })
}

/// `−log softmax(logits)[target]`, in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    dsv2_engine::log_normalizer(logits) - logits[target as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_the_negative_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((nll(&logits, 2) - (z.ln() - 3.0)).abs() < 1e-12);
        // Uniform logits: log(vocab).
        assert!((nll(&[0.5; 8], 3) - 8f64.ln()).abs() < 1e-12);
    }
}
