//! Streaming detokenization: text pieces emitted token by token that never split a UTF-8
//! character and whose concatenation equals decoding all ids at once.
//!
//! Byte-level BPE tokens are byte strings, so one character (an emoji, most CJK characters)
//! can span several tokens, and some decoders change how a token prints depending on what
//! precedes it. [`StreamDecoder`] uses the prefix-offset scheme of TGI and vLLM: it decodes a
//! short window of already-emitted context ("prefix") plus the new ids, emits only the text
//! beyond the prefix, and waits while that text ends in an incomplete character (U+FFFD).
//!
//! [`TextStream`] adds what generation needs on top: EOS ids, stop strings (via
//! [`StopMatcher`]) and the token limit, and says why generation finished.

use crate::error::Result;
use crate::sampling::{SamplingParams, StopMatcher};
use crate::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Incremental decoder: [`step`](Self::step) per generated id, then [`flush`](Self::flush).
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Ids from the prefix offset on: `ids[..prefix_len]` is emitted context,
    /// `ids[prefix_len..]` is not emitted yet.
    ids: Vec<u32>,
    prefix_len: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder with no context. `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::with_capacity(16),
            prefix_len: 0,
        }
    }

    /// Adds one id; returns the text it completes (empty while a character is incomplete).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = self
            .tokenizer
            .decode(&self.ids[..self.prefix_len], self.skip_special_tokens)?;
        let new_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let Some(piece) = new_text
            .strip_prefix(prefix_text.as_str())
            .or_else(|| new_text.get(prefix_text.len()..))
        else {
            return Ok(String::new());
        };
        let piece = piece.to_string();
        // The ids just emitted become the context of the next step.
        self.ids.drain(..self.prefix_len);
        self.prefix_len = self.ids.len();
        Ok(piece)
    }

    /// Returns the text still held back (bytes of an incomplete character decode to U+FFFD,
    /// as a full decode would give) and resets the held-back part.
    pub fn flush(&mut self) -> Result<String> {
        if self.ids.len() == self.prefix_len {
            return Ok(String::new());
        }
        let prefix_text = self
            .tokenizer
            .decode(&self.ids[..self.prefix_len], self.skip_special_tokens)?;
        let new_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let piece = new_text
            .strip_prefix(prefix_text.as_str())
            .or_else(|| new_text.get(prefix_text.len()..))
            .unwrap_or_default()
            .to_string();
        self.ids.drain(..self.prefix_len);
        self.prefix_len = self.ids.len();
        Ok(piece)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was sampled (it is not part of the text).
    Eos,
    /// A stop string matched; the matched text and what follows are not emitted.
    Stop(String),
    /// The token limit was reached: `max_tokens`, or the caller ended the stream with
    /// [`TextStream::finish`] (e.g. the context is full).
    MaxTokens,
}

/// What [`TextStream::push`] gives back for one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamStep {
    /// Text to show now (may be empty).
    pub text: String,
    /// Set when generation must stop after this token.
    pub finished: Option<FinishReason>,
}

/// Turns sampled ids into display text and decides when generation ends: EOS ids, stop
/// strings matched across token boundaries (never emitted), and the token limit.
#[derive(Debug)]
pub struct TextStream<'t> {
    decoder: StreamDecoder<'t>,
    stop: StopMatcher,
    eos_token_ids: Vec<u32>,
    max_tokens: Option<usize>,
    generated: usize,
    finished: Option<FinishReason>,
}

impl<'t> TextStream<'t> {
    /// A stream for `tokenizer` using the stop strings, EOS ids and `max_tokens` of `params`.
    /// Special tokens are not shown.
    pub fn new(tokenizer: &'t Tokenizer, params: &SamplingParams) -> Self {
        TextStream {
            decoder: StreamDecoder::new(tokenizer, true),
            stop: StopMatcher::new(params.stop.iter().cloned()),
            eos_token_ids: params.eos_token_ids.clone(),
            max_tokens: params.max_tokens,
            generated: 0,
            finished: None,
        }
    }

    /// Feeds one generated id. Once `finished` is set the caller stops generating; later
    /// pushes return nothing.
    pub fn push(&mut self, id: u32) -> Result<StreamStep> {
        if self.finished.is_some() {
            return Ok(StreamStep::default());
        }
        self.generated += 1;
        if self.eos_token_ids.contains(&id) {
            return self.finish_with(FinishReason::Eos);
        }
        let piece = self.decoder.step(id)?;
        let out = self.stop.push(&piece);
        if let Some(stop) = out.stopped {
            self.finished = Some(FinishReason::Stop(stop.clone()));
            return Ok(StreamStep {
                text: out.text,
                finished: Some(FinishReason::Stop(stop)),
            });
        }
        if self.max_tokens.is_some_and(|max| self.generated >= max) {
            let mut step = self.finish_with(FinishReason::MaxTokens)?;
            step.text.insert_str(0, &out.text);
            return Ok(step);
        }
        Ok(StreamStep {
            text: out.text,
            finished: None,
        })
    }

    /// Ends the stream when generation stopped for another reason (e.g. the context is
    /// full): returns the text still held back.
    pub fn finish(&mut self) -> Result<String> {
        if self.finished.is_some() {
            return Ok(String::new());
        }
        let step = self.finish_with(FinishReason::MaxTokens)?;
        Ok(step.text)
    }

    /// Number of ids pushed so far (EOS included).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Why the stream finished, once it has.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finished.as_ref()
    }

    /// Flushes the decoder and the stop matcher: a stop string may still match in the
    /// held-back text.
    fn finish_with(&mut self, reason: FinishReason) -> Result<StreamStep> {
        let tail = self.decoder.flush()?;
        let out = self.stop.push(&tail);
        let (text, reason) = match out.stopped {
            Some(stop) => (out.text, FinishReason::Stop(stop)),
            None => {
                let mut text = out.text;
                text.push_str(&self.stop.flush());
                (text, reason)
            }
        };
        self.finished = Some(reason.clone());
        Ok(StreamStep {
            text,
            finished: Some(reason),
        })
    }
}
