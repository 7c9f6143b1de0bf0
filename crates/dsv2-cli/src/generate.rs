//! `dsv2 generate`: one prompt (token ids or text, optionally as a chat turn), streamed.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use dsv2_backend::Backend;
use dsv2_core::detokenize::FinishReason as TextFinish;
use dsv2_core::{ChatMessage, Sampler, SamplingParams, TextStream, Tokenizer};
use dsv2_engine::{FinishReason, Generator};
use dsv2_model::Model;

use crate::load::{self, ModelInfo, ModelTask};
use crate::{ModelArgs, SamplingArgs};

/// Tokens generated when neither `--max-tokens` nor generation_config.json says.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Arguments of `dsv2 generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated prompt token ids (used as given: no BOS is added).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    token_ids: Vec<u32>,
    /// Prompt text (tokenized with the model's tokenizer, BOS added).
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap --prompt in the chat template as a user turn, with the generation prompt.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object as the last line of stdout instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Runs `dsv2 generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    load::with_model(&args.model.clone(), GenerateTask(args))
}

struct GenerateTask(GenerateArgs);

/// The sampling parameters of a run: generation_config.json defaults, then the flags.
pub fn sampling_params(
    info: &ModelInfo,
    flags: &SamplingArgs,
    max_tokens: Option<usize>,
) -> Result<SamplingParams> {
    let params = SamplingParams::from_generation_config(
        info.generation_config.as_ref(),
        &info.config.eos_token_ids,
    )
    .apply(&flags.overrides(max_tokens));
    params.validate()?;
    Ok(params)
}

/// What one generation produced.
pub struct Turn {
    pub token_ids: Vec<u32>,
    /// The text (when a tokenizer is known).
    pub text: Option<String>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    pub seconds: f64,
}

/// Generates after `prompt`, streaming text pieces (or ids without a tokenizer) to
/// `emit`; `keep_going` is asked after every token (e.g. for Ctrl-C).
#[allow(clippy::too_many_arguments)]
pub fn generate_turn<B: Backend>(
    backend: &B,
    model: &Model<B>,
    args: &ModelArgs,
    tokenizer: Option<&Tokenizer>,
    params: &SamplingParams,
    prompt: &[u32],
    emit: &mut dyn FnMut(&str),
    keep_going: &dyn Fn() -> bool,
) -> Result<Turn> {
    let max_tokens = params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let mut sampler = Sampler::new(params.clone())?;
    sampler.add_prompt(prompt);
    let mut generator = Generator::new(backend, model, prompt.len() + max_tokens)?;
    generator.path = args.attention;
    let mut stream = tokenizer.map(|t| TextStream::new(t, params));
    let mut text = String::new();
    let mut failure = None;
    let started = Instant::now();
    let out = generator.generate(
        prompt,
        max_tokens,
        &params.eos_token_ids,
        &mut sampler,
        &mut |id| {
            let go_on = match stream.as_mut() {
                Some(stream) => match stream.push(id) {
                    Ok(step) => {
                        emit(&step.text);
                        text.push_str(&step.text);
                        step.finished.is_none()
                    }
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                },
                None => {
                    emit(&format!("{id} "));
                    true
                }
            };
            go_on && keep_going()
        },
    )?;
    if let Some(e) = failure {
        return Err(e).context("detokenizing");
    }
    let seconds = started.elapsed().as_secs_f64();
    let finish_reason = match stream.as_mut() {
        Some(stream) => {
            let rest = stream.finish()?;
            emit(&rest);
            text.push_str(&rest);
            match (stream.finish_reason(), out.finish_reason) {
                (Some(TextFinish::Eos | TextFinish::Stop(_)), _) => "stop",
                (Some(TextFinish::MaxTokens), FinishReason::Stop) if !keep_going() => "stop",
                (Some(TextFinish::MaxTokens), _) => "length",
                (None, reason) => reason.as_str(),
            }
        }
        None => out.finish_reason.as_str(),
    };
    Ok(Turn {
        token_ids: out.token_ids,
        text: stream.map(|_| text),
        finish_reason,
        seconds,
    })
}

impl ModelTask for GenerateTask {
    type Output = ();
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, info: &ModelInfo) -> Result<()> {
        let args = self.0;
        let tokenizer = info.tokenizer()?;
        let prompt = match &args.prompt {
            Some(text) => {
                let tok = tokenizer
                    .as_ref()
                    .context("--prompt needs a tokenizer.json in the model folder")?;
                if args.chat {
                    tok.encode_chat(&[ChatMessage::new("user", text.as_str())], true)?
                        .1
                } else {
                    tok.encode(text, true)?
                }
            }
            None => args.token_ids.clone(),
        };
        let params = sampling_params(info, &args.sampling, args.max_tokens)?;
        let mut stdout = std::io::stdout();
        let json = args.json;
        let mut emit = |piece: &str| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        };
        let turn = generate_turn(
            backend,
            model,
            &args.model,
            tokenizer.as_ref(),
            &params,
            &prompt,
            &mut emit,
            &|| true,
        )?;
        if json {
            let mut value = serde_json::json!({
                "token_ids": turn.token_ids,
                "finish_reason": turn.finish_reason,
                "usage": {
                    "prompt_tokens": prompt.len(),
                    "completion_tokens": turn.token_ids.len(),
                    "total_tokens": prompt.len() + turn.token_ids.len(),
                },
            });
            if let Some(text) = &turn.text {
                value["text"] = serde_json::Value::from(text.as_str());
            }
            println!("{value}");
        } else {
            println!();
            eprintln!(
                "[{} tokens in {:.2}s ({:.1} tokens/s), finish_reason {}]",
                turn.token_ids.len(),
                turn.seconds,
                turn.token_ids.len() as f64 / turn.seconds.max(1e-9),
                turn.finish_reason
            );
        }
        Ok(())
    }
}
