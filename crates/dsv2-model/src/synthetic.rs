//! Models made in memory: the built-in default model and random weights of any config.
//!
//! Weights are a pure function of (seed, tensor name, element index) through
//! SplitMix64, so the same model comes out on every machine, and any element can be
//! computed independently (tensors can be generated in parallel).

use dsv2_core::{expected_tensors, Checkpoint, DType, ModelConfig, TensorView};
use half::{bf16, f16};

/// `config.json` of the built-in model: the real DeepSeek-V2 architecture (MLA without
/// query compression, YaRN, a dense first layer, greedy-routed MoE) at a size that loads
/// in a moment, with the real 102,400-row vocabulary so the DeepSeek tokenizer applies.
pub const BUILTIN_CONFIG: &str = r#"{
  "model_type": "deepseek_v2",
  "architectures": ["DeepseekV2ForCausalLM"],
  "vocab_size": 102400,
  "hidden_size": 256,
  "intermediate_size": 768,
  "moe_intermediate_size": 128,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "q_lora_rank": null,
  "kv_lora_rank": 128,
  "qk_nope_head_dim": 32,
  "qk_rope_head_dim": 16,
  "v_head_dim": 32,
  "n_routed_experts": 16,
  "n_shared_experts": 2,
  "num_experts_per_tok": 4,
  "topk_method": "greedy",
  "n_group": 1,
  "topk_group": 1,
  "norm_topk_prob": false,
  "routed_scaling_factor": 1.0,
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

/// Seed of the built-in model's weights.
pub const BUILTIN_SEED: u64 = 0x0D5E_E9C0_FFEE_0002;

