//! `TextStream` on the built-in tokenizer: EOS, stop strings that straddle tokens,
//! `max_tokens`, and characters split across tokens.

use dsv2_core::{FinishReason, SamplingParams, TextStream, Tokenizer};

fn run(
    tok: &Tokenizer,
    ids: &[u32],
    params: &SamplingParams,
) -> (String, Option<FinishReason>, usize) {
    let mut stream = TextStream::new(tok, params);
    let mut text = String::new();
    for &id in ids {
        let step = stream.push(id).unwrap();
        assert!(!step.text.contains('\u{FFFD}'), "{:?}", step.text);
        text.push_str(&step.text);
        if let Some(reason) = step.finished {
            return (text, Some(reason), stream.generated());
        }
    }
    text.push_str(&stream.finish().unwrap());
    (text, None, stream.generated())
}

fn params(stop: &[&str], max_tokens: Option<usize>) -> SamplingParams {
    SamplingParams {
        stop: stop.iter().map(|s| s.to_string()).collect(),
        max_tokens,
        eos_token_ids: vec![100001],
        ..SamplingParams::default()
    }
}

#[test]
fn stop_string_straddling_tokens_is_not_emitted() {
    let tok = Tokenizer::builtin().unwrap();
    let ids = tok
        .encode("Sure, here it is.\n\nUser: and then more", false)
        .unwrap();
    // The stop string spans several tokens.
    let stop = "\n\nUser:";
    let stop_ids = tok.encode(stop, false).unwrap();
    assert!(stop_ids.len() > 1);
    let (text, reason, n) = run(&tok, &ids, &params(&[stop], None));
    assert_eq!(text, "Sure, here it is.");
    assert_eq!(reason, Some(FinishReason::Stop(stop.to_string())));
    assert!(n < ids.len());

    // A stop string that starts inside a token: "ere i" is inside "here it".
    let (text, reason, _) = run(&tok, &ids, &params(&["ere i"], None));
    assert_eq!(text, "Sure, h");
    assert_eq!(reason, Some(FinishReason::Stop("ere i".into())));
}

#[test]
fn eos_ends_without_text_and_held_text_is_released() {
    let tok = Tokenizer::builtin().unwrap();
    let mut ids = tok.encode("Hello\n\nUs", false).unwrap();
    ids.push(100001);
    ids.extend(tok.encode("never shown", false).unwrap());
    // "\n\nUs" was held back as a possible start of the stop string, then released at EOS.
    let (text, reason, n) = run(&tok, &ids, &params(&["\n\nUser:"], None));
    assert_eq!(text, "Hello\n\nUs");
    assert_eq!(reason, Some(FinishReason::Eos));
    assert_eq!(n, tok.encode("Hello\n\nUs", false).unwrap().len() + 1);
}

#[test]
fn max_tokens_stops_and_flushes() {
    let tok = Tokenizer::builtin().unwrap();
    let ids = tok.encode("one two three four five", false).unwrap();
    let (text, reason, n) = run(&tok, &ids, &params(&[], Some(3)));
    assert_eq!(n, 3);
    assert_eq!(text, tok.decode(&ids[..3], true).unwrap());
    assert_eq!(reason, Some(FinishReason::MaxTokens));
}

#[test]
fn emoji_and_chinese_stream_whole_and_stop_on_emoji() {
    let tok = Tokenizer::builtin().unwrap();
    let s = "中文😀表情👍🏽结束";
    let ids = tok.encode(s, false).unwrap();
    let (text, reason, _) = run(&tok, &ids, &params(&[], None));
    assert_eq!((text.as_str(), reason), (s, None));
    let (text, reason, _) = run(&tok, &ids, &params(&["👍"], None));
    assert_eq!(text, "中文😀表情");
    assert_eq!(reason, Some(FinishReason::Stop("👍".into())));
}

#[test]
fn chat_turn_end_marker_as_stop_string() {
    // A model continuing past its answer into a new "User:" turn is cut there.
    let tok = Tokenizer::builtin().unwrap();
    let ids = tok.encode(" 4\n\nUser: what about 5?", false).unwrap();
    let (text, reason, _) = run(&tok, &ids, &params(&["User:"], None));
    assert_eq!(text, " 4\n\n");
    assert!(matches!(reason, Some(FinishReason::Stop(_))));
}
