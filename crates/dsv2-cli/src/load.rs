//! Picking a device and loading a model (a folder, or the built-in one).

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
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

/// A model ready to run, with what generation needs from its config files.
pub struct LoadedModel {
    pub backend: CpuBackend,
    pub model: Model<CpuBackend>,
    pub eos_token_ids: Vec<u32>,
}

/// Loads the model the arguments name on the device they name.
pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    if let Device::Cuda(_) = args.device {
        bail!("--device cuda: this dsv2 binary was built without CUDA support (build with `cargo build --release --features cuda`)");
    }
    let backend = CpuBackend::new(args.dtype);
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
    let eos_token_ids = config.eos_token_ids.clone();
    let model = Model::load(&backend, config, &checkpoint)
        .with_context(|| format!("loading {}", checkpoint.root().display()))?;
    Ok(LoadedModel {
        backend,
        model,
        eos_token_ids,
    })
}

fn open_folder(dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok((config, checkpoint))
}