/// The built-in model's config.
pub fn builtin_config() -> ModelConfig {
    ModelConfig::from_json_str(BUILTIN_CONFIG).expect("the built-in config is valid")
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash of `x`.
#[inline(always)]
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of a tensor name, to key its element stream.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Uniform value in [-1, 1) for element `index` of the stream `key`.
#[inline(always)]
fn uniform(key: u64, index: u64) -> f32 {
    let bits = splitmix64(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (bits >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// How the elements of one tensor are drawn: norms near 1, matrices uniform with a
/// variance that keeps activations O(1), the router sharper so routing is decisive.
///
/// Element `index` is a pure function of (seed, tensor name, index), so any range of a
/// tensor can be generated on its own, in any order and on any thread.
#[derive(Debug, Clone, Copy)]
pub struct TensorInit {
    /// The tensor's element stream: `seed ^ fnv1a(name)`.
    key: u64,
    /// `None` for a 1-D tensor; `Some((gain, sqrt(3 / fan_in)))` for a matrix.
    matrix: Option<(f32, f32)>,
}

impl TensorInit {
    /// The element rule of tensor `name` of shape `shape` in the model of `seed`.
    pub fn new(seed: u64, name: &str, shape: &[usize]) -> Self {
        let matrix = (shape.len() > 1).then(|| {
            let fan_in = shape[1] as f32;
            let gain = if name.ends_with("mlp.gate.weight") {
                4.0
            } else if name.contains("embed_tokens") {
                fan_in.sqrt() // embeddings of unit scale per element
            } else {
                1.0
            };
            (gain, (3.0 / fan_in).sqrt())
        });
        TensorInit {
            key: seed ^ name_key(name),
            matrix,
        }
    }

    /// Writes elements `first..first + out.len()` into `out` as f32, each rounded to
    /// `dtype` (F32 and F16 as such, anything else as BF16): the values a tensor of that
    /// dtype holds, read back. Vectorized with AVX-512 where the CPU has it.
    pub fn values_as_stored(&self, dtype: &DType, first: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if dsv2_core::isa::avx512() {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { self.values_as_stored_avx512(dtype, first, out) };
            return;
        }
        self.values_as_stored_body(dtype, first, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
    unsafe fn values_as_stored_avx512(&self, dtype: &DType, first: usize, out: &mut [f32]) {
        self.values_as_stored_body(dtype, first, out);
    }

    #[inline(always)]
    fn values_as_stored_body(&self, dtype: &DType, first: usize, out: &mut [f32]) {
        match dtype {
            DType::F32 => self.values_with(first, out, |v| v),
            DType::F16 => self.values_with(first, out, |v| f16::from_f32(v).to_f32()),
            // Round to nearest even on the top 16 bits (the values are finite).
            _ => self.values_with(first, out, |v| {
                let bits = v.to_bits();
                f32::from_bits((bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
            }),
        }
    }

    #[inline(always)]
    fn values_with(&self, first: usize, out: &mut [f32], stored: impl Fn(f32) -> f32) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = stored(self.value(first + i));
        }
    }

    /// Value of element `index` (row-major).
    #[inline(always)]
    pub fn value(&self, index: usize) -> f32 {
        let u = uniform(self.key, index as u64);
        match self.matrix {
            None => 1.0 + 0.1 * u,
            Some((gain, scale)) => u * gain * scale,
        }
    }

    /// Writes elements `first..` as little-endian `dtype` values into `out`, which holds a
    /// whole number of them. F32 and F16 are written as such, any other dtype as BF16.
    pub fn fill(&self, dtype: &DType, first: usize, out: &mut [u8]) {
        match dtype {
            DType::F32 => self.fill_with(first, out, f32::to_le_bytes),
            DType::F16 => self.fill_with(first, out, |v| f16::from_f32(v).to_le_bytes()),
            _ => self.fill_with(first, out, |v| bf16::from_f32(v).to_le_bytes()),
        }
    }

    fn fill_with<const N: usize>(
        &self,
        first: usize,
        out: &mut [u8],
        to_bytes: impl Fn(f32) -> [u8; N],
    ) {
        debug_assert!(out.len().is_multiple_of(N));
        for (i, chunk) in out.chunks_exact_mut(N).enumerate() {
            chunk.copy_from_slice(&to_bytes(self.value(first + i)));
        }
    }
}

/// The dtype [`synthetic_checkpoint`] stores for a requested `dtype`: F32 and F16 as
/// asked, BF16 for anything else.
pub fn synthetic_dtype(dtype: &DType) -> DType {
    match dtype {
        DType::F32 | DType::F16 => dtype.clone(),
        _ => DType::BF16,
    }
}

/// A checkpoint with every tensor `config` implies, filled deterministically from
/// `seed`, stored as `dtype` (BF16, F16 or F32).
pub fn synthetic_checkpoint(config: &ModelConfig, seed: u64, dtype: DType) -> Checkpoint {
    let dtype = synthetic_dtype(&dtype);
    let size = dtype.size().expect("a float dtype");
    let tensors = expected_tensors(config)
        .into_iter()
        .map(|t| {
            let mut bytes = vec![0u8; t.shape.iter().product::<usize>() * size];
            TensorInit::new(seed, &t.name, &t.shape).fill(&dtype, 0, &mut bytes);
            TensorView::owned(&t.name, dtype.clone(), t.shape, bytes)
        })
        .collect();
    Checkpoint::from_tensors("<synthetic weights>", tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_as_stored_round_like_the_stored_dtype() {
        let init = TensorInit::new(5, "model.layers.1.mlp.experts.2.up_proj.weight", &[64, 96]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut got = vec![0.0f32; 1000];
            init.values_as_stored(&dtype, 77, &mut got);
            let size = dtype.size().unwrap();
            let mut bytes = vec![0u8; 1000 * size];
            init.fill(&dtype, 77, &mut bytes);
            let view = TensorView::owned("t", dtype.clone(), vec![1000], bytes);
            assert_eq!(got, view.to_f32_vec(), "{dtype:?}");
        }
    }

    #[test]
    fn weights_are_deterministic_and_shaped() {
        let config = builtin_config();
        let a = synthetic_checkpoint(&config, 7, DType::BF16);
        let b = synthetic_checkpoint(&config, 7, DType::BF16);
        a.validate(&expected_tensors(&config)).unwrap();
        let name = "model.layers.1.mlp.experts.3.up_proj.weight";
        assert_eq!(
            a.get(name).unwrap().data.as_slice(),
            b.get(name).unwrap().data.as_slice()
        );
        let c = synthetic_checkpoint(&config, 8, DType::BF16);
        assert_ne!(
            a.get(name).unwrap().data.as_slice(),
            c.get(name).unwrap().data.as_slice()
        );
        let norm = a.get("model.norm.weight").unwrap().to_f32_vec();
        assert!(norm.iter().all(|v| (0.89..=1.11).contains(v)));
    }

    #[test]
    fn any_range_of_a_tensor_fills_alone() {
        let shape = [48, 32];
        let init = TensorInit::new(3, "model.layers.0.mlp.gate.weight", &shape);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let size = dtype.size().unwrap();
            let mut whole = vec![0u8; 48 * 32 * size];
            init.fill(&dtype, 0, &mut whole);
            let mut parts = vec![0u8; whole.len()];
            let (head, tail) = parts.split_at_mut(100 * size);
            init.fill(&dtype, 100, tail);
            init.fill(&dtype, 0, head);
            assert_eq!(whole, parts, "{dtype}");
        }
        let mut f32s = vec![0u8; 4];
        init.fill(&DType::F32, 7, &mut f32s);
        assert_eq!(f32::from_le_bytes(f32s.try_into().unwrap()), init.value(7));
    }
}
