//! Picking a device and loading a model (a folder, or the built-in one).

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use dsv2_backend::Backend;
use dsv2_core::{Checkpoint, DType, ModelConfig};
use dsv2_cpu::CpuBackend;
use dsv2_model::synthetic::{builtin_config, synthetic_checkpoint, BUILTIN_SEED};
use dsv2_model::Model;

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
    #[cfg(not(feature = "cuda"))]
    if let Device::Cuda(_) = args.device {
        bail!(
            "--device cuda: this dsv2 binary was built without CUDA support \
             (build with `cargo build --release --features cuda`)"
        );
    }
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
    let info = ModelInfo {
        eos_token_ids: config.eos_token_ids.clone(),
    };
    let root = checkpoint.root().display().to_string();
    match args.device {
        Device::Cpu => {
            let backend = CpuBackend::new(args.dtype);
            let model = Model::load(&backend, config, &checkpoint)
                .with_context(|| format!("loading {root}"))?;
            task.run(&backend, &model, &info)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let backend = dsv2_cuda::CudaBackend::new(ordinal, args.dtype)
                .with_context(|| format!("--device cuda:{ordinal}"))?;
            let model = Model::load(&backend, config, &checkpoint)
                .with_context(|| format!("loading {root} on cuda:{ordinal}"))?;
            task.run(&backend, &model, &info)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => unreachable!("rejected above"),
    }
}

fn open_folder(dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok((config, checkpoint))
}
