//! `dsv2 serve`: the OpenAI- and DeepSeek-compatible HTTP API.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv2_backend::Backend;
use dsv2_core::Tokenizer;
use dsv2_engine::EngineConfig;
use dsv2_model::Model;
use dsv2_server::{Server, ServerConfig, TextModel};

use crate::load::{self, ModelInfo, ModelTask};
use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API routes (/health and /metrics stay
    /// open).
    #[arg(long, env = "DSV2_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in the API (besides `deepseek-chat`); default: the folder's name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens per engine step (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Most requests waiting for admission; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Memory for the paged latent KV cache, e.g. 512MiB, 4GiB or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    kv_cache_memory: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Cap on prompt plus generated tokens (default: the model's, or what the cache holds).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Do not reuse cached prompt prefixes across requests.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Seconds a request may run before it is cancelled; 0 means no limit.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Seconds running requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
}

/// Parses `1GiB`, `512MiB`, `64KB`, `2G` or a plain number of bytes.
pub(crate) fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 512MiB, 4GiB, 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    Ok((value * scale) as usize)
}

fn seconds(name: &str, secs: f64) -> Result<Option<Duration>> {
    if !(secs.is_finite() && secs >= 0.0) {
        bail!("--{name} must be a non-negative number of seconds, got {secs}");
    }
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// Runs `dsv2 serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        request_timeout: seconds("request-timeout", args.request_timeout)?,
        drain_timeout: seconds("drain-timeout", args.drain_timeout)?.unwrap_or_default(),
    };
    let engine = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_waiting: args.max_waiting,
        block_size: args.block_size,
        kv_cache_bytes: args.kv_cache_memory,
        max_model_len: args.max_model_len,
        enable_prefix_caching: !args.no_prefix_caching,
        attention: args.model.attention,
    };
    // Answer /health (503) while the model loads.
    let server = Server::start(config)?;
    let model_args = args.model.clone();
    load::with_model(
        &model_args,
        ServeTask {
            server,
            engine,
            args,
        },
    )
}

struct ServeTask {
    server: Server,
    engine: EngineConfig,
    args: ServeArgs,
}

impl ModelTask for ServeTask {
    type Output = ();
    fn memory_beside_weights(&self) -> u64 {
        self.engine.kv_cache_bytes as u64
    }
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, info: &ModelInfo) -> Result<()> {
        let text = text_model(info, self.args.served_model_name, model.config.vocab_size)?;
        self.server.run_engine(backend, model, text, self.engine)
    }
}

/// The tokenizer of the model folder (or the built-in DeepSeek-V2 one), its generation
/// defaults and its name.
fn text_model(info: &ModelInfo, name: Option<String>, vocab_size: usize) -> Result<TextModel> {
    let tokenizer = match info.tokenizer().context("loading the tokenizer")? {
        Some(t) => t,
        None => {
            eprintln!(
                "dsv2: no tokenizer.json with the model: using the built-in DeepSeek-V2 tokenizer"
            );
            Tokenizer::builtin()?
        }
    };
    if tokenizer.vocab_size() > vocab_size {
        eprintln!(
            "dsv2: note: the tokenizer knows {} tokens but the model only {vocab_size}; \
             text that encodes to larger ids is refused",
            tokenizer.vocab_size()
        );
    }
    let name = name.unwrap_or_else(|| {
        info.dir
            .as_deref()
            .and_then(|d| d.canonicalize().ok())
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "dsv2-builtin".into())
    });
    Ok(TextModel::new(
        tokenizer,
        info.generation_config.as_ref(),
        &info.config.eos_token_ids,
        name,
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("12345"), Ok(12345));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
