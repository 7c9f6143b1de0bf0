//! The golden fixtures of `tests/fixtures/<name>/` (tiny random DeepSeek-V2 checkpoints in
//! the hub layout with HF transformers reference logits, `tools/fixtures/`) on the GPU.
//!
//! - bf16: the relative error against the f32 reference and the argmax agreement of
//!   every prompt, reported against the bar of 2e-2 and 98%; required: no further from
//!   the f32 reference than the other bf16 runs of the prompt (the CPU backend's, and
//!   HF's `logits_bf16.{i}` where present), with a 50% margin.
//! - f32: relative error ≤ 1e-4 against the f32 reference, and the greedy continuation
//!   (`greedy.{i}`, prefill then cached decode with greedy sampling on the device) equal.
//!
//! The fixtures folder is `$DSV2_FIXTURES`, else `tests/fixtures` under the current
//! directory or the repository. Skipped without a GPU (or fixtures) unless
//! DSV2_REQUIRE_GPU is set.

mod common;

use std::path::PathBuf;

use common::*;
use dsv2_backend::{AttentionPath, Backend, Batch, ComputeDtype, LogitsWanted};
use dsv2_core::{Checkpoint, ModelConfig};
use dsv2_cpu::CpuBackend;
use dsv2_cuda::CudaBackend;
use dsv2_model::Model;

fn fixtures_root() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DSV2_FIXTURES").map(PathBuf::from),
        Some(PathBuf::from("tests/fixtures")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("lite/reference.safetensors").is_file())
}

/// The fixtures present (each with a reference file).
fn fixtures() -> Vec<PathBuf> {
    let Some(root) = fixtures_root() else {
        assert!(
            std::env::var_os("DSV2_REQUIRE_GPU").is_none(),
            "DSV2_REQUIRE_GPU is set but no tests/fixtures/*/reference.safetensors was found"
        );
        eprintln!("skipped: no fixtures (set DSV2_FIXTURES)");
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    dirs.sort();
    dirs
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open(dir: &std::path::Path) -> Reference {
        let path = dir.join("reference.safetensors");
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
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let t = self.tensors();
        let t = t.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn num_prompts(&self) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("prompt.{i}")))
            .count()
    }
}

fn load(dir: &std::path::Path, gpu: &CudaBackend) -> Model<CudaBackend> {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(dir).unwrap();
    Model::load(gpu, config, &checkpoint).unwrap()
}

/// Logits of every position of `prompt` in one prefill step.
fn prefill_logits(
    gpu: &CudaBackend,
    model: &Model<CudaBackend>,
    prompt: &[u32],
    path: AttentionPath,
) -> Vec<f32> {
    let block = 16;
    let table: Vec<u32> = (0..prompt.len().div_ceil(block) as u32).rev().collect();
    let mut cache = gpu
        .alloc_cache(model.cache_spec(table.len(), block))
        .unwrap();
    let mut ws = model.workspace(gpu, prompt.len()).unwrap();
    let mut batch = Batch::default();
    batch.push_seq(prompt, 0, &table, block, LogitsWanted::All);
    let mut out = vec![0.0; prompt.len() * model.config.vocab_size];
    model
        .forward(gpu, &batch, &mut cache, &mut ws, path, &mut out)
        .unwrap();
    out
}

/// Share of rows whose argmax agrees.
fn argmax_agreement(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    let rows = a.len() / vocab;
    let same = (0..rows)
        .filter(|&r| {
            argmax(&a[r * vocab..(r + 1) * vocab]) == argmax(&b[r * vocab..(r + 1) * vocab])
        })
        .count();
    same as f64 / rows as f64
}

/// Logits of every position of `prompt` on the CPU backend (the bf16 noise reference).
fn cpu_logits(dir: &std::path::Path, dtype: ComputeDtype, prompt: &[u32]) -> Vec<f32> {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(dir).unwrap();
    let cpu = CpuBackend::new(dtype);
    let model = Model::load(&cpu, config, &checkpoint).unwrap();
    let mut cache = cpu
        .alloc_cache(model.cache_spec(prompt.len().div_ceil(16), 16))
        .unwrap();
    let mut ws = model.workspace(&cpu, prompt.len()).unwrap();
    let table: Vec<u32> = (0..prompt.len().div_ceil(16) as u32).collect();
    let mut batch = Batch::default();
    batch.push_seq(prompt, 0, &table, 16, LogitsWanted::All);
    let mut out = vec![0.0; prompt.len() * model.config.vocab_size];
    model
        .forward(
            &cpu,
            &batch,
            &mut cache,
            &mut ws,
            AttentionPath::Auto,
            &mut out,
        )
        .unwrap();
    out
}

