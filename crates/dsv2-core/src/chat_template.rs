//! Chat templates (`chat_template` of tokenizer_config.json), rendered with `minijinja` the
//! way transformers' `apply_chat_template` renders them with Jinja2.
//!
//! The environment copies transformers' `_compile_jinja_template`
//! (`transformers/utils/chat_template_utils.py`):
//! - `trim_blocks=True`, `lstrip_blocks=True`, no trailing newline kept, no autoescape;
//! - loop controls (`{% break %}`, `{% continue %}`);
//! - `raise_exception(msg)` fails the render with `msg`;
//! - `tojson` is `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)` (no HTML escaping), with those keyword arguments;
//! - `strftime_now(fmt)` formats the current (UTC) time.
//!
//! Variables: `messages`, `tools` and `documents` (none), `add_generation_prompt`, and the
//! special tokens (`bos_token`, `eos_token`, `pad_token`, ...) as strings. Python's way of
//! printing values is kept: `{{ none }}` prints `None`, booleans print `True`/`False`, lists
//! and dicts print in Python `repr` form, and Python string methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) work through minijinja's pycompat layer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State, UndefinedBehavior};
use serde::Serialize;

use crate::error::{CoreError, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template. Cheap to clone.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is an error naming the problem and line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| CoreError::chat_template(format!("does not compile: {}", describe(&e))))?;
        Ok(ChatTemplate {
            source: source.into(),
            env: Arc::new(env),
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (anything serializing to a list of message objects) with
    /// `add_generation_prompt` and the given special-token variables (`bos_token` etc.).
    /// A failing render (including `raise_exception`) is an error naming the problem.
    pub fn render<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        let messages = Value::from_serialize(messages);
        if messages.kind() != ValueKind::Seq {
            return Err(CoreError::chat_template(format!(
                "messages must be a list of message objects, got {}",
                messages.kind()
            )));
        }
        let mut ctx: BTreeMap<String, Value> = special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| CoreError::chat_template(describe(&e)))?;
        template
            .render(ctx)
            .map_err(|e| CoreError::chat_template(format!("render failed: {}", describe(&e))))
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` block (it marks assistant text for
/// training masks) renders its body unchanged; minijinja does not know the tag, so it
/// becomes `{% if true %}...{% endif %}`, which keeps the whitespace control of the tags.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let body = tag[2..].trim_start_matches(['-', '+']);
        let lead = tag.len() - 2 - body.len();
        let word = body.trim_start();
        let space = body.len() - word.len();
        let keyword = ["endgeneration", "generation"].into_iter().find(|k| {
            word.starts_with(k)
                && word[k.len()..]
                    .trim_start()
                    .trim_start_matches('-')
                    .starts_with("%}")
        });
        match keyword {
            Some(k) => {
                out.push_str(&tag[..2 + lead + space]);
                out.push_str(if k == "generation" {
                    "if true"
                } else {
                    "endif"
                });
                rest = &word[k.len()..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// An error's message with its causes (minijinja keeps the template line in the message).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(s, ": {cause}");
        source = cause.source();
    }
    s
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// Prints values as Python's `str()` does, which is what Jinja2 outputs.
fn python_formatter(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(Error::from);
        }
        _ => python_str(value),
    };
    out.write_str(&text).map_err(Error::from)
}

/// Python `str(x)` of a template value.
fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => {
            let mut s = String::new();
            python_repr(value, &mut s);
            s
        }
    }
}

/// Python `repr(x)`: what lists and dicts show for their items.
fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) => out.push_str(&python_float(f)),
                    Err(_) => {
                        let _ = write!(out, "{value}");
                    }
                }
            }
        }
        ValueKind::String => python_string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = value.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    python_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr` of a str: single quotes unless the text has `'` and no `"`.
fn python_string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e-7", "-1e20".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let mut m = digits[..1].to_string();
        if digits.len() > 1 {
            m.push('.');
            m.push_str(&digits[1..]);
        }
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let s = if point <= 0 {
        format!("0.{}{}", "0".repeat((-point) as usize), digits)
    } else if point as usize >= digits.len() {
        format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
    } else {
        format!(
            "{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    };
    format!("{sign}{s}")
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`. Positional `ensure_ascii` and `indent` are accepted as in Python.
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(b) => b,
        None => ensure_ascii.map(|v| v.is_true()).unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().into()),
        Some(v) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be an integer or a string, got {v}"),
            ))
        }
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn write_json(
    value: &Value,
    opts: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&match python_float(f).as_str() {
                    "nan" => "NaN".to_string(),
                    "inf" => "Infinity".to_string(),
                    "-inf" => "-Infinity".to_string(),
                    s => s.to_string(),
                });
            }
        }
        ValueKind::String => {
            write_json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                    ValueKind::Number => python_str(&key),
                    other => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {other}"
                            ),
                        ))
                    }
                };
                entries.push((key, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json_string(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of kind {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes
/// (%Y %y %m %d %e %H %I %M %S %p %j %B %b %A %a %%); other codes are left as written.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => {
                let _ = write!(out, "{:02}", year.rem_euclid(100));
            }
            Some('m') => {
                let _ = write!(out, "{month:02}");
            }
            Some('d') => {
                let _ = write!(out, "{day:02}");
            }
            Some('e') => {
                let _ = write!(out, "{day:2}");
            }
            Some('H') => {
                let _ = write!(out, "{hour:02}");
            }
            Some('I') => {
                let _ = write!(out, "{:02}", (hour + 11) % 12 + 1);
            }
            Some('M') => {
                let _ = write!(out, "{minute:02}");
            }
            Some('S') => {
                let _ = write!(out, "{second:02}");
            }
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => {
                let _ = write!(out, "{yday:03}");
            }
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, messages: serde_json::Value, agp: bool) -> Result<String> {
        let mut special = BTreeMap::new();
        special.insert("bos_token".to_string(), "<s>".to_string());
        special.insert("eos_token".to_string(), "</s>".to_string());
        ChatTemplate::new(template)?.render(&messages, agp, &special)
    }

    #[test]
    fn deepseek_v2_template_matches_the_numerics_note() {
        let t = r#"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"#;
        let messages = serde_json::json!([
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ]);
        assert_eq!(
            render(t, messages, true).unwrap(),
            "<s>S\n\nUser: u1\n\nAssistant: a1</s>User: u2\n\nAssistant:"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = ChatTemplate::new("{% for %}").unwrap_err().to_string();
        assert!(
            err.contains("does not compile") && err.contains("syntax error"),
            "{err}"
        );
        let err = render(
            "{{ raise_exception('Only user roles') }}",
            serde_json::json!([]),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Only user roles"), "{err}");
        let err = render(
            "{{ messages[0].content.foo.bar }}",
            serde_json::json!([{}]),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("render failed"), "{err}");
        let err = render("x", serde_json::json!({"role": "user"}), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("messages must be a list"), "{err}");
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let t = "{% for m in messages %}{%- generation -%}\n [{{ m.content }}] {% endgeneration %}\n{% endfor %}";
        assert_eq!(
            rewrite_generation_tags(t),
            "{% for m in messages %}{%- if true -%}\n [{{ m.content }}] {% endif %}\n{% endfor %}"
        );
        let out = render(
            t,
            serde_json::json!([{"content": "a"}, {"content": "b"}]),
            false,
        )
        .unwrap();
        assert_eq!(out, "[a] [b] ");
        // Other tags and names that merely start with the word are left alone.
        let t = "{% set generation_x = 1 %}{{ generation_x }}{%+ if true %}y{% endif %}";
        assert_eq!(rewrite_generation_tags(t), t);
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.5, "1.5"),
            (1.0, "1.0"),
            (-2.0, "-2.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (123456789.125, "123456789.125"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
        ] {
            assert_eq!(python_float(f), s, "{f}");
        }
    }

    #[test]
    fn python_printing_of_lists_and_dicts() {
        let out = render(
            "{{ messages }}|{{ [1, 2.5, 'it\\'s', none, true] }}",
            serde_json::json!([{"role": "user", "content": "a\nb"}]),
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            "[{'role': 'user', 'content': 'a\\nb'}]|[1, 2.5, \"it's\", None, True]"
        );
    }

    #[test]
    fn tojson_ensure_ascii_and_separators() {
        let out = render(
            "{{ messages[0] | tojson(ensure_ascii=true, separators=[',', ':']) }}",
            serde_json::json!([{"role": "user", "content": "é😀\u{1}"}]),
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"role":"user","content":"\u00e9\ud83d\ude00\u0001"}"#
        );
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday; day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %j %A %a %B %b %y %I%p %e %% %Q", t),
            "2024-02-29 13:05:09 060 Thursday Thu February Feb 24 01PM 29 % %Q"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime("%d %B %Y", 951_782_400), "29 February 2000");
    }
}
