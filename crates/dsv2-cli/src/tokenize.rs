//! `dsv2 tokenize`: token ids of a text or of a rendered chat; reads only tokenizer files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use dsv2_core::{resolve_model_with, HubOptions, ModelFiles, Tokenizer};

/// Arguments of `dsv2 tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// Model folder or hub id whose tokenizer to use (default: the built-in
    /// DeepSeek-V2 tokenizer). Weights are not read.
    #[arg(long)]
    model: Option<String>,
    /// Text to tokenize (BOS added as the tokenizer config says).
    #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
    text: Option<String>,
    /// A JSON file with the messages to render with the chat template: an array of
    /// {"role", "content"} objects, or an object with a "messages" array.
    #[arg(long)]
    chat: Option<PathBuf>,
    /// End the rendered chat with the assistant's generation prompt.
    #[arg(long, requires = "chat")]
    add_generation_prompt: bool,
    /// Print {"token_ids": [...], "text": "..."}.
    #[arg(long)]
    json: bool,
}

/// Runs `dsv2 tokenize`.
pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = match &args.model {
        None => Tokenizer::builtin()?,
        Some(spec) => {
            let dir = resolve_model_with(spec, &HubOptions::from_env(), ModelFiles::TokenizerOnly)
                .with_context(|| format!("resolving model {spec}"))?;
            Tokenizer::from_dir(&dir)?
        }
    };
    let (text, ids) = match (&args.text, &args.chat) {
        (Some(text), _) => (text.clone(), tokenizer.encode(text, true)?),
        (None, Some(path)) => {
            let raw = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&raw)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            let messages = match value.get("messages") {
                Some(m) => m.clone(),
                None => value,
            };
            anyhow::ensure!(
                messages.is_array(),
                "{}: expected an array of messages or {{\"messages\": [...]}}",
                path.display()
            );
            tokenizer.encode_chat(&messages, args.add_generation_prompt)?
        }
        (None, None) => unreachable!("clap requires --text or --chat"),
    };
    if args.json {
        println!("{}", serde_json::json!({"token_ids": ids, "text": text}));
    } else {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}
