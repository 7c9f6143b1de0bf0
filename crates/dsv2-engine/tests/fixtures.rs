//! The golden fixtures of `tests/fixtures/` (tiny random DeepSeek-V2 checkpoints in the
//! hub layout, with reference logits and greedy continuations from HF transformers,
//! made by `tools/fixtures/make_fixtures.py`), checked on the CPU backend.

use std::path::{Path, PathBuf};

use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::{Checkpoint, ModelConfig};
use dsv2_cpu::CpuBackend;
use dsv2_engine::{Generator, Greedy};
use dsv2_model::Model;

const FIXTURES: [&str; 3] = ["lite", "v2", "plain"];

/// The trained fixtures (`tools/fixtures/train_tiny.py`): tiny DeepSeek-V2s trained on
/// five Jane Austen novels, with reference logits of three held-out prompts (BOS + 31
/// tokens of Pride and Prejudice): `austen` routes like V2-Lite, `austen-v2` like V2
/// (group-limited top-4 of 16, routed output ×16, q_lora, YaRN). Used for the quality of
/// the weight formats.
const TRAINED: [&str; 2] = ["austen", "austen-v2"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The reference tensors of one fixture.
struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open(name: &str) -> Reference {
        let path = fixture_dir(name).join("reference.safetensors");
        Reference {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn tensors(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn has(&self, name: &str) -> bool {
        self.tensors().names().contains(&name)
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        let t = self.tensors();
        let t = t.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }

    fn f32s(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.tensors();
        let t = t.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }

    fn num_prompts(&self) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("prompt.{i}")))
            .count()
    }
}

fn load(name: &str, dtype: ComputeDtype) -> (CpuBackend, Model<CpuBackend>) {
    let dir = fixture_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let backend = CpuBackend::new(dtype);
    let model = Model::load(&backend, config, &checkpoint).unwrap();
    (backend, model)
}

