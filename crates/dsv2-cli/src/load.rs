//! Picking a device and loading a model (a folder, or the built-in one).

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use dsv2_backend::Backend;
use dsv2_core::{expected_tensors, Checkpoint, DType, ModelConfig, Weight};
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
    /// End-of-sequence ids from config.json.
    pub eos_token_ids: Vec<u32>,
}

/// A command that runs on a loaded model, whatever the backend.
pub trait ModelTask {
    type Output;
    /// Runs with the model loaded on `backend`.
    fn run<B: Backend>(
        self,
        backend: &B,
        model: &Model<B>,
        info: &ModelInfo,
    ) -> Result<Self::Output>;
}

/// Loads the model the arguments name on the device they name, then runs `task`.
pub fn with_model<T: ModelTask>(args: &ModelArgs, task: T) -> Result<T::Output> {
    check_device(args)?;
    let (config, checkpoint) = match &args.model {
        Some(dir) => open_folder(dir)?,
        None => {
            eprintln!(
                "dsv2: no --model given: running the built-in model (DeepSeek-V2 architecture, \
                 synthetic weights; its output is not meaningful text)"
            );
            let config = builtin_config();
            let checkpoint = synthetic_checkpoint(&config, BUILTIN_SEED, DType::BF16);
            (config, checkpoint)
        }
    };
    let root = checkpoint.root().display().to_string();
    checkpoint
        .validate(&expected_tensors(&config))
        .with_context(|| format!("loading {root}"))?;
    let weight = |name: &str| Ok(checkpoint.weight(name)?);
    with_weights(args, config, &root, weight, task)
}

/// Loads `config`'s weights from `weight` (asked once per tensor name, as
/// [`Model::load_from`] does; `source` names it in errors) on the device the arguments
/// name, quantized as they ask, then runs `task`.
pub fn with_weights<T: ModelTask>(
    args: &ModelArgs,
    config: ModelConfig,
    source: &str,
    weight: impl FnMut(&str) -> dsv2_model::Result<Weight>,
    task: T,
) -> Result<T::Output> {
    check_device(args)?;
    let info = ModelInfo {
        eos_token_ids: config.eos_token_ids.clone(),
    };
    match args.device {
        Device::Cpu => {
            let backend = CpuBackend::new(args.dtype);
            let options = LoadOptions {
                quantize: args.quantize,
            };
            let model = Model::load_from(&backend, config, &options, weight)
                .with_context(|| format!("loading {source}"))?;
            task.run(&backend, &model, &info)
        }
        Device::Cuda(_) => unreachable!("rejected above"),
    }
}

/// Fails early, before any loading, when the device the arguments name is unavailable.
fn check_device(args: &ModelArgs) -> Result<()> {
    if let Device::Cuda(_) = args.device {
        bail!(
            "--device cuda: this dsv2 binary was built without CUDA support \
             (build with `cargo build --release --features cuda`)"
        );
    }
    Ok(())
}

/// Reads `config.json` of the model folder `dir` and opens its checkpoint.
pub fn open_folder(dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok((config, checkpoint))
}
