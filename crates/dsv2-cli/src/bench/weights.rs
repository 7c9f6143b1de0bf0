//! Where the benchmarked weights come from: a checkpoint folder, or random weights of a
//! model's exact shapes made in memory in the chosen dtype, tensor by tensor as the model
//! loads them (in parallel chunks), so that their real cost is measured and no tensor
//! exists twice.

use std::collections::HashMap;

use crate::memory::Held;
use anyhow::{bail, Context, Result};
use dsv2_core::quant::{dense_streamed_matrix, quantize_with, quantized_format, QuantizedTensor};
use dsv2_core::{
    expected_tensors, Checkpoint, CoreError, DType, ExpectedTensor, ModelConfig, QuantFormat,
    TensorView, Weight,
};
use dsv2_model::synthetic::TensorInit;
use indicatif::ProgressBar;
use rayon::prelude::*;

/// `config.json` of DeepSeek-V2-Lite, as published.
const DEEPSEEK_V2_LITE: &str =
    include_str!("../../../dsv2-core/testdata/deepseek-v2-lite-config.json");

/// `config.json` of DeepSeek-V2 (236B): the values of the numerics note, §1.
const DEEPSEEK_V2: &str = r#"{
  "model_type": "deepseek_v2",
  "architectures": ["DeepseekV2ForCausalLM"],
  "vocab_size": 102400,
  "hidden_size": 5120,
  "intermediate_size": 12288,
  "moe_intermediate_size": 1536,
  "num_hidden_layers": 60,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "q_lora_rank": 1536,
  "kv_lora_rank": 512,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "n_routed_experts": 160,
  "n_shared_experts": 2,
  "num_experts_per_tok": 6,
  "topk_method": "group_limited_greedy",
  "n_group": 8,
  "topk_group": 3,
  "norm_topk_prob": false,
  "routed_scaling_factor": 16.0,
  "scoring_func": "softmax",
  "first_k_dense_replace": 1,
  "moe_layer_freq": 1,
  "max_position_embeddings": 163840,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
  "attention_bias": false,
  "hidden_act": "silu",
  "tie_word_embeddings": false,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "torch_dtype": "bfloat16"
}"#;

/// Seed of the random weights (any fixed value: the bench measures speed, not text).
const SEED: u64 = 0xB5E7_C4A1_0000_0005;

/// Elements generated per parallel task: large enough to amortize the task, small
/// enough to spread a 1408-row expert over both cores.
const CHUNK_ELEMS: usize = 1 << 16;

/// Parses `--weights-dtype`.
pub fn parse_weights_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        "q8" | "q4" => Err(format!(
            "`{s}` is a quantized format: add --quantize {s} (the random bf16, f16 or f32 \
             weights are quantized as they load)"
        )),
        other => Err(format!(
            "unknown weights dtype `{other}` (bf16, f16 or f32)"
        )),
    }
}

