//! Picking a device, resolving a model (folder, hub id or the built-in one) and loading it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use dsv2_backend::Backend;
use dsv2_core::{
    expected_tensors, Checkpoint, DType, GenerationConfig, ModelConfig, Tokenizer, Weight,
};
use dsv2_cpu::CpuBackend;
use dsv2_model::synthetic::{builtin_config, synthetic_checkpoint, BUILTIN_SEED};
use dsv2_model::{LoadOptions, Model};

use crate::ModelArgs;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}` (cpu, cuda or cuda:N)")),
            },
        }
    }
}

/// What a command needs from a model's files besides the weights.
pub struct ModelInfo {
    /// The model folder; `None` for the built-in model.
    pub dir: Option<PathBuf>,
    /// The validated config.
    pub config: ModelConfig,
    /// generation_config.json, when the folder has one.
    pub generation_config: Option<GenerationConfig>,
}

impl ModelInfo {
    /// The model's tokenizer: the folder's `tokenizer.json`, the vendored DeepSeek-V2
    /// tokenizer for the built-in model, or `None` for a folder without one.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        match &self.dir {
            None => Ok(Some(Tokenizer::builtin()?)),
            Some(dir) if dir.join("tokenizer.json").exists() => Ok(Some(Tokenizer::from_dir(dir)?)),
            Some(_) => Ok(None),
        }
    }
}

/// A command that runs on a loaded model, whatever the backend.
pub trait ModelTask {
    type Output;
    /// Bytes the task will hold beside the weights (a server's KV cache), counted in the
    /// memory check before a CPU load.
    fn memory_beside_weights(&self) -> u64 {
        0
    }
    /// Runs with the model loaded on `backend`.
    fn run<B: Backend>(
        self,
        backend: &B,
        model: &Model<B>,
        info: &ModelInfo,
    ) -> Result<Self::Output>;
}

/// Resolves `--model` (folder or hub id) to a local folder; `None` is the built-in model.
pub fn resolve(spec: Option<&str>) -> Result<Option<PathBuf>> {
    let Some(spec) = spec else { return Ok(None) };
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Some(path.to_path_buf()));
    }
    if path.is_absolute() || spec.starts_with('.') || path.exists() {
        bail!("model folder {spec} does not exist");
    }
    let dir = dsv2_core::resolve_model(spec).with_context(|| format!("resolving model {spec}"))?;
    Ok(Some(dir))
}

/// Loads the model the arguments name on the device they name, then runs `task`.
pub fn with_model<T: ModelTask>(args: &ModelArgs, task: T) -> Result<T::Output> {
    check_device(args)?;
    let dir = resolve(args.model.as_deref())?;
    let (config, checkpoint, generation_config) = match &dir {
        Some(dir) => open_folder(dir)?,
        None => {
            eprintln!(
                "dsv2: no --model given: running the built-in model (DeepSeek-V2 architecture, \
                 synthetic weights; its output is not meaningful text)"
            );
            let config = builtin_config();
            let checkpoint = synthetic_checkpoint(&config, BUILTIN_SEED, DType::BF16);
            (config, checkpoint, None)
        }
    };
    let root = checkpoint.root().display().to_string();
    check_activation_terms(
        args,
        &root,
        args.quantize.is_some() || checkpoint.has_quantized_tensors(),
    )?;
    checkpoint
        .validate(&expected_tensors(&config))
        .with_context(|| format!("loading {root}"))?;
    if matches!(args.device, Device::Cpu) {
        let held = |n: &str| held(&checkpoint, n);
        let cache = task.memory_beside_weights();
        crate::memory::check_before_load(&root, &config, held, args.quantize, cache)?;
    }
    let info = ModelInfo {
        dir,
        config,
        generation_config,
    };
    let weight = |name: &str| Ok(checkpoint.weight(name)?);
    with_weights(args, info, &root, weight, task)
}

/// Loads the weights of `info.config` from `weight` (asked once per tensor name, as
/// [`Model::load_from`] does; `source` names it in errors) on the device the arguments
/// name, quantized as they ask, then runs `task`.
pub fn with_weights<T: ModelTask>(
    args: &ModelArgs,
    info: ModelInfo,
    source: &str,
    weight: impl FnMut(&str) -> dsv2_model::Result<Weight>,
    task: T,
) -> Result<T::Output> {
    check_device(args)?;
    let options = LoadOptions {
        quantize: args.quantize,
    };
    match args.device {
        Device::Cpu => {
            let mut backend = CpuBackend::new(args.dtype);
            if let Some(cache) = args.kv_cache_dtype {
                backend = backend.with_cache_dtype(cache);
            }
            if let Some(terms) = args.activation_terms {
                backend = backend.with_q8_activation_terms(terms.into());
            }
            let model = Model::load_from(&backend, info.config.clone(), &options, weight)
                .with_context(|| format!("loading {source}"))?;
            task.run(&backend, &model, &info)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let backend = dsv2_cuda::CudaBackend::new(ordinal, args.dtype)
                .with_context(|| format!("--device cuda:{ordinal}"))?;
            // Quantized weights are an error on the GPU (Backend::load_quantized).
            let model = Model::load_from(&backend, info.config.clone(), &options, weight)
                .with_context(|| format!("loading {source} on cuda:{ordinal}"))?;
            task.run(&backend, &model, &info)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => unreachable!("rejected above"),
    }
}

/// How `checkpoint` holds tensor `name`, for [`crate::memory`].
///
/// # Errors
/// The tensor is missing or its quantized planes disagree (what `validate` reports).
pub fn held(checkpoint: &Checkpoint, name: &str) -> Result<crate::memory::Held> {
    use crate::memory::Held;
    Ok(match checkpoint.weight(name)? {
        Weight::Dense(view) if view.data.is_mapped() => Held::Mapped(view.dtype),
        Weight::Dense(view) => Held::InMemory(view.dtype),
        Weight::Quantized(q) => Held::Quantized(q.format),
    })
}

/// Fails before loading when `--activation-terms` is given for weights that will not be
/// quantized (`quantized`: `--quantize`, or a checkpoint written by `dsv2 quantize`).
pub fn check_activation_terms(args: &ModelArgs, source: &str, quantized: bool) -> Result<()> {
    if let (Some(terms), false) = (args.activation_terms, quantized) {
        bail!(
            "--activation-terms {terms}: {source} has no quantized weights (the terms apply \
             to q8 products: add --quantize q8|q4, or load a checkpoint written by \
             `dsv2 quantize`)"
        );
    }
    Ok(())
}

/// Fails early, before any loading, when the device the arguments name is unavailable.
fn check_device(args: &ModelArgs) -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    if let Device::Cuda(_) = args.device {
        bail!(
            "--device cuda: this dsv2 binary was built without CUDA support \
             (build with `cargo build --release --features cuda`)"
        );
    }
    if let (Device::Cuda(_), Some(terms)) = (args.device, args.activation_terms) {
        bail!(
            "--activation-terms {terms}: the int8 activation terms are the CPU's quantized \
             products; CUDA runs bf16/f32 weights (drop --activation-terms)"
        );
    }
    if let (Device::Cuda(_), Some(cache)) = (args.device, args.kv_cache_dtype) {
        if cache != args.dtype {
            bail!(
                "--kv-cache-dtype {cache} with --dtype {}: on CUDA the latent cache is \
                 stored in the compute dtype (drop --kv-cache-dtype, or set --dtype {cache})",
                args.dtype
            );
        }
    }
    Ok(())
}

/// Reads `config.json` and `generation_config.json` of the model folder `dir` and opens
/// its checkpoint.
pub fn open_folder(dir: &Path) -> Result<(ModelConfig, Checkpoint, Option<GenerationConfig>)> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let generation_config = GenerationConfig::from_dir(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok((config, checkpoint, generation_config))
}
