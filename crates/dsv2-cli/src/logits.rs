//! `dsv2 logits`: every position's logits of a token sequence, to a safetensors file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use dsv2_backend::{Backend, Batch, LogitsWanted};
use dsv2_model::Model;

use crate::load::{self, ModelInfo, ModelTask};
use crate::ModelArgs;

/// Arguments of `dsv2 logits`.
#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids (no BOS is added).
    #[arg(long, value_delimiter = ',', required = true)]
    token_ids: Vec<u32>,
    /// Output safetensors file; holds one f32 tensor `logits` [tokens, vocab_size].
    #[arg(long)]
    output: PathBuf,
}

/// Runs `dsv2 logits`.
pub fn run(args: LogitsArgs) -> Result<()> {
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