fn all_logits(
    backend: &CpuBackend,
    model: &Model<CpuBackend>,
    prompt: &[u32],
    path: AttentionPath,
) -> Vec<f32> {
    let block = 16;
    let table: Vec<u32> = (0..prompt.len().div_ceil(block) as u32).rev().collect();
    let mut cache = backend
        .alloc_cache(model.cache_spec(table.len(), block))
        .unwrap();
    let mut ws = model.workspace(backend, prompt.len()).unwrap();
    let mut batch = Batch::default();
    batch.push_seq(prompt, 0, &table, block, LogitsWanted::All);
    let mut out = vec![0.0; prompt.len() * model.config.vocab_size];
    model
        .forward(backend, &batch, &mut cache, &mut ws, path, &mut out)
        .unwrap();
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(x: &[f32]) -> usize {
    dsv2_engine::argmax(x) as usize
}

/// Positions (rows of `vocab` logits) where `got` and `want` pick the same token.
fn argmax_agreement(got: &[f32], want: &[f32], vocab: usize) -> usize {
    got.chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .filter(|(g, w)| argmax(g) == argmax(w))
        .count()
}

#[test]
fn f32_logits_match_the_reference_at_every_position() {
    for name in FIXTURES {
        let (backend, model) = load(name, ComputeDtype::F32);
        let reference = Reference::open(name);
        let vocab = model.config.vocab_size;
        let n = reference.num_prompts();
        assert!(
            n >= 3,
            "{name}: expected prompts of 7, 64 and >= 512 tokens"
        );
        for i in 0..n {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let (want, shape) = reference.f32s(&format!("logits.{i}"));
            assert_eq!(shape, vec![prompt.len(), vocab]);
            let got = all_logits(&backend, &model, &prompt, AttentionPath::Auto);
            let mut worst = 0.0f64;
            for p in 0..prompt.len() {
                let (g, w) = (
                    &got[p * vocab..(p + 1) * vocab],
                    &want[p * vocab..(p + 1) * vocab],
                );
                let err = rel_err(g, w);
                worst = worst.max(err);
                assert!(
                    err <= 1e-4,
                    "{name} prompt {i} position {p}: relative error {err}"
                );
                assert_eq!(
                    argmax(g),
                    argmax(w),
                    "{name} prompt {i} position {p}: argmax"
                );
            }
            eprintln!(
                "{name} prompt {i} ({} tokens): worst relative error {worst:.2e}",
                prompt.len()
            );
        }
    }
}

/// Every reference prompt of fixture `name` through `model` (prefill's attention:
/// `AttentionPath::Auto`): (relative logit error against the reference, argmax
/// agreement, prompt length) per prompt, each printed under `label`.
fn prompt_errors(
    label: &str,
    name: &str,
    backend: &CpuBackend,
    model: &Model<CpuBackend>,
) -> Vec<(f64, usize, usize)> {
    path_errors(label, name, backend, model, AttentionPath::Auto)
}

/// [`prompt_errors`] with every position through attention `path`.
fn path_errors(
    label: &str,
    name: &str,
    backend: &CpuBackend,
    model: &Model<CpuBackend>,
    path: AttentionPath,
) -> Vec<(f64, usize, usize)> {
    let reference = Reference::open(name);
    let vocab = model.config.vocab_size;
    (0..reference.num_prompts())
        .map(|i| {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let (want, _) = reference.f32s(&format!("logits.{i}"));
            let got = all_logits(backend, model, &prompt, path);
            let (err, agree) = (rel_err(&got, &want), argmax_agreement(&got, &want, vocab));
            eprintln!(
                "{label}{name} prompt {i} ({path:?}): relative error {err:.4e}, argmax {agree}/{}",
                prompt.len()
            );
            (err, agree, prompt.len())
        })
        .collect()
}

#[test]
fn trained_fixture_f32_logits_match_the_reference() {
    for name in TRAINED {
        let (backend, model) = load(name, ComputeDtype::F32);
        let errors = prompt_errors("", name, &backend, &model);
        assert_eq!(errors.len(), 3);
        for (i, (err, agree, len)) in errors.into_iter().enumerate() {
            assert!(err <= 1e-5, "{name} prompt {i}: {err}");
            assert_eq!(agree, len, "{name} prompt {i}");
        }
    }
}

#[test]
fn greedy_continuations_match_the_reference() {
    for name in FIXTURES {
        let (backend, model) = load(name, ComputeDtype::F32);
        let reference = Reference::open(name);
        for i in 0..reference.num_prompts() {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let want = reference.ids(&format!("greedy.{i}"));
            let mut generator =
                Generator::new(&backend, &model, prompt.len() + want.len()).unwrap();
            // No EOS: the reference continuations run the full length.
            let out = generator
                .generate(&prompt, want.len(), &[], &mut Greedy, &mut |_| true)
                .unwrap();
            assert_eq!(out.token_ids, want, "{name} prompt {i}");
        }
    }
}

#[test]
fn absorbed_attention_matches_expanded_on_fixtures() {
    for name in FIXTURES {
        let (backend, model) = load(name, ComputeDtype::F32);
        let reference = Reference::open(name);
        // Prompt 2 (520 tokens) takes the absorbed weighted sum past one SUM_CHUNK (512
        // positions): its last positions sum two chunks.
        for i in [1, 2] {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let expanded = all_logits(&backend, &model, &prompt, AttentionPath::Expanded);
            let absorbed = all_logits(&backend, &model, &prompt, AttentionPath::Absorbed);
            let err = rel_err(&absorbed, &expanded);
            assert!(err <= 1e-5, "{name} prompt {i}: relative error {err}");
        }
    }
}

#[test]
fn bf16_compute_tracks_the_references() {
    for name in FIXTURES {
        let (backend, model) = load(name, ComputeDtype::Bf16);
        let reference = Reference::open(name);
        let vocab = model.config.vocab_size;
        for i in 0..2 {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let got = all_logits(&backend, &model, &prompt, AttentionPath::Auto);
            let (want_f32, _) = reference.f32s(&format!("logits.{i}"));
            let (want_bf16, _) = reference.f32s(&format!("logits_bf16.{i}"));
            let err_f32 = rel_err(&got, &want_f32);
            let err_bf16 = rel_err(&got, &want_bf16);
            let hf_bf16 = rel_err(&want_bf16, &want_f32);
            let agree = argmax_agreement(&got, &want_f32, vocab);
            eprintln!(
                "{name} prompt {i}: bf16 vs f32 reference {err_f32:.2e} (HF's own bf16: \
                 {hf_bf16:.2e}), vs HF bf16 {err_bf16:.2e}, argmax {agree}/{}",
                prompt.len()
            );
            // bf16 keeps 8 mantissa bits: HF's own bf16 run is ~8e-3 from its f32 run on
            // these fixtures. Ours must be within 2e-2 (or no further than HF's bf16 with a
            // 50% margin), and within both noises of HF's bf16 run.
            let bound = (1.5 * hf_bf16).max(2e-2);
            assert!(err_f32 <= bound, "{name} prompt {i}: {err_f32} > {bound}");
            assert!(err_bf16 <= 2.0 * bound, "{name} prompt {i}: {err_bf16}");
            assert!(
                agree as f64 >= 0.9 * prompt.len() as f64,
                "{name} prompt {i}: argmax agreement {agree}/{}",
                prompt.len()
            );
        }
    }
}

fn load_quantized(name: &str, format: dsv2_core::QuantFormat) -> (CpuBackend, Model<CpuBackend>) {
    load_quantized_on(name, format, CpuBackend::new(ComputeDtype::F32))
}

fn load_quantized_on(
    name: &str,
    format: dsv2_core::QuantFormat,
    backend: CpuBackend,
) -> (CpuBackend, Model<CpuBackend>) {
    let dir = fixture_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let options = dsv2_model::LoadOptions {
        quantize: Some(format),
    };
    let model = Model::load_with(&backend, config, &checkpoint, &options).unwrap();
    (backend, model)
}

#[test]
fn quantized_logits_stay_within_the_format_budget() {
    use dsv2_core::QuantFormat;
    // Measured (f32 reference; the int8 kernels are bit-identical on every instruction
    // set): q8 (scale search, two int8 activation terms, lm_head kept dense)
    // 5.3e-3..9.2e-3 on the random fixtures and 2.5e-3..9.3e-3 on the trained ones; with
    // the default bf16 activations for the 64- and 520-token prompts' rows on AVX-512
    // BF16 (`dsv2_cpu`'s `q8_bf16`, and their attention in bf16; the 7-token ones stay
    // int8) 5.6e-3..9.57e-3 and 2.9e-3..8.2e-3: issue #5's 1e-2 holds on every prompt
    // (it was 1.15e-2..2.14e-2 with one activation term, absmax scales and a q8
    // lm_head: tools/fixtures/quant_error.py). q4 (routed experts at 4
    // bits, the rest as q8 but with a q8 lm_head, every matrix with one activation term)
    // 2.4e-2..3.6e-2 on `lite`/`plain`, 6.2e-2..1.02e-1 on `v2` (routed_scaling_factor
    // 16 multiplies the routed experts' error; issue #5's 6e-2 does not hold there),
    // 2.0e-2..3.3e-2 on `austen` and 2.8e-2..4.7e-2 on `austen-v2` (trained, with the
    // same ×16 routing: q8 there 2.5e-3..9.3e-3); with two terms in q4's q8 matrices it
    // was 2.2e-2..3.5e-2 on `lite`/`plain` and 1.9e-2..3.3e-2 on `austen`. Each format
    // with its default latent cache: f32 under q8, bf16 under q4
    // (`q4_takes_a_bf16_cache_that_changes_little`).
    let budget = |format: QuantFormat, name: &str| match (format, name) {
        (QuantFormat::Q8, _) => 1e-2,
        (QuantFormat::Q4, "v2") => 0.105,
        (QuantFormat::Q4, "austen") => 3.5e-2,
        (QuantFormat::Q4, "austen-v2") => 5e-2,
        (QuantFormat::Q4, _) => 3.8e-2,
    };
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        for name in FIXTURES.into_iter().chain(TRAINED) {
            let budget = budget(format, name);
            let (backend, model) = load_quantized(name, format);
            let label = format!("{} ", format.name());
            // Prefill's attention, then every position through the decode (absorbed)
            // attention (q4's over its bf16 cache in bf16 arithmetic where the CPU has
            // AVX-512 BF16): measured q8 2.5e-3..9.3e-3 there, as through prefill.
            for path in [AttentionPath::Auto, AttentionPath::Absorbed] {
                let errors = path_errors(&label, name, &backend, &model, path);
                for (i, (err, _, _)) in errors.into_iter().enumerate() {
                    assert!(err <= budget, "{label}{name} prompt {i} {path:?}: {err}");
                }
            }
        }
    }
}

