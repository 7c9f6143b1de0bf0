//! The built-in tokenizer, chat template and streaming decoder against
//! `testdata/tokenizer_cases.json`, written by `tools/fixtures/make_tokenizer_fixtures.py`
//! with transformers 4.57 (`LlamaTokenizerFast`) and Jinja2.

use dsv2_core::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer};
use serde_json::Value;

fn cases() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

#[test]
fn fixture_is_from_transformers_4_llama_fast() {
    let c = cases();
    assert!(s(&c["transformers"]).starts_with("4."));
    assert_eq!(s(&c["tokenizer_class"]), "LlamaTokenizerFast");
    let tok = Tokenizer::builtin().unwrap();
    assert_eq!(
        tok.bos().unwrap().id,
        c["bos_token_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        tok.eos().unwrap().id,
        c["eos_token_id"].as_u64().unwrap() as u32
    );
    assert_eq!(tok.bos().unwrap().text, "<｜begin▁of▁sentence｜>");
    assert_eq!(tok.eos().unwrap().text, "<｜end▁of▁sentence｜>");
    assert_eq!(tok.pad().unwrap().id, 100001);
    assert!(tok.adds_bos());
    assert_eq!(tok.vocab_size(), 100002);
}

#[test]
fn encode_matches_transformers() {
    let tok = Tokenizer::builtin().unwrap();
    let c = cases();
    let list = c["encode"].as_array().unwrap();
    assert!(list.len() > 800);
    let mut failures = Vec::new();
    for case in list {
        let text = s(&case["text"]);
        let got = tok.encode(text, true).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!(
                "{text:?}: got {got:?}, want {:?}",
                ids(&case["ids"])
            ));
        }
        let got = tok.encode(text, false).unwrap();
        if got != ids(&case["ids_no_special"]) {
            failures.push(format!("{text:?} (no special): got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn specific_encodings() {
    let tok = Tokenizer::builtin().unwrap();
    assert_eq!(tok.encode("", true).unwrap(), vec![100000]);
    assert_eq!(tok.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(
        tok.encode("Hello world", true).unwrap(),
        vec![100000, 17464, 1843]
    );
    // The BOS string in the text is the BOS id, and the BOS is still added once in front.
    assert_eq!(
        tok.encode("<｜begin▁of▁sentence｜>", true).unwrap(),
        vec![100000, 100000]
    );
}

#[test]
fn decode_matches_transformers() {
    let tok = Tokenizer::builtin().unwrap();
    let c = cases();
    let mut n = 0;
    for case in c["encode"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["decode"].as_array().unwrap())
    {
        let ids = ids(&case["ids"]);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            s(&case["decoded"]),
            "{ids:?}"
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            s(&case["decoded_skip_special"]),
            "{ids:?}"
        );
        n += 1;
    }
    assert!(n > 860);
}

#[test]
fn chat_template_and_ids_match_apply_chat_template() {
    let tok = Tokenizer::builtin().unwrap();
    let c = cases();
    let list = c["chat"].as_array().unwrap();
    assert!(list.len() >= 14);
    for case in list {
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        // As JSON values (what `dsv2 tokenize --chat FILE` reads) ...
        let (text, got) = tok.encode_chat(&case["messages"], agp).unwrap();
        assert_eq!(text, s(&case["text"]), "{}", case["name"]);
        assert_eq!(got, ids(&case["ids"]), "{}", case["name"]);
        // ... and as typed messages.
        let typed: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(tok.render_chat(&typed, agp).unwrap(), s(&case["text"]));
    }
}

#[test]
fn deepseek_chat_format_byte_for_byte() {
    let tok = Tokenizer::builtin().unwrap();
    let msgs = [
        ChatMessage::new("system", "S"),
        ChatMessage::new("user", "u1"),
        ChatMessage::new("assistant", "a1"),
        ChatMessage::new("user", "u2"),
    ];
    assert_eq!(
        tok.render_chat(&msgs[..], true).unwrap(),
        "<｜begin▁of▁sentence｜>S\n\nUser: u1\n\nAssistant: a1<｜end▁of▁sentence｜>User: u2\n\nAssistant:"
    );
    let (_, ids) = tok.encode_chat(&msgs[..], true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 100000).count(), 1, "one BOS");
    assert_eq!(ids[0], 100000);
}

#[test]
fn other_templates_render_like_jinja2() {
    let c = cases();
    let base = Tokenizer::builtin().unwrap();
    let list = c["templates"].as_array().unwrap();
    assert!(list.len() >= 32);
    let mut errors = 0;
    for case in list {
        let mut tok = base.clone();
        tok.set_chat_template(ChatTemplate::new(s(&case["template"])).unwrap());
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.render_chat(&case["messages"], agp);
        match (&case.get("text"), &case.get("error")) {
            (Some(text), _) => assert_eq!(got.unwrap(), s(text), "template {}", case["name"]),
            (None, Some(err)) => {
                let msg = got.unwrap_err().to_string();
                assert!(msg.contains(s(err)), "template {}: {msg}", case["name"]);
                errors += 1;
            }
            _ => unreachable!(),
        }
    }
    assert!(errors >= 2);
}

/// Pieces from the streaming decoder joined equal the full decode, and no piece ends in a
/// split character.
fn check_stream(tok: &Tokenizer, ids: &[u32], skip_special: bool, want: &str) -> usize {
    let mut dec = StreamDecoder::new(tok, skip_special);
    let mut joined = String::new();
    let mut held_back = 0;
    for &id in ids {
        let piece = dec.step(id).unwrap();
        if piece.is_empty() {
            held_back += 1;
        }
        if !want.contains('\u{FFFD}') {
            assert!(!piece.contains('\u{FFFD}'), "{ids:?}: piece {piece:?}");
        }
        joined.push_str(&piece);
    }
    joined.push_str(&dec.flush().unwrap());
    assert_eq!(joined, want, "{ids:?}");
    held_back
}

#[test]
fn streaming_decode_equals_full_decode_on_all_fixtures() {
    let tok = Tokenizer::builtin().unwrap();
    let c = cases();
    let mut held = 0;
    for case in c["encode"].as_array().unwrap() {
        let ids = ids(&case["ids"]);
        held += check_stream(&tok, &ids, false, s(&case["decoded"]));
        check_stream(&tok, &ids, true, s(&case["decoded_skip_special"]));
    }
    for case in c["decode"].as_array().unwrap() {
        check_stream(&tok, &ids(&case["ids"]), false, s(&case["decoded"]));
    }
    // Characters really do span tokens in these fixtures.
    assert!(held > 50, "{held}");
}

#[test]
fn streaming_emoji_and_chinese_split_across_tokens() {
    let tok = Tokenizer::builtin().unwrap();
    for text in ["👨‍👩‍👧‍👦🇫🇷❤️ ok", "深度求索发布了龘龘模型。😀中文", "a😀b😀c"]
    {
        let ids = tok.encode(text, false).unwrap();
        // At least one token alone is not valid UTF-8 ...
        assert!(
            ids.iter()
                .any(|&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}')),
            "{text}: no split character"
        );
        // ... yet every streamed piece is whole characters and the pieces rebuild the text.
        let mut dec = StreamDecoder::new(&tok, false);
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = dec.step(id).unwrap();
            assert!(!p.contains('\u{FFFD}'), "{text}: {p:?}");
            if !p.is_empty() {
                pieces.push(p);
            }
        }
        assert_eq!(dec.flush().unwrap(), "");
        assert!(pieces.len() < ids.len(), "{text}: something was held back");
        assert_eq!(pieces.concat(), text);
    }
}

/// Extra check against a larger case file made the same way (not committed):
/// `DSV2_TOKENIZER_CASES=/tmp/cases.json cargo test -p dsv2-core --test tokenizer_reference -- --ignored`
#[test]
#[ignore = "needs DSV2_TOKENIZER_CASES pointing at a generated case file"]
fn encode_matches_external_cases() {
    let path = std::env::var("DSV2_TOKENIZER_CASES").expect("set DSV2_TOKENIZER_CASES");
    let c: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = Tokenizer::builtin().unwrap();
    let mut failures = Vec::new();
    let list = c["encode"].as_array().unwrap();
    for case in list {
        let text = s(&case["text"]);
        let want = ids(&case["ids"]);
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        if tok.decode(&want, false).unwrap() != s(&case["decoded"]) {
            failures.push(format!("{text:?}: decode differs"));
        }
        check_stream(&tok, &want, false, s(&case["decoded"]));
    }
    eprintln!("{} external cases, {} failures", list.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{}",
        failures[..failures.len().min(20)].join("\n")
    );
}
