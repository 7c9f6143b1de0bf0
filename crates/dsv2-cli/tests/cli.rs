//! The `dsv2` binary's command-line contracts, run as a user runs them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dsv2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv2"))
        .args(args)
        .output()
        .expect("run dsv2")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A fresh folder under the system's temp folder, removed (with what the test wrote in
/// it) when dropped.
fn tmp(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("dsv2-cli-{tag}-"))
        .tempdir()
        .expect("create a scratch folder")
}

/// Reads tensor `name` of a safetensors file as f32 (F32) or as ids (I64).
fn read_tensor(path: &Path, name: &str) -> (Vec<f64>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (values, t.shape().to_vec())
}

fn ids_arg(ids: &[f64]) -> String {
    ids.iter()
        .map(|v| (*v as u32).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn logits_command_writes_the_reference_logits() {
    let dir = fixture("v2");
    let reference = dir.join("reference.safetensors");
    let (prompt, _) = read_tensor(&reference, "prompt.1");
    let (want, want_shape) = read_tensor(&reference, "logits.1");
    let scratch = tmp("logits");
    let out_dir = scratch.path();
    let out_path = out_dir.join("out.safetensors");
    let out = dsv2(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        &ids_arg(&prompt),
        "--output",
        out_path.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (got, shape) = read_tensor(&out_path, "logits");
    assert_eq!(shape, want_shape);
    let vocab = shape[1];
    for p in 0..shape[0] {
        let (g, w) = (
            &got[p * vocab..(p + 1) * vocab],
            &want[p * vocab..(p + 1) * vocab],
        );
        let num: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = w.iter().map(|b| b * b).sum();
        assert!((num / den).sqrt() <= 1e-4, "position {p}");
    }
}

#[test]
fn generate_json_contract() {
    let dir = fixture("lite");
    let reference = dir.join("reference.safetensors");
    let (prompt, _) = read_tensor(&reference, "prompt.0");
    let (greedy, _) = read_tensor(&reference, "greedy.0");
    let out = dsv2(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        &ids_arg(&prompt),
        "--max-tokens",
        &greedy.len().to_string(),
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.trim_end().lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    let ids: Vec<f64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ids, greedy);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], greedy.len());
}

#[test]
fn builtin_model_runs_without_model_flag() {
    let out = dsv2(&[
        "generate",
        "--token-ids",
        "100000,5,17",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("built-in model"));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim_end().lines().last().unwrap()).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 3);
}

/// Asserts a failed run with exactly one line on stderr containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(err.contains(needle), "stderr: {err}");
}

#[test]
fn bad_input_is_a_one_line_error() {
    let lite = fixture("lite");
    let lite = lite.to_str().unwrap();
    let out = dsv2(&["generate", "--token-ids", "1", "--bogus"]);
    assert_one_line_error(&out, "--bogus");
    let out = dsv2(&["generate", "--model", lite, "--token-ids", "1,99999"]);
    assert_one_line_error(&out, "token id 99999");
    let out = dsv2(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--token-ids",
        "1",
    ]);
    assert_one_line_error(&out, "/nonexistent/model");
    let out = dsv2(&["generate", "--token-ids", "1", "--dtype", "f8"]);
    assert_one_line_error(&out, "f8");
    let out = dsv2(&["generate", "--token-ids", "1", "--kv-cache-dtype", "f8"]);
    assert_one_line_error(&out, "f8");
}