/// q8 with one int8 activation term (`--activation-terms 1`, llama.cpp's `q8_0`
/// activation rounding) instead of two: the trade it offers, measured. Measured through
/// prefill (two terms → one): `lite` 5.3e-3..6.5e-3 → 8.9e-3..1.0e-2, `v2` (routed ×16)
/// 7.7e-3..9.2e-3 → 1.29e-2..1.87e-2, `plain` 5.3e-3..6.8e-3 → 8.6e-3..1.08e-2, `austen`
/// 2.9e-3..5.9e-3 → 5.4e-3..7.6e-3, `austen-v2` 2.5e-3..9.3e-3 → 7.0e-3..1.57e-2: issue
/// #5's 1e-2 no longer holds on every prompt, so two terms stay q8's default.
#[test]
fn one_activation_term_trades_q8_accuracy_as_measured() {
    use dsv2_core::QuantFormat;
    for name in FIXTURES.into_iter().chain(TRAINED) {
        let (two, two_model) = load_quantized(name, QuantFormat::Q8);
        let one = CpuBackend::new(ComputeDtype::F32).with_q8_activation_terms(1);
        let (one, one_model) = load_quantized_on(name, QuantFormat::Q8, one);
        assert_eq!(two.activation_terms(QuantFormat::Q8), 2);
        assert_eq!(one.activation_terms(QuantFormat::Q8), 1);
        let path = AttentionPath::Auto;
        let errors_two = path_errors("q8 two terms ", name, &two, &two_model, path);
        let errors_one = path_errors("q8 one term ", name, &one, &one_model, path);
        for (i, (err, _, _)) in errors_one.iter().enumerate() {
            assert!(*err <= 2.1e-2, "{name} prompt {i}: one term {err}");
        }
        // Per prompt either may be the closer (austen-v2 prompt 2: 8.4e-3 against
        // 9.3e-3); over a fixture's prompts one term is the further.
        let total = |errors: &[(f64, usize, usize)]| errors.iter().map(|e| e.0).sum::<f64>();
        assert!(
            total(&errors_one) > total(&errors_two),
            "{name}: one term {errors_one:?}, two {errors_two:?}"
        );
    }
}