#[test]
fn bf16_logits_match_the_references() {
    let dirs = fixtures();
    if dirs.is_empty() {
        return;
    }
    let Some(gpu) = cuda(ComputeDtype::Bf16) else {
        return;
    };
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = load(&dir, &gpu);
        let vocab = model.config.vocab_size;
        let reference = Reference::open(&dir);
        for i in 0..reference.num_prompts() {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let got = prefill_logits(&gpu, &model, &prompt, AttentionPath::Auto);
            let f32_ref = reference.f32s(&format!("logits.{i}"));
            let err = rel_err(&got, &f32_ref);
            let agree = argmax_agreement(&got, &f32_ref, vocab);
            // The fixtures are tiny random models on which bf16 rounding noise is
            // amplified: HF's own bf16 run is 1.5e-2..3e-2 from its f32 run, longer
            // prompts drift further, and a few argmaxes flip. The bar of 2e-2 / 98% is
            // reported for every prompt; the test requires ours to be no noisier than
            // the other bf16 runs of the same prompt (the CPU backend's, HF's where the
            // fixture has it), with a 50% margin.
            let cpu16 = cpu_logits(&dir, ComputeDtype::Bf16, &prompt);
            let mut noise = vec![(
                "CPU bf16",
                rel_err(&cpu16, &f32_ref),
                argmax_agreement(&cpu16, &f32_ref, vocab),
            )];
            let bf16_name = format!("logits_bf16.{i}");
            if reference.has(&bf16_name) {
                let r = reference.f32s(&bf16_name);
                noise.push((
                    "HF bf16",
                    rel_err(&r, &f32_ref),
                    argmax_agreement(&r, &f32_ref, vocab),
                ));
            }
            let bound = noise.iter().map(|n| 1.5 * n.1).fold(2e-2, f64::max);
            let agree_bar = noise.iter().map(|n| n.2 - 0.05).fold(0.98, f64::min);
            let strict = if err <= 2e-2 && agree >= 0.98 {
                "meets"
            } else {
                "misses"
            };
            let others: Vec<String> = noise
                .iter()
                .map(|(who, e, a)| format!("{who} {e:.3e}, {:.1}%", 100.0 * a))
                .collect();
            eprintln!(
                "RESULT bf16 {name} prompt {i} ({} tokens): vs f32 reference rel err {err:.3e}, \
                 argmax {:.1}% ({strict} 2e-2/98%; other bf16 runs vs f32: {})",
                prompt.len(),
                100.0 * agree,
                others.join("; ")
            );
            assert!(
                err <= bound,
                "{name} prompt {i}: relative error {err:.3e} > {bound:.3e}"
            );
            assert!(
                agree >= agree_bar,
                "{name} prompt {i}: argmax agreement {agree:.3} < {agree_bar:.3}"
            );
        }
    }
}

#[test]
fn f32_logits_and_greedy_continuations_match_the_references() {
    let dirs = fixtures();
    if dirs.is_empty() {
        return;
    }
    let Some(gpu) = cuda(ComputeDtype::F32) else {
        return;
    };
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = load(&dir, &gpu);
        let vocab = model.config.vocab_size;
        let reference = Reference::open(&dir);
        for i in 0..reference.num_prompts() {
            let prompt = reference.ids(&format!("prompt.{i}"));
            let want = reference.f32s(&format!("logits.{i}"));
            for path in [AttentionPath::Auto, AttentionPath::Absorbed] {
                let got = prefill_logits(&gpu, &model, &prompt, path);
                let err = rel_err(&got, &want);
                let agree = argmax_agreement(&got, &want, vocab);
                eprintln!(
                    "RESULT f32 {name} prompt {i} ({} tokens) {path:?}: rel err {err:.3e}, argmax {:.1}%",
                    prompt.len(),
                    100.0 * agree
                );
                assert!(
                    err <= 1e-4,
                    "{name} prompt {i} {path:?}: relative error {err:.3e} > 1e-4"
                );
            }
            let greedy_name = format!("greedy.{i}");
            if reference.has(&greedy_name) {
                let want_ids = reference.ids(&greedy_name);
                let got_ids = greedy(&gpu, &model, &prompt, want_ids.len());
                eprintln!(
                    "RESULT f32 {name} prompt {i} greedy: {got_ids:?} (reference {want_ids:?})"
                );
                assert_eq!(got_ids, want_ids, "{name} prompt {i}: greedy continuation");
            }
        }
    }
}

/// Prefill, then `n` cached decode steps with greedy sampling on the device.
fn greedy(gpu: &CudaBackend, model: &Model<CudaBackend>, prompt: &[u32], n: usize) -> Vec<u32> {
    let block = 16;
    let table: Vec<u32> = (0..(prompt.len() + n).div_ceil(block) as u32).collect();
    let mut cache = gpu
        .alloc_cache(model.cache_spec(table.len(), block))
        .unwrap();
    let mut ws = model.workspace(gpu, prompt.len()).unwrap();
    let mut batch = Batch::default();
    batch.push_seq(prompt, 0, &table, block, LogitsWanted::Last);
    let mut next = [0u32];
    let mut out = Vec::new();
    for step in 0..n {
        model
            .forward_greedy(
                gpu,
                &batch,
                &mut cache,
                &mut ws,
                AttentionPath::Auto,
                &mut next,
            )
            .unwrap();
        out.push(next[0]);
        batch.clear();
        batch.push_seq(
            &next,
            prompt.len() + step,
            &table,
            block,
            LogitsWanted::Last,
        );
    }
    out
}