/// `--threads N` sizes the CPU's team; the logits are bit-identical on one thread and on
/// every CPU, in f32 and at q8 (each output's arithmetic does not depend on how its tasks
/// are spread). A thread count of 0 or above the CPUs is a one-line error.
#[test]
fn the_thread_count_does_not_change_the_logits() {
    let dir = fixture("lite");
    let reference = dir.join("reference.safetensors");
    let (prompt, _) = read_tensor(&reference, "prompt.0");
    let ids = ids_arg(&prompt);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let scratch = tmp("threads");
    let out_dir = scratch.path();
    for quantize in [None, Some("q8")] {
        let mut runs = Vec::new();
        for threads in [1, cpus] {
            let path = out_dir.join(format!("{threads}-{quantize:?}.safetensors"));
            let threads = threads.to_string();
            let mut args = vec![
                "logits",
                "--threads",
                &threads,
                "--model",
                dir.to_str().unwrap(),
                "--token-ids",
                &ids,
                "--output",
                path.to_str().unwrap(),
            ];
            if let Some(q) = quantize {
                args.extend(["--quantize", q]);
            }
            let out = dsv2(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            runs.push(read_tensor(&path, "logits").0);
        }
        assert_eq!(runs[0], runs[1], "1 against {cpus} threads, {quantize:?}");
    }
    let out = dsv2(&["generate", "--threads", "0", "--token-ids", "1"]);
    assert_one_line_error(&out, "--threads 0");
    let too_many = (cpus + 1).to_string();
    let out = dsv2(&["generate", "--threads", &too_many, "--token-ids", "1"]);
    assert_one_line_error(&out, &format!("{cpus} CPUs"));
}

/// `--activation-terms` sets the int8 terms of q8 products on every row: 2 is what q8's
/// default takes for decode rows and short prompts (where the CPU has AVX-512 BF16 a
/// longer prompt's rows take bf16 activations instead, within q8's budget of them), 1
/// moves them (llama.cpp's q8_0 activation rounding; its error is measured in
/// `crates/dsv2-engine/tests/fixtures.rs`). Without quantized weights, on CUDA, or
/// outside 1..=2 it is a one-line error.
#[test]
fn activation_terms_select_the_q8_activation_rounding() {
    let dir = fixture("lite");
    // 64 tokens: past the dense products' threshold for bf16 prompt rows (16).
    let (prompt, _) = read_tensor(&dir.join("reference.safetensors"), "prompt.1");
    let ids = ids_arg(&prompt);
    let scratch = tmp("terms");
    let out_dir = scratch.path();
    let logits = |terms: Option<&str>| {
        let path = out_dir.join(format!("{terms:?}.safetensors"));
        let mut args = vec![
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--quantize",
            "q8",
            "--token-ids",
            &ids,
            "--output",
            path.to_str().unwrap(),
        ];
        if let Some(terms) = terms {
            args.extend(["--activation-terms", terms]);
        }
        let out = dsv2(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        read_tensor(&path, "logits").0
    };
    let default = logits(None);
    // Unset, the prompt's rows take bf16 activations where the CPU's bf16 dot product keeps
    // pace with its int8 one; an explicit 2 keeps two int8 terms on every row. Both within
    // q8's budget of each other.
    let two = logits(Some("2"));
    if dsv2_cpu::q8_prompt_rows_in_bf16() {
        assert_ne!(two, default);
        let (diff, norm) = two
            .iter()
            .zip(&default)
            .fold((0.0f64, 0.0f64), |(d, n), (a, b)| {
                (d + (a - b).powi(2), n + b.powi(2))
            });
        assert!((diff / norm).sqrt() < 1e-2, "{}", (diff / norm).sqrt());
    } else {
        assert_eq!(two, default);
    }
    let one = logits(Some("1"));
    assert_eq!(one.len(), default.len());
    assert_ne!(one, default);
    let model = dir.to_str().unwrap();
    let out = dsv2(&[
        "generate",
        "--model",
        model,
        "--token-ids",
        "1",
        "--activation-terms",
        "1",
    ]);
    assert_one_line_error(&out, "no quantized weights");
    let out = dsv2(&[
        "generate",
        "--token-ids",
        "1",
        "--quantize",
        "q8",
        "--activation-terms",
        "3",
    ]);
    assert_one_line_error(&out, "--activation-terms");
    let out = dsv2(&[
        "generate",
        "--device",
        "cuda",
        "--token-ids",
        "1",
        "--activation-terms",
        "1",
    ]);
    assert!(!out.status.success());
}

/// `--kv-cache-dtype bf16` under `--dtype bf16` is exact: the same greedy tokens as an f32
/// cache, from a cache half the size.
#[test]
fn a_bf16_kv_cache_under_bf16_generates_the_same_tokens() {
    let lite = fixture("lite");
    let reference = lite.join("reference.safetensors");
    let (prompt, _) = read_tensor(&reference, "prompt.1");
    let run = |cache: &str| {
        let out = dsv2(&[
            "generate",
            "--model",
            lite.to_str().unwrap(),
            "--token-ids",
            &ids_arg(&prompt),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--dtype",
            "bf16",
            "--kv-cache-dtype",
            cache,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim_end().lines().last().unwrap()).unwrap();
        v["token_ids"].clone()
    };
    assert_eq!(run("bf16"), run("f32"));
}

#[test]
fn truncated_checkpoint_names_the_tensor_and_file() {
    let scratch = tmp("truncated");
    let dir = scratch.path();
    for entry in std::fs::read_dir(fixture("plain")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let shard = dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let out = dsv2(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        "1,2",
        "--output",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "model-00002-of-00002.safetensors");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(stderr(&out).contains("tensor `"), "{}", stderr(&out));
}

/// `dsv2 logits` of tokens 1..=5 from `model` (plus `extra` flags), written to `out`:
/// the file's bytes.
fn logits_of_five_tokens(model: &Path, extra: &[&str], out: &Path) -> Vec<u8> {
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--token-ids",
        "1,2,3,4,5",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = dsv2(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    std::fs::read(out).unwrap()
}

#[test]
fn quantized_checkpoint_in_shards_loads_as_one_file_does() {
    let scratch = tmp("quantize-shards");
    let dir = scratch.path();
    let lite = fixture("lite");
    let quantize = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "--model",
            lite.to_str().unwrap(),
            "--to",
            "q4",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        dsv2(&args)
    };
    let one = dir.join("one");
    assert!(quantize(&one, &[]).status.success());
    let sharded = dir.join("sharded");
    let out = quantize(&sharded, &["--max-shard-size", "100KB"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Shards of at most 100 KB (or one tensor), listed by the index, no partial files.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() > 2, "{files:?}");
    let mut data_bytes = 0;
    for (i, file) in files.iter().enumerate() {
        assert_eq!(
            *file,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len())
        );
        let bytes = std::fs::read(sharded.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let shard_bytes: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        assert!(
            shard_bytes <= 100_000 || st.len() == 1,
            "{file}: {shard_bytes}"
        );
        data_bytes += shard_bytes;
    }
    assert_eq!(index["metadata"]["total_size"], data_bytes);
    assert!(!sharded.join("model.safetensors").exists());
    let names: Vec<_> = std::fs::read_dir(&sharded)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".partial")), "{names:?}");
    // The same logits as the single file.
    assert_eq!(
        logits_of_five_tokens(&sharded, &[], &dir.join("a.safetensors")),
        logits_of_five_tokens(&one, &[], &dir.join("b.safetensors"))
    );
    // A folder that holds a checkpoint is not written over.
    let again = quantize(&sharded, &["--max-shard-size", "100KB"]);
    assert_one_line_error(&again, "already holds a checkpoint");
    let again = quantize(&one, &["--max-shard-size", "100KB"]);
    assert_one_line_error(&again, "already holds a checkpoint");
}

#[test]
fn quantized_checkpoint_loads_without_requantizing() {
    for format in ["q8", "q4"] {
        let scratch = tmp(&format!("quantize-{format}"));
        let dir = scratch.path();
        let out_dir = dir.join("model");
        let lite = fixture("lite");
        let out = dsv2(&[
            "quantize",
            "--model",
            lite.to_str().unwrap(),
            "--to",
            format,
            "--output",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        // Written under a temporary name, renamed when complete.
        assert!(!out_dir.join("model.safetensors.partial").exists());
        // The file holds the quantized planes and says which format it is.
        let bytes = std::fs::read(out_dir.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().unwrap()["dsv2_quantization"],
            format
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let plane = st
            .tensor("model.layers.1.mlp.experts.0.up_proj.weight.qweight")
            .unwrap();
        let want = if format == "q8" {
            safetensors::Dtype::I8
        } else {
            safetensors::Dtype::U8
        };
        assert_eq!(plane.dtype(), want);
        assert!(st.tensor("model.embed_tokens.weight").is_ok());
        // Loading it gives exactly the logits of quantizing at load time.
        let run = |model: &Path, extra: &[&str], file: &str| {
            logits_of_five_tokens(model, extra, &dir.join(file))
        };
        let from_file = run(&out_dir, &[], "a.safetensors");
        let at_load = run(&lite, &["--quantize", format], "b.safetensors");
        assert_eq!(from_file, at_load, "{format}");
        // The quantized file takes --activation-terms without --quantize, as at load.
        let one_term = ["--activation-terms", "1"];
        let from_file = run(&out_dir, &one_term, "a1.safetensors");
        let at_load = run(
            &lite,
            &["--quantize", format, one_term[0], one_term[1]],
            "b1.safetensors",
        );
        assert_eq!(from_file, at_load, "{format}, one term");
        // A file of the old row-major layout (version 1) is refused, not misread.
        assert_eq!(meta.metadata().as_ref().unwrap()["dsv2_quant_version"], "2");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        let old = header.replace(r#""dsv2_quant_version":"2""#, r#""dsv2_quant_version":"1""#);
        assert_ne!(old, header);
        let mut v1 = bytes[..8].to_vec();
        v1.extend_from_slice(old.as_bytes());
        v1.extend_from_slice(&bytes[8 + header_len..]);
        std::fs::write(out_dir.join("model.safetensors"), v1).unwrap();
        let out = dsv2(&[
            "logits",
            "--model",
            out_dir.to_str().unwrap(),
            "--token-ids",
            "1,2",
            "--output",
            dir.join("c.safetensors").to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("layout version 1"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn tokenize_text_and_chat() {
    let out = dsv2(&["tokenize", "--text", "Hello world", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"][0], 100000, "BOS first");
    assert_eq!(v["text"], "Hello world");
    let scratch = tmp("tokenize");
    let dir = scratch.path();
    let chat = dir.join("chat.json");
    std::fs::write(
        &chat,
        r#"[{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]"#,
    )
    .unwrap();
    let out = dsv2(&[
        "tokenize",
        "--chat",
        chat.to_str().unwrap(),
        "--add-generation-prompt",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["text"],
        "<｜begin▁of▁sentence｜>S\n\nUser: U\n\nAssistant: A<｜end▁of▁sentence｜>User: V\n\nAssistant:"
    );
    let ids = v["token_ids"].as_array().unwrap();
    assert_eq!(ids[0], 100000);
    assert_eq!(ids.iter().filter(|x| **x == 100000).count(), 1, "one BOS");
}

#[test]
fn seeded_sampling_repeats_and_stop_strings_cut() {
    let gen = |seed: &str| {
        let out = dsv2(&[
            "generate",
            "--prompt",
            "Hello",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let stdout = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str::<serde_json::Value>(stdout.trim_end().lines().last().unwrap())
            .unwrap()
    };
    let (a, b, c) = (gen("7"), gen("7"), gen("8"));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_ne!(a["token_ids"], c["token_ids"]);
    // A stop string taken from the middle of the seeded text: generation stops there and
    // the stop string is not emitted.
    let text = a["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let out = dsv2(&[
        "generate",
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--stop",
        &stop,
        "--json",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim_end().lines().last().unwrap()).unwrap();
    let cut = v["text"].as_str().unwrap();
    assert_eq!(v["finish_reason"], "stop");
    assert!(
        text.starts_with(cut) && !cut.contains(&stop),
        "{cut:?} / {stop:?}"
    );
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
}

#[test]
fn chat_repl_keeps_history_and_survives_ctrl_c() {
    use std::io::Write;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsv2"))
        .args(["chat", "--max-tokens", "50000", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            let _ = tx.send(());
        }
        all
    });
    // A long answer, interrupted with SIGINT once it streams: the answer stops, the
    // program does not.
    writeln!(stdin, "Tell me a long story").unwrap();
    stdin.flush().unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the answer starts streaming");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Then commands and a clean exit.
    writeln!(stdin, "/system Be brief.").unwrap();
    writeln!(stdin, "/reset").unwrap();
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(120));
    let answer = reader.join().unwrap();
    assert!(!answer.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(stopped)"), "{err}");
    assert!(err.contains("(conversation cleared)"), "{err}");
    assert!(err.contains("tokens/s]"), "{err}");
}

#[test]
fn perplexity_matches_the_reference_logits() {
    // The first 260 tokens of the 520-token prompt as one chunk; the expected value is
    // computed here from the fixture's HF reference logits (its second half scored).
    let dir = fixture("plain");
    let reference = dir.join("reference.safetensors");
    let (prompt, _) = read_tensor(&reference, "prompt.2");
    let (logits, shape) = read_tensor(&reference, "logits.2");
    let vocab = shape[1];
    let context = 260;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for pos in context / 2..context - 1 {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - max).exp()).sum();
        sum += max + z.ln() - row[prompt[pos + 1] as usize];
        count += 1;
    }
    let want = (sum / count as f64).exp();
    let out = dsv2(&[
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        &ids_arg(&prompt[..context]),
        "--context",
        &context.to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let got = report["perplexity"].as_f64().unwrap();
    assert!(
        (got / want - 1.0).abs() < 1e-4,
        "perplexity {got}, reference {want}"
    );
    assert_eq!(report["tokens_scored"], serde_json::json!(context / 2 - 1));
    assert_eq!(report["chunks"], serde_json::json!(1));

    // Too short an input names the problem.
    let out = dsv2(&[
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        "1,2,3",
        "--context",
        "8",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("fewer than one chunk"),
        "{}",
        stderr(&out)
    );
}