/// The config of `--random-weights`: a known model's name or a `config.json` path,
/// optionally cut to its first `num_layers` layers. Returns a label for reports too.
pub fn random_config(spec: &str, num_layers: Option<usize>) -> Result<(String, ModelConfig)> {
    let text = match spec {
        "deepseek-v2-lite" => DEEPSEEK_V2_LITE.to_string(),
        "deepseek-v2" => DEEPSEEK_V2.to_string(),
        path => std::fs::read_to_string(path).with_context(|| {
            format!("--random-weights {path}: not deepseek-v2-lite, deepseek-v2 or a readable config.json")
        })?,
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing the config of {spec}"))?;
    let mut label = spec.to_string();
    if let Some(n) = num_layers {
        let Some(obj) = value.as_object_mut() else {
            bail!("the config of {spec} is not a JSON object");
        };
        obj.insert("num_hidden_layers".into(), n.into());
        label = format!("{spec}, first {n} layers");
    }
    let config = ModelConfig::from_json_str(&value.to_string())
        .with_context(|| format!("the config of {label}"))?;
    Ok((label, config))
}

/// Where the weights are stored.
pub enum Stored {
    /// A validated, memory-mapped checkpoint (dense or in a dsv2 quantized format).
    Checkpoint(Checkpoint),
    /// Random weights made on demand.
    Random(RandomWeights),
}

/// Hands out the weights of a model as [`dsv2_model::Model::load_from`] asks for them,
/// and knows what reading each one costs once loaded.
pub struct WeightSource {
    stored: Stored,
    /// The format the loader quantizes eligible dense weights to (`--quantize`).
    quantize: Option<QuantFormat>,
}

impl WeightSource {
    /// Weights from `stored`, quantized at load to `quantize`. A checkpoint is validated
    /// against `config` first.
    pub fn new(
        stored: Stored,
        config: &ModelConfig,
        quantize: Option<QuantFormat>,
    ) -> Result<Self> {
        if let Stored::Checkpoint(checkpoint) = &stored {
            checkpoint
                .validate(&expected_tensors(config))
                .with_context(|| format!("checking {}", checkpoint.root().display()))?;
        }
        Ok(WeightSource { stored, quantize })
    }

    /// The progress bar weight generation advances (hidden for a checkpoint).
    pub fn progress(&self) -> ProgressBar {
        match &self.stored {
            Stored::Random(r) => r.progress.clone(),
            Stored::Checkpoint(_) => ProgressBar::hidden(),
        }
    }

    /// The weight `name`, as stored.
    ///
    /// # Errors
    /// A name the config does not imply, inconsistent quantized planes.
    pub fn weight(&self, name: &str) -> dsv2_model::Result<Weight> {
        match &self.stored {
            Stored::Checkpoint(c) => Ok(c.weight(name)?),
            Stored::Random(r) => {
                let format = self.quantize.and_then(|f| {
                    r.shapes
                        .get(name)
                        .and_then(|shape| quantized_format(name, shape, f))
                });
                match format {
                    // Made directly in the quantized format: no dense copy ever exists.
                    Some(format) => Ok(Weight::Quantized(r.quantized(name, format)?)),
                    // In a quantized model a streamed dense matrix goes to huge pages,
                    // as the loader moves a checkpoint's (`TensorView::into_huge_pages`).
                    None => {
                        let huge = self.quantize.is_some()
                            && r.shapes
                                .get(name)
                                .is_some_and(|shape| dense_streamed_matrix(name, shape));
                        Ok(Weight::Dense(r.tensor(name, huge)?))
                    }
                }
            }
        }
    }

    /// Bytes one read of `tensor` moves once loaded: its stored size, or its size in the
    /// `--quantize` format when the loader quantizes it (the rule of
    /// [`quantized_format`]).
    pub fn tensor_bytes(&self, tensor: &ExpectedTensor) -> usize {
        let load_format = self
            .quantize
            .and_then(|f| quantized_format(&tensor.name, &tensor.shape, f));
        if let (Some(format), &[rows, cols]) = (load_format, tensor.shape.as_slice()) {
            if self.stored_dense(&tensor.name) {
                return format.matrix_bytes(rows, cols);
            }
        }
        match &self.stored {
            Stored::Random(r) => numel(tensor) * r.elem_bytes(),
            Stored::Checkpoint(c) => match c.weight(&tensor.name) {
                Ok(Weight::Dense(view)) => view.data.as_slice().len(),
                Ok(Weight::Quantized(q)) => {
                    q.qweight.data.as_slice().len() + q.scales.data.as_slice().len()
                }
                Err(_) => 0, // validated in `new`: every tensor is there
            },
        }
    }

    /// How tensor `name` is held before the load, for the memory check.
    ///
    /// # Errors
    /// A checkpoint tensor that cannot be read (validated in `new`).
    pub fn held(&self, name: &str) -> Result<Held> {
        match &self.stored {
            Stored::Checkpoint(c) => crate::load::held(c, name),
            Stored::Random(r) => Ok(Held::InMemory(r.dtype.clone())),
        }
    }

    fn stored_dense(&self, name: &str) -> bool {
        match &self.stored {
            Stored::Random(_) => true,
            Stored::Checkpoint(c) => c.get(name).is_some(),
        }
    }

    /// Whether the model's large matrices are quantized once loaded (`--quantize`, or a
    /// checkpoint written by `dsv2 quantize`).
    pub fn quantized(&self, config: &ModelConfig) -> bool {
        self.quantize.is_some()
            || match &self.stored {
                Stored::Checkpoint(c) => expected_tensors(config)
                    .iter()
                    .any(|t| matches!(c.weight(&t.name), Ok(Weight::Quantized(_)))),
                Stored::Random(_) => false,
            }
    }

    /// The stored formats, for reports (`bf16`, `bf16+f32`, `q8+bf16`), followed by the
    /// load-time quantization if any (`bf16, q8 at load`).
    pub fn dtype_label(&self, config: &ModelConfig) -> String {
        let mut names: Vec<String> = match &self.stored {
            Stored::Checkpoint(c) => expected_tensors(config)
                .iter()
                .filter_map(|t| match c.weight(&t.name).ok()? {
                    Weight::Dense(view) => Some(view.dtype.to_string().to_lowercase()),
                    Weight::Quantized(q) => Some(q.format.name().to_string()),
                })
                .collect(),
            Stored::Random(r) => vec![r.dtype.to_string().to_lowercase()],
        };
        names.sort();
        names.dedup();
        let stored = names.join("+");
        match self.quantize {
            Some(format) => format!("{stored}, {} at load", format.name()),
            None => stored,
        }
    }
}

/// Random weights of `config`'s exact shapes, each tensor made when it is asked for.
pub struct RandomWeights {
    shapes: HashMap<String, Vec<usize>>,
    dtype: DType,
    progress: ProgressBar,
}

impl RandomWeights {
    /// Weights of `config` stored as `dtype` (BF16, F16 or F32); `progress` advances by
    /// the bytes made, up to the model's total.
    pub fn new(config: &ModelConfig, dtype: DType, progress: ProgressBar) -> Self {
        let shapes: HashMap<String, Vec<usize>> = expected_tensors(config)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        let weights = RandomWeights {
            shapes,
            dtype: dsv2_model::synthetic::synthetic_dtype(&dtype),
            progress,
        };
        let numel: usize = weights
            .shapes
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        weights
            .progress
            .set_length((numel * weights.elem_bytes()) as u64);
        weights
    }

    fn elem_bytes(&self) -> usize {
        self.dtype.size().expect("a float dtype")
    }

    /// Makes tensor `name` in parallel chunks, straight into the buffer the model keeps
    /// (in huge pages when `huge`).
    fn tensor(&self, name: &str, huge: bool) -> dsv2_model::Result<TensorView> {
        let shape = self.shapes.get(name).ok_or_else(|| CoreError::Tensor {
            file: "<random weights>".into(),
            tensor: name.to_string(),
            problem: "not a tensor of this config".into(),
        })?;
        let size = self.elem_bytes();
        let init = TensorInit::new(SEED, name, shape);
        let len = shape.iter().product::<usize>() * size;
        let fill = |bytes: &mut [u8]| {
            bytes
                .par_chunks_mut(CHUNK_ELEMS * size)
                .enumerate()
                .for_each(|(i, chunk)| {
                    init.fill(&self.dtype, i * CHUNK_ELEMS, chunk);
                    self.progress.inc(chunk.len() as u64);
                })
        };
        if huge {
            let mut buf = dsv2_core::hugemem::alloc(len);
            fill(buf.as_mut_slice());
            return Ok(TensorView {
                data: buf.freeze(),
                ..TensorView::owned(name, self.dtype.clone(), shape.clone(), Vec::new())
            });
        }
        let mut bytes = vec![0u8; len];
        fill(&mut bytes);
        Ok(TensorView::owned(
            name,
            self.dtype.clone(),
            shape.clone(),
            bytes,
        ))
    }
}

impl RandomWeights {
    /// Makes matrix `name` directly in `format`, tile by tile of 16 rows in parallel:
    /// each value is drawn, rounded to the stored dtype and quantized, so the result is
    /// bit-identical to quantizing the dense tensor [`tensor`](Self::tensor) makes (the
    /// loader's `--quantize` path), without the dense tensor.
    fn quantized(&self, name: &str, format: QuantFormat) -> dsv2_model::Result<QuantizedTensor> {
        let shape = &self.shapes[name];
        let [rows, cols] = shape[..] else {
            unreachable!("quantized_format accepts matrices only")
        };
        let init = TensorInit::new(SEED, name, shape);
        Ok(quantize_with(
            name,
            format,
            rows,
            cols,
            |first_row, tile| {
                init.values_as_stored(&self.dtype, first_row * cols, tile);
                self.progress.inc((tile.len() * self.elem_bytes()) as u64);
            },
        ))
    }
}

fn numel(tensor: &ExpectedTensor) -> usize {
    tensor.shape.iter().product()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_have_the_published_shapes() {
        let (_, lite) = random_config("deepseek-v2-lite", None).unwrap();
        assert_eq!(
            (lite.hidden_size, lite.num_hidden_layers, lite.q_lora_rank),
            (2048, 27, None)
        );
        let (label, v2) = random_config("deepseek-v2", None).unwrap();
        assert_eq!(label, "deepseek-v2");
        assert_eq!(
            (v2.hidden_size, v2.num_hidden_layers, v2.num_attention_heads),
            (5120, 60, 128)
        );
        assert_eq!((v2.q_lora_rank, v2.intermediate_size), (Some(1536), 12288));
        let moe = v2.moe.as_ref().unwrap();
        assert_eq!(
            (moe.n_routed_experts, moe.moe_intermediate_size),
            (160, 1536)
        );
        assert_eq!(moe.routed_scaling_factor, 16.0);
        assert_eq!(
            moe.topk_method,
            dsv2_core::TopkMethod::GroupLimitedGreedy {
                n_group: 8,
                topk_group: 3
            }
        );
        // 235.74 B parameters (numerics note, §1).
        let params: usize = expected_tensors(&v2).iter().map(numel).sum();
        assert!((params as f64 / 1e9 - 235.74).abs() < 0.01, "{params}");
        let (label, cut) = random_config("deepseek-v2-lite", Some(4)).unwrap();
        assert_eq!(
            (cut.num_hidden_layers, label.as_str()),
            (4, "deepseek-v2-lite, first 4 layers")
        );
        assert!(random_config("deepseek-v3", None).is_err());
    }

    #[test]
    fn random_tensors_match_the_synthetic_rule() {
        let (_, config) = random_config("deepseek-v2-lite", Some(2)).unwrap();
        let weights = RandomWeights::new(&config, DType::F32, ProgressBar::hidden());
        let name = "model.layers.1.mlp.experts.5.down_proj.weight";
        let view = weights.tensor(name, false).unwrap();
        assert_eq!(
            (view.shape.as_slice(), &view.dtype),
            ([2048, 1408].as_slice(), &DType::F32)
        );
        let init = TensorInit::new(SEED, name, &view.shape);
        let values = view.as_f32();
        for i in [0, 1, CHUNK_ELEMS - 1, CHUNK_ELEMS, values.len() - 1] {
            assert_eq!(values[i], init.value(i), "element {i}");
        }
        assert!(weights
            .tensor("model.layers.9.mlp.gate.weight", false)
            .is_err());
        // Made directly quantized = the dense random tensor quantized at load, bit for
        // bit (bf16 storage; an expert at q4, the 576-row kv_a_proj at q8).
        let bf16 = RandomWeights::new(&config, DType::BF16, ProgressBar::hidden());
        for (name, format) in [
            (
                "model.layers.1.mlp.experts.5.down_proj.weight",
                QuantFormat::Q4,
            ),
            (
                "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                QuantFormat::Q8,
            ),
        ] {
            let direct = bf16.quantized(name, format).unwrap();
            let at_load =
                dsv2_core::quant::quantize_tensor(&bf16.tensor(name, false).unwrap(), format);
            assert_eq!(direct.qweight_bytes(), at_load.qweight_bytes(), "{name}");
            assert_eq!(direct.scales(), at_load.scales(), "{name}");
            assert_eq!(direct.qweight.shape, at_load.qweight.shape, "{name}");
        }
        assert!(parse_weights_dtype("q8")
            .unwrap_err()
            .contains("--quantize"));
    }
}
