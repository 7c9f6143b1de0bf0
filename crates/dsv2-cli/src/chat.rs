//! `dsv2 chat`: an interactive conversation in the terminal.
//!
//! Each turn renders the whole conversation with the chat template and generates the
//! assistant's answer, streamed. Ctrl-C stops the answer being generated (the program
//! keeps running); `/exit` or Ctrl-D quits.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dsv2_backend::Backend;
use dsv2_core::ChatMessage;
use dsv2_model::Model;

use crate::generate::{generate_turn, sampling_params};
use crate::load::{self, ModelInfo, ModelTask};
use crate::{ModelArgs, SamplingArgs};

/// Arguments of `dsv2 chat`.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Runs `dsv2 chat`.
pub fn run(args: ChatArgs) -> Result<()> {
    load::with_model(&args.model.clone(), ChatTask(args))
}

struct ChatTask(ChatArgs);

const HELP: &str = "commands: /system TEXT (set the system message), /reset (clear the \
conversation), /exit (quit; Ctrl-D too). End a line with \\ to continue it, or wrap several \
lines in \"\"\". Ctrl-C stops an answer.";

/// One read from the user.
enum Input {
    Message(String),
    Command(String, String),
    Eof,
}

/// Reads one message: `\`-continued lines or a `"""` block make one message.
fn read_input(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Result<Input> {
    eprint!("> ");
    let _ = std::io::stderr().flush();
    let Some(first) = lines.next() else {
        return Ok(Input::Eof);
    };
    let first = first.context("reading stdin")?;
    let trimmed = first.trim();
    if let Some(command) = trimmed.strip_prefix('/') {
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        return Ok(Input::Command(name.to_string(), rest.trim().to_string()));
    }
    let mut text = String::new();
    if trimmed == "\"\"\"" {
        for line in lines.by_ref() {
            let line = line.context("reading stdin")?;
            if line.trim() == "\"\"\"" {
                break;
            }
            text.push_str(&line);
            text.push('\n');
        }
        return Ok(Input::Message(text.trim_end_matches('\n').to_string()));
    }
    let mut line = first;
    while let Some(stripped) = line.strip_suffix('\\') {
        text.push_str(stripped);
        text.push('\n');
        match lines.next() {
            Some(next) => line = next.context("reading stdin")?,
            None => break,
        }
    }
    if !line.ends_with('\\') {
        text.push_str(&line);
    }
    Ok(Input::Message(text))
}

impl ModelTask for ChatTask {
    type Output = ();
    fn run<B: Backend>(self, backend: &B, model: &Model<B>, info: &ModelInfo) -> Result<()> {
        let args = self.0;
        let tokenizer = info
            .tokenizer()?
            .context("chat needs a tokenizer.json in the model folder")?;
        let params = sampling_params(info, &args.sampling, args.max_tokens)?;
        let interrupted = Arc::new(AtomicBool::new(false));
        let generating = Arc::new(AtomicBool::new(false));
        {
            let (interrupted, generating) = (interrupted.clone(), generating.clone());
            ctrlc::set_handler(move || {
                if generating.load(Ordering::SeqCst) {
                    interrupted.store(true, Ordering::SeqCst);
                } else {
                    eprint!("\n(/exit or Ctrl-D quits)\n> ");
                }
            })
            .context("installing the Ctrl-C handler")?;
        }
        eprintln!("dsv2 chat: {HELP}");
        let mut system = args.system.clone();
        let mut history: Vec<ChatMessage> = Vec::new();
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            let text = match read_input(&mut lines)? {
                Input::Eof => break,
                Input::Command(name, rest) => {
                    match name.as_str() {
                        "exit" | "quit" => break,
                        "reset" => {
                            history.clear();
                            eprintln!("(conversation cleared)");
                        }
                        "system" => {
                            system = (!rest.is_empty()).then_some(rest);
                            eprintln!("(system message set; it applies from the next turn)");
                        }
                        _ => eprintln!("{HELP}"),
                    }
                    continue;
                }
                Input::Message(text) if text.trim().is_empty() => continue,
                Input::Message(text) => text,
            };
            history.push(ChatMessage::new("user", text));
            let mut messages: Vec<ChatMessage> = system
                .iter()
                .map(|s| ChatMessage::new("system", s.as_str()))
                .collect();
            messages.extend(history.iter().cloned());
            let (_, prompt) = tokenizer.encode_chat(&messages, true)?;
            let mut stdout = std::io::stdout();
            let mut emit = |piece: &str| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            };
            interrupted.store(false, Ordering::SeqCst);
            generating.store(true, Ordering::SeqCst);
            let keep_going = || !interrupted.load(Ordering::SeqCst);
            let turn = generate_turn(
                backend,
                model,
                &args.model,
                Some(&tokenizer),
                &params,
                &prompt,
                &mut emit,
                &keep_going,
            );
            generating.store(false, Ordering::SeqCst);
            let turn = match turn {
                Ok(turn) => turn,
                Err(e) => {
                    // A failed turn (e.g. the conversation outgrew the context) ends
                    // that turn, not the session.
                    eprintln!("\nerror: {e:#}");
                    history.pop();
                    continue;
                }
            };
            println!();
            if interrupted.load(Ordering::SeqCst) {
                eprintln!("(stopped)");
            }
            eprintln!(
                "[{} tokens, {:.1} tokens/s]",
                turn.token_ids.len(),
                turn.token_ids.len() as f64 / turn.seconds.max(1e-9)
            );
            history.push(ChatMessage::new("assistant", turn.text.unwrap_or_default()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Vec<String> {
        let mut lines = text.lines().map(|l| Ok(l.to_string()));
        let mut out = Vec::new();
        loop {
            match read_input(&mut lines).unwrap() {
                Input::Eof => return out,
                Input::Message(m) => out.push(format!("message: {m}")),
                Input::Command(c, rest) => out.push(format!("command: {c} [{rest}]")),
            }
        }
    }

    #[test]
    fn multi_line_input_and_commands() {
        let got = read_all("one \\\ntwo\n\"\"\"\na\n\nb\n\"\"\"\n/system Be brief.\n/reset\nlast");
        assert_eq!(
            got,
            vec![
                "message: one \ntwo",
                "message: a\n\nb",
                "command: system [Be brief.]",
                "command: reset []",
                "message: last",
            ]
        );
    }
}
