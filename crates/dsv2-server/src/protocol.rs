//! Parsing and validating OpenAI / DeepSeek request bodies.
//!
//! Bodies are read as JSON values and each field is checked by hand, so that every
//! malformed or out-of-range value gets a 400 naming its field (`param`), instead of a
//! generic deserialization error. Unknown fields are ignored, as vLLM does.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most stop strings per request (DeepSeek's limit).
pub const MAX_STOP: usize = 16;
/// Most alternatives per token in `logprobs` / `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per request.
pub const MAX_N: usize = 64;

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommonParams {
    /// Requested model name.
    pub model: String,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<usize>,
    /// 0..=2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass, 0..=1.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: Option<usize>,
    /// Relative probability floor, 0..=1.
    pub min_p: Option<f32>,
    /// -2..=2.
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    pub frequency_penalty: Option<f32>,
    /// HF repetition penalty, > 0.
    pub repetition_penalty: Option<f32>,
    /// Up to 16 stop strings.
    pub stop: Vec<String>,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Choices per prompt.
    pub n: usize,
    /// Answer with SSE chunks.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// vLLM extension: keep generating past EOS.
    pub ignore_eos: bool,
    /// vLLM extension: report generated token ids with each choice.
    pub return_token_ids: bool,
}

/// A `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Shared fields.
    pub common: CommonParams,
    /// Messages with `content` flattened to a string, ready for the chat template.
    pub messages: Vec<Value>,
    /// Report log-probabilities of the output tokens.
    pub logprobs: bool,
    /// Alternatives per token (requires `logprobs`).
    pub top_logprobs: usize,
}

/// One prompt of a text completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, encoded with the tokenizer (BOS added).
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// A `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// Shared fields.
    pub common: CommonParams,
    /// One or more prompts (a batch gives `n` choices per prompt).
    pub prompts: Vec<Prompt>,
    /// `Some(k)`: log-probabilities with `k` alternatives per token.
    pub logprobs: Option<usize>,
    /// Prepend the prompt's text to the completion.
    pub echo: bool,
}

/// Typed access to a request object's fields, with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// The field's value; `None` when absent or null.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_error(name, "a boolean", v)),
        }
    }

    fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let Some(x) = v.as_f64() else {
            return Err(type_error(name, "a number", v));
        };
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be between {lo} and {hi}, got {x}"),
            ));
        }
        Ok(Some(x as f32))
    }

    fn integer(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = match v {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
            _ => None,
        };
        let Some(x) = x else {
            return Err(type_error(name, "an integer", v));
        };
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be between {lo} and {hi}, got {x}"),
            ));
        }
        Ok(Some(x))
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(type_error(name, "a string", v)),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn type_error(name: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        name,
        format!("`{name}` must be {expected}, got {}", type_name(got)),
    )
}

/// Parses a body into a JSON object.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(format!(
            "The request body must be a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}

fn common(f: &Fields<'_>) -> Result<CommonParams, ApiError> {
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "You must provide a model parameter"))?
        .to_string();
    // `max_completion_tokens` is the newer name; either may be given.
    let max_tokens = match f.integer("max_completion_tokens", 1, u32::MAX as i64)? {
        Some(n) => Some(n),
        None => f.integer("max_tokens", 1, u32::MAX as i64)?,
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "`stream_options` is only allowed when `stream` is true",
                ));
            }
            Fields(o)
                .bool("include_usage")
                .map_err(|mut e| {
                    e.param = Some("stream_options.include_usage".into());
                    e
                })?
                .unwrap_or(false)
        }
        Some(v) => return Err(type_error("stream_options", "an object", v)),
    };
    let top_k = match f.integer("top_k", -1, u32::MAX as i64)? {
        Some(k) if k > 0 => Some(k as usize),
        Some(_) => Some(0), // -1 and 0 both mean "off", as in vLLM
        None => None,
    };
    Ok(CommonParams {
        model,
        max_tokens: max_tokens.map(|n| n as usize),
        temperature: f.number("temperature", 0.0, 2.0)?,
        top_p: f.number("top_p", 0.0, 1.0)?,
        top_k,
        min_p: f.number("min_p", 0.0, 1.0)?,
        presence_penalty: f.number("presence_penalty", -2.0, 2.0)?,
        frequency_penalty: f.number("frequency_penalty", -2.0, 2.0)?,
        repetition_penalty: match f.number("repetition_penalty", 0.0, f32::MAX as f64)? {
            Some(p) if p <= 0.0 => {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    "`repetition_penalty` must be greater than 0",
                ))
            }
            p => p,
        },
        stop: stop(f)?,
        stop_token_ids: token_list(f, "stop_token_ids")?.unwrap_or_default(),
        seed: f.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        n: f.integer("n", 1, MAX_N as i64)?.unwrap_or(1) as usize,
        stream,
        include_usage,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        return_token_ids: f.bool("return_token_ids")?.unwrap_or(false),
    })
}

fn stop(f: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    let list = match f.get("stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "`stop` may hold at most {MAX_STOP} strings, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(type_error("stop", "a string or an array of strings", other)),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(type_error("stop", "a string or an array of strings", v)),
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

/// A list of token ids (non-negative integers that fit `u32`).
fn token_list(f: &Fields<'_>, name: &str) -> Result<Option<Vec<u32>>, ApiError> {
    match f.get(name) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| token_id(name, v))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(type_error(name, "an array of token ids", v)),
    }
}

fn token_id(name: &str, v: &Value) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("token ids must be non-negative integers, got {v}"),
            )
        })
}

