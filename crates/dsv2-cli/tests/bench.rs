//! `dsv2 bench` end to end on the tiny `lite` fixture config.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON object on the last line of stdout.
fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("some stdout");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not an array in {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = num(v, key);
    assert!(x.is_finite() && x > 0.0, "`{key}` = {x} in {v}");
    x
}

/// Parameters of the lite fixture a batch-1 decode step reads (hand count): per layer,
/// attention (q_proj 96·64, kv_a 40·64, kv_a_layernorm 32, kv_b 128·32, o_proj 64·64,
/// two norms of 64) = 17,056, times 3 layers; dense layer 0: 3·96·64 = 18,432; per MoE
/// layer, router 8·64, shared 3·64·64 and 3 routed experts of 3·32·64 = 31,232, times 2;
/// lm_head 300·64; one embedding row and the final norm, 64 each.
const LITE_STEP_PARAMS: f64 = 3.0 * 17_056.0 + 18_432.0 + 2.0 * 31_232.0 + 19_200.0 + 128.0;

#[test]
fn bench_random_weights_reports_every_figure() {
    let config = fixture("lite").join("config.json");
    let out = dsv2(&[
        "bench",
        "--random-weights",
        config.to_str().unwrap(),
        "--prompt-lengths",
        "8,32",
        "--contexts",
        "0,100",
        "--batch-sizes",
        "1,3",
        "--decode-tokens",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = last_json(&out);

    positive(&report, "load_s");
    let peak_rss = positive(&report, "peak_rss_bytes");
    let load_rss = positive(&report, "load_rss_bytes");
    assert!(load_rss <= peak_rss, "{load_rss} > {peak_rss}");
    positive(&report, "bandwidth_gbps");
    // The threads' round trip next to each probe after the load: before the rows and
    // after each of the 4 decode rows (the probes also count the one before the load).
    let round_trips = floats(&report, "core_round_trip_ns");
    let probes = floats(&report, "bandwidth_probes_gbps");
    if std::thread::available_parallelism().unwrap().get() > 1 {
        assert_eq!(round_trips.len(), 5, "{report}");
        assert_eq!(probes.len(), round_trips.len() + 1, "{report}");
        assert!(
            round_trips.iter().all(|ns| (1.0..1e6).contains(ns)),
            "{report}"
        );
    }
    // 3 layers × (kv_lora_rank 32 + qk_rope_head_dim 8) × 4 bytes (the CPU cache is f32).
    assert_eq!(num(&report, "kv_bytes_per_token"), 480.0);
    assert_eq!(num(&report, "params"), 231_968.0);
    assert_eq!(num(&report, "weight_bytes"), 2.0 * 231_968.0);
    assert_eq!(report["weights_dtype"], "bf16");

    let prefill = report["prefill"].as_array().unwrap();
    let lengths: Vec<f64> = prefill.iter().map(|r| num(r, "prompt_tokens")).collect();
    assert_eq!(lengths, [8.0, 32.0]);
    // MFU against the peak rate measured on this CPU for the prefill's instruction
    // (bf16 weights under the CPU's default f32 activations: f32 FMA).
    let peak = positive(&report, "peak_tflops");
    let basis = report["peak_basis"].as_str().unwrap();
    assert!(
        basis.starts_with("f32 FMA") && basis.contains("measured"),
        "{basis}"
    );
    for row in prefill {
        positive(row, "tokens_per_s");
        let mfu = positive(row, "mfu");
        assert!(
            (mfu - num(row, "tflops_per_s") / peak).abs() < 1e-9 * mfu,
            "{row}"
        );
        assert!(mfu < 1.0, "{row}");
    }

    let decode = report["decode"].as_array().unwrap();
    let grid: Vec<(f64, f64)> = decode
        .iter()
        .map(|r| (num(r, "context"), num(r, "batch")))
        .collect();
    assert_eq!(grid, [(0.0, 1.0), (0.0, 3.0), (100.0, 1.0), (100.0, 3.0)]);
    for row in decode {
        let tps = positive(row, "tokens_per_s");
        let fraction = positive(row, "bandwidth_fraction");
        let floor = positive(row, "floor_tokens_per_s");
        assert!((fraction - tps / floor).abs() < 1e-9 * fraction, "{row}");
        assert_eq!(num(row, "steps"), 3.0);
        // On the CPU the floor is the best of a probe pass before the first timed step
        // and after each one; the best-of probes around the row are reported too.
        let passes = floats(row, "step_probes_gbps");
        assert_eq!(passes.len(), 4, "{row}");
        let steps = floats(row, "step_seconds");
        assert_eq!(steps.len(), 3, "{row}");
        let total: f64 = steps.iter().sum();
        assert!((total - num(row, "seconds")).abs() < 1e-9, "{row}");
        let best = passes.iter().copied().fold(0.0, f64::max);
        assert_eq!(num(row, "bandwidth_gbps"), best, "{row}");
        let bracket = positive(row, "bracket_bandwidth_gbps");
        let strict = positive(row, "bracket_bandwidth_fraction");
        assert!((strict * bracket - fraction * best).abs() < 1e-6 * fraction * best);
        // Each step against the better of the passes next to it: a floor no higher than
        // the best pass, so a fraction no lower.
        let bytes = num(row, "bytes_per_step");
        let floor_s: f64 = (0..3)
            .map(|i| bytes / (passes[i].max(passes[i + 1]) * 1e9))
            .sum();
        let near = positive(row, "neighbour_bandwidth_fraction");
        assert!((near - floor_s / total).abs() < 1e-9 * near, "{row}");
        assert!(near >= fraction * (1.0 - 1e-12), "{row}");
    }
    // Batch 1 at context 0: the weights touched in bf16, plus the timed steps' mean
    // context (4, 5 and 6 cached tokens, after the 3 untimed steps) of 480 bytes each.
    let bytes = num(&decode[0], "bytes_per_step");
    assert_eq!(bytes, 2.0 * LITE_STEP_PARAMS + 5.0 * 480.0);
    // Context 100 reads 100 more tokens of cache per step.
    assert_eq!(num(&decode[2], "bytes_per_step") - bytes, 100.0 * 480.0);

    // The routed experts in the floor are the ones the CPU ran: one token's top-3, and
    // for 3 tokens between 3 and all 8 (uniform routing would read 8·(1 − (5/8)³)).
    for row in decode {
        assert_eq!(row["routed_experts_counted"], true, "{row}");
        let (batch, counted) = (num(row, "batch"), num(row, "routed_experts_per_layer"));
        let uniform = num(row, "routed_experts_uniform");
        if batch == 1.0 {
            assert_eq!((counted, uniform), (3.0, 3.0), "{row}");
        } else {
            assert!((3.0..=8.0).contains(&counted), "{row}");
            assert!(
                (uniform - 8.0 * (1.0 - 0.625f64.powi(3))).abs() < 1e-12,
                "{row}"
            );
        }
    }
    // Batch 3 at context 0 against batch 1: the extra routed experts (3·32·64 bf16
    // weights each, in 2 MoE layers), 3 × 5 cached tokens instead of 5, 3 embedding rows.
    let extra = num(&decode[1], "routed_experts_per_layer") - 3.0;
    let b3 = bytes + extra * 2.0 * 2.0 * 3.0 * 32.0 * 64.0 + 10.0 * 480.0 + 2.0 * 2.0 * 64.0;
    let got = num(&decode[1], "bytes_per_step");
    assert!((got - b3).abs() < 1e-6 * b3, "{got} != {b3}");
}

#[test]
fn bench_runs_a_checkpoint_in_its_dtype() {
    let dir = fixture("lite");
    let out = dsv2(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-lengths",
        "4",
        "--contexts",
        "0",
        "--batch-sizes",
        "2",
        "--decode-tokens",
        "2",
        "--peak-tflops",
        "1.5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = last_json(&out);
    assert_eq!(report["weights_dtype"], "f32");
    assert_eq!(num(&report, "peak_tflops"), 1.5);
    assert_eq!(report["peak_basis"], "--peak-tflops");
    assert_eq!(num(&report, "weight_bytes"), 4.0 * 231_968.0);
    positive(&report["decode"][0], "tokens_per_s");
    positive(&report["prefill"][0], "tokens_per_s");
}

#[test]
fn bench_quantizes_random_weights_at_load() {
    let config = fixture("lite").join("config.json");
    let out = dsv2(&[
        "bench",
        "--random-weights",
        config.to_str().unwrap(),
        "--quantize",
        "q8",
        "--prompt-lengths",
        "4",
        "--contexts",
        "0",
        "--batch-sizes",
        "1",
        "--decode-tokens",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = last_json(&out);
    assert_eq!(report["weights_dtype"], "bf16, q8 at load");
    let basis = report["peak_basis"].as_str().unwrap();
    // The prefill's instruction: q8 prompt rows take bf16 activations on AMX tiles, or
    // where the CPU's bf16 dot product keeps pace with its int8 one.
    let want = if dsv2_cpu::q8_prompt_rows_on_amx_tiles() {
        "bf16 tiles (amx-bf16, q8 prompt rows)"
    } else if dsv2_cpu::q8_prompt_rows_in_bf16() {
        "bf16 dot products (avx512-bf16, q8 prompt rows)"
    } else {
        "int8 dot products"
    };
    assert!(basis.starts_with(want), "{basis}");
    // Matrices with 32-multiple rows of K become K + 2·K/32 bytes per row; embeddings,
    // norms, routers and kv_b_proj stay bf16 (hand count over the lite fixture):
    // embed 38,400; per layer q_proj 6,528, kv_a 2,720, kv_a_layernorm 64, kv_b 8,192,
    // o_proj 4,352, norms 256 (×3); dense MLP 3 × 6,528; per MoE layer router 1,024,
    // 8 experts × 6,528, shared 13,056 (×2); final norm 128; lm_head (bf16 under q8)
    // 38,400.
    let want = 38_400 + 3 * 22_112 + 19_584 + 2 * 66_304 + 128 + 38_400;
    assert_eq!(num(&report, "weight_bytes"), want as f64);
    positive(&report["decode"][0], "tokens_per_s");
    assert_eq!(num(&report, "kv_bytes_per_token"), 480.0);
}

#[test]
fn loop_profile_accounts_for_the_decode_steps() {
    let config = fixture("lite").join("config.json");
    let out = dsv2(&[
        "bench",
        "--random-weights",
        config.to_str().unwrap(),
        "--quantize",
        "q8",
        "--prompt-lengths",
        "4",
        "--contexts",
        "0",
        "--batch-sizes",
        "1,3",
        "--decode-tokens",
        "3",
        "--loop-profile",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("loops, batch 3 context 0"), "{stdout}");
    let report = last_json(&out);
    for row in report["decode"].as_array().unwrap() {
        let profile = &row["loop_profile"];
        let sites = profile["sites"].as_array().expect("sites");
        let sum = |key: &str| sites.iter().map(|s| num(s, key)).sum::<f64>();
        // Every layer's products start loops at lines of the CPU backend.
        let loops = sum("loops") / num(row, "steps");
        assert!(loops >= 3.0, "{loops} loops a step in {profile}");
        assert!(sites
            .iter()
            .all(|s| s["site"].as_str().unwrap().contains("crates/dsv2-cpu/src/")));
        // Loops and the stretches before them lie inside the timed steps.
        let inside = sum("loop_seconds") + sum("before_seconds");
        assert!(inside <= num(row, "seconds") * 1.001, "{inside} s in {row}");
        assert!(sum("busy_seconds") > 0.0);
    }
}

#[test]
fn bench_counts_a_bf16_kv_cache_at_two_bytes_a_value() {
    let config = fixture("lite").join("config.json");
    let out = dsv2(&[
        "bench",
        "--random-weights",
        config.to_str().unwrap(),
        "--quantize",
        "q8",
        "--kv-cache-dtype",
        "bf16",
        "--prompt-lengths",
        "4",
        "--contexts",
        "0,64",
        "--batch-sizes",
        "1",
        "--decode-tokens",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = last_json(&out);
    let device = report["device"].as_str().unwrap();
    // The activations, the q8 products' two int8 terms (with float prompt rows where the
    // CPU gives them: bf16 on AVX-512 BF16, f32 on AVX2 without an int8 dot product), the
    // bf16 cache, then the kernels in use.
    assert!(
        device.contains("f32 activations, int8 activation terms 2")
            && device.contains(", bf16 latent cache; kernels int8 "),
        "{device}"
    );
    if dsv2_cpu::q8_prompt_rows_in_bf16() {
        assert!(device.contains("terms 2 (prompt rows bf16"), "{device}");
    }
    if dsv2_cpu::q8_prompt_rows_on_amx_tiles() {
        assert!(
            device.contains("(prompt rows bf16 on AMX tiles)")
                && device.contains(", tiles amx-bf16"),
            "{device}"
        );
    }
    // 3 layers × 40 cached values × 2 bytes.
    assert_eq!(num(&report, "kv_bytes_per_token"), 240.0);
    positive(&report["decode"][1], "tokens_per_s");
}

/// Under q4 the CPU's latent cache defaults to bf16 (its rounding is small next to q4's;
/// `crates/dsv2-engine/tests/fixtures.rs`), and `--kv-cache-dtype f32` still gets f32.
#[test]
fn q4_defaults_to_a_bf16_kv_cache() {
    let config = fixture("lite").join("config.json");
    for (cache, bytes) in [(None, 240.0), (Some("f32"), 480.0)] {
        let mut args = vec![
            "bench",
            "--random-weights",
            config.to_str().unwrap(),
            "--quantize",
            "q4",
            "--prompt-lengths",
            "4",
            "--contexts",
            "0,64",
            "--batch-sizes",
            "1",
            "--decode-tokens",
            "2",
            "--json",
        ];
        if let Some(cache) = cache {
            args.extend(["--kv-cache-dtype", cache]);
        }
        let out = dsv2(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let report = last_json(&out);
        let device = report["device"].as_str().unwrap();
        // q4 products take one int8 activation term, and so (by default) do its q8 ones.
        let want = format!(
            "int8 activation terms q8 1 q4 1, {} latent cache; kernels int8 ",
            cache.unwrap_or("bf16")
        );
        assert!(device.contains(&want), "{device}");
        // 3 layers × 40 cached values × 2 (bf16) or 4 (f32) bytes.
        assert_eq!(num(&report, "kv_bytes_per_token"), bytes);
        positive(&report["decode"][1], "tokens_per_s");
    }
}

#[test]
fn bench_rejects_what_it_cannot_run() {
    let config = fixture("lite").join("config.json");
    let config = config.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["bench"], "--random-weights"),
        (
            &["bench", "--random-weights", config, "--peak-tflops", "0"],
            "--peak-tflops must be positive",
        ),
        (
            &["bench", "--random-weights", config, "--weights-dtype", "q8"],
            "--quantize",
        ),
        (
            &["bench", "--random-weights", config, "--contexts", "5110"],
            "max_position_embeddings",
        ),
        (
            &["bench", "--random-weights", config, "--device", "cuda"],
            "CUDA",
        ),
        (&["bench", "--random-weights", "deepseek-v3"], "deepseek-v3"),
        (
            &[
                "bench",
                "--random-weights",
                config,
                "--activation-terms",
                "1",
            ],
            "no quantized weights",
        ),
    ];
    for (args, needle) in cases {
        let out = dsv2(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

/// The machine's memory and swap together, from `/proc/meminfo` (Linux).
fn memory_and_swap() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

#[test]
fn weights_larger_than_memory_are_refused_before_loading() {
    // DeepSeek-V2 at q4 keeps 140.6 GB; on a machine with less memory and swap, the
    // bench must stop at once with the sizes, not make weights until the out-of-memory
    // kill.
    match memory_and_swap() {
        Some(total) if total < 140_000_000_000 => {}
        _ => return,
    }
    let out = dsv2(&[
        "bench",
        "--random-weights",
        "deepseek-v2",
        "--quantize",
        "q4",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("deepseek-v2: its weights need 140.6 GB of memory on the CPU"),
        "{err}"
    );
    assert!(err.contains("killed for lack of memory"), "{err}");
}