/// The latent cache in bf16 (`CpuBackend::with_cache_dtype`): under bf16 activations the
/// cached latents and RoPE keys are bf16 values already, so every logit is bit-identical
/// to the f32 cache's, in both attention formulations. Under f32 activations it rounds
/// them. Measured: f32 activations 2.6e-4..1.2e-3 on the random fixtures, 7.7e-4..5.2e-3
/// on the trained ones (austen's 32-token prompt 1 the most); q8 5.3e-3..9.3e-3 on the
/// random ones and 2.7e-3..1.55e-2 on the trained ones, where q8 with the f32 cache stays
/// within issue #5's 1e-2 (austen-v2 prompt 0: 8.0e-3 → 1.55e-2, its flat trained
/// routers flip an expert). That is why the cache follows the compute dtype unless asked
/// (or the weights are q4). Through the absorbed attention in bf16 arithmetic (AVX-512
/// BF16): f32 activations 3.7e-4..1.4e-3 random, 9.0e-4..5.2e-3 trained (against
/// 2.6e-4..1.2e-3 and 7.7e-4..5.2e-3 in f32 arithmetic over the same bf16 rows); q8
/// 2.6e-3..9.3e-3.
#[test]
fn a_bf16_latent_cache_is_exact_under_bf16_and_close_under_f32() {
    use dsv2_core::QuantFormat;
    let open = |name: &str, dtype, cache, quantize: Option<QuantFormat>| {
        let dir = fixture_dir(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let backend = CpuBackend::new(dtype).with_cache_dtype(cache);
        let options = dsv2_model::LoadOptions { quantize };
        let model = Model::load_with(&backend, config, &checkpoint, &options).unwrap();
        (backend, model)
    };
    for name in FIXTURES {
        let reference = Reference::open(name);
        let prompt = reference.ids("prompt.1");
        let (b16, m16) = open(name, ComputeDtype::Bf16, ComputeDtype::Bf16, None);
        let (b32, m32) = open(name, ComputeDtype::Bf16, ComputeDtype::F32, None);
        assert_eq!(b16.cache_value_bytes(), 2);
        for path in [AttentionPath::Expanded, AttentionPath::Absorbed] {
            let got = all_logits(&b16, &m16, &prompt, path);
            let want = all_logits(&b32, &m32, &prompt, path);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {path:?}: a bf16 cache under bf16 activations changed a logit"
            );
        }
    }
    for name in FIXTURES.into_iter().chain(TRAINED) {
        for (quantize, budget) in [(None, 8e-3), (Some(QuantFormat::Q8), 2e-2)] {
            let (backend, model) = open(name, ComputeDtype::F32, ComputeDtype::Bf16, quantize);
            let label = format!("{} bf16 cache ", quantize.map_or("f32", |q| q.name()));
            // Prefill's attention, then every position through the absorbed (decode)
            // attention, which reads the bf16 rows in bf16 arithmetic where the CPU has
            // AVX-512 BF16.
            for path in [AttentionPath::Auto, AttentionPath::Absorbed] {
                let errors = path_errors(&label, name, &backend, &model, path);
                for (i, (err, _, _)) in errors.into_iter().enumerate() {
                    assert!(err <= budget, "{label}{name} prompt {i} {path:?}: {err}");
                }
            }
        }
    }
}