/// Parses and validates a chat completion request.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields(&map);
    let common = common(&f)?;
    let messages = match f.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must hold at least one message",
            ))
        }
        Some(v) => return Err(type_error("messages", "an array of messages", v)),
        None => {
            return Err(ApiError::invalid(
                "messages",
                "You must provide a `messages` parameter",
            ))
        }
    };
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top_logprobs = f
        .integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?
        .unwrap_or(0) as usize;
    if top_logprobs > 0 && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs` to be true",
        ));
    }
    Ok(ChatRequest {
        common,
        messages,
        logprobs,
        top_logprobs,
    })
}

/// One message: `role` a string, `content` a string, an array of text parts, or null.
fn message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(obj) = m else {
        return Err(type_error(&param, "an object", m));
    };
    let role = match obj.get("role") {
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("`{param}.role` must be a non-empty string"),
            ))
        }
    };
    let content = match obj.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => text.push_str(t),
                        None => {
                            return Err(ApiError::invalid(
                                &format!("{param}.content"),
                                "a text part needs a string `text`",
                            ))
                        }
                    },
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.content"),
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            text
        }
        Some(v) => {
            return Err(type_error(
                &format!("{param}.content"),
                "a string or an array of content parts",
                v,
            ))
        }
    };
    let mut out = obj.clone();
    out.insert("role".into(), Value::String(role));
    out.insert("content".into(), Value::String(content));
    Ok(Value::Object(out))
}

/// Parses and validates a text completion request.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields(&map);
    let common = common(&f)?;
    let prompts = prompts(f.get("prompt"))?;
    let logprobs = f
        .integer("logprobs", 0, MAX_TOP_LOGPROBS as i64)?
        .map(|k| k as usize);
    if let Some(best_of) = f.integer("best_of", 1, MAX_N as i64)? {
        if best_of as usize != common.n {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than `n` is not supported",
            ));
        }
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    Ok(CompletionRequest {
        common,
        prompts,
        logprobs,
        echo: f.bool("echo")?.unwrap_or(false),
    })
}

/// `prompt`: a string, an array of token ids, or a batch of either.
fn prompts(v: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of token ids, or an array of either",
        )
    };
    match v {
        None => Err(ApiError::invalid(
            "prompt",
            "You must provide a `prompt` parameter",
        )),
        Some(Value::String(s)) => Ok(vec![Prompt::Text(s.clone())]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::Number(_) => Ok(vec![Prompt::Tokens(
                items
                    .iter()
                    .map(|t| token_id("prompt", t))
                    .collect::<Result<_, _>>()?,
            )]),
            Value::String(_) | Value::Array(_) => items
                .iter()
                .map(|p| match p {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    Value::Array(ids) if !ids.is_empty() => Ok(Prompt::Tokens(
                        ids.iter()
                            .map(|t| token_id("prompt", t))
                            .collect::<Result<_, _>>()?,
                    )),
                    _ => Err(bad()),
                })
                .collect(),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat(body.as_bytes())
    }

    #[test]
    fn parses_a_full_chat_request() {
        let r = chat(
            r#"{"model":"deepseek-chat","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
               "max_tokens":5,"temperature":0.5,"top_p":0.9,"top_k":-1,"stop":["a","b"],"seed":-3,
               "n":2,"stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":3}"#,
        )
        .unwrap();
        assert_eq!(r.common.max_tokens, Some(5));
        assert_eq!(r.common.top_k, Some(0));
        assert_eq!(r.common.stop, vec!["a", "b"]);
        assert_eq!(r.common.seed, Some((-3i64) as u64));
        assert!(r.common.include_usage && r.common.stream);
        assert_eq!(r.messages[0]["content"], "hi");
        assert_eq!(r.top_logprobs, 3);
    }

    #[test]
    fn names_the_bad_field() {
        let cases = [
            (r#"[1]"#, None),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"temperature":"hot"}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":1.5}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"n":0}"#,
                Some("n"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"top_logprobs":2}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"logprobs":true,"top_logprobs":21}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stop":[""]}"#,
                Some("stop"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stop":["1","2","3","4","5","6","7","8","9","10","11","12","13","14","15","16","17"]}"#,
                Some("stop"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"presence_penalty":-2.5}"#,
                Some("presence_penalty"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"repetition_penalty":0}"#,
                Some("repetition_penalty"),
            ),
        ];
        for (body, param) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
        }
    }

    #[test]
    fn completion_prompts_of_every_form() {
        let p = |s: &str| parse_completion(format!(r#"{{"model":"m","prompt":{s}}}"#).as_bytes());
        assert_eq!(
            p(r#""hi""#).unwrap().prompts,
            vec![Prompt::Text("hi".into())]
        );
        assert_eq!(
            p("[1,2]").unwrap().prompts,
            vec![Prompt::Tokens(vec![1, 2])]
        );
        assert_eq!(p(r#"["a","b"]"#).unwrap().prompts.len(), 2);
        assert_eq!(
            p("[[1],[2,3]]").unwrap().prompts[1],
            Prompt::Tokens(vec![2, 3])
        );
        for bad in [
            "[]",
            "[-1]",
            "[1.5]",
            "{}",
            "[[]]",
            "[true]",
            "[4294967296]",
        ] {
            assert_eq!(
                p(bad).unwrap_err().param.as_deref(),
                Some("prompt"),
                "{bad}"
            );
        }
        let e = parse_completion(br#"{"model":"m","prompt":"x","logprobs":21}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }
}