/// Under q4 weights the CPU's latent cache is bf16 unless asked otherwise
/// (`CpuBackend::cache_dtype`), under q8 it stays f32. The bf16 cache (and, in the
/// absorbed decode attention on a CPU with AVX-512 BF16, bf16 arithmetic: `flash_bf16`)
/// moves q4's logits by 1.3e-3..5.2e-3 relative (1.0e-2 on `v2`'s long prompt, where
/// routing flips follow), but q4's error against the f32 reference by ≤ 8e-4 on 29 of
/// the 30 (prompt, path) pairs, prefill and absorbed (e.g. lite 2.68 → 2.70e-2, v2
/// 1.025 → 1.021e-1, austen 3.34 → 3.39e-2): the cache's rounding is small and
/// independent next to q4's own. On austen-v2's prompt 2, whose trained router is flat,
/// the two roundings together flip expert choices: 2.87 → 3.37e-2 through prefill (1.7e-3
/// more through the absorbed path), within the format's budget.
#[test]
fn q4_takes_a_bf16_cache_that_changes_little() {
    use dsv2_core::QuantFormat;
    let (q8, _) = load_quantized("lite", QuantFormat::Q8);
    assert_eq!(q8.cache_value_bytes(), 4);
    for name in FIXTURES.into_iter().chain(TRAINED) {
        let (backend, model) = load_quantized(name, QuantFormat::Q4);
        assert_eq!(backend.cache_value_bytes(), 2, "{name}: q4's default cache");
        let dir = fixture_dir(name);
        let f32_cache = CpuBackend::new(ComputeDtype::F32).with_cache_dtype(ComputeDtype::F32);
        let options = dsv2_model::LoadOptions {
            quantize: Some(QuantFormat::Q4),
        };
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let f32_model = Model::load_with(&f32_cache, config, &checkpoint, &options).unwrap();
        assert_eq!(f32_cache.cache_value_bytes(), 4);
        for path in [AttentionPath::Auto, AttentionPath::Absorbed] {
            let bf16 = path_errors("q4 bf16 cache ", name, &backend, &model, path);
            let f32 = path_errors("q4 f32 cache ", name, &f32_cache, &f32_model, path);
            for (i, (&(with_bf16, ..), &(with_f32, ..))) in bf16.iter().zip(&f32).enumerate() {
                assert!(
                    (with_bf16 - with_f32).abs() <= 6e-3,
                    "{name} prompt {i} {path:?}: q4's error {with_bf16:.4e} with the bf16 \
                     cache, {with_f32:.4e} with f32"
                );
            }
        }
    }
}

/// The trained fixture's own tokenizer (2,048 BPE ids, BOS 0) is what encodes its text:
/// the server's golden test once wrote the random fixtures' 300-id tokenizer through a
/// link into it, and `dsv2 perplexity` then scored nonsense without failing.
#[test]
fn the_trained_fixtures_keep_their_own_tokenizer() {
    for name in TRAINED {
        let dir = fixture_dir(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let tokenizer = dsv2_core::Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tokenizer.vocab_size(), config.vocab_size, "{name}");
        assert_eq!(tokenizer.bos().map(|t| t.id), Some(0), "{name}");
        let heldout = std::fs::read_to_string(dir.join("heldout.txt")).unwrap();
        let ids = tokenizer.encode(&heldout, true).unwrap();
        // 18 KB of English in a 2,048-token BPE: ~3.4 bytes a token.
        assert!((4_000..7_000).contains(&ids.len()), "{name}: {}", ids.len());
    }
}
