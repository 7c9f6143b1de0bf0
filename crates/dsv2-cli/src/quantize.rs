//! `dsv2 quantize`: write a checkpoint in dsv2's q8/q4 block format.
//!
//! The output folder holds `model.safetensors` (quantized planes `<name>.qweight` and
//! `<name>.scales` for eligible matrices, every other tensor as stored) with
//! `{"dsv2_quantization": FORMAT, "dsv2_quant_version": "2"}` metadata (the interleaved
//! layout documented in `dsv2_core::quant`), plus copies of
//! the config, tokenizer and generation files. It loads memory-mapped, without
//! re-quantizing (the CPU backend copies the planes once into huge pages). Tensors are quantized one at a time while the file is written, so
//! memory stays near one tensor's size.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv2_core::quant::{
    quantize_tensor, quantized_format, QuantFormat, LAYOUT_VERSION, METADATA_KEY, QWEIGHT_SUFFIX,
    SCALES_SUFFIX, VERSION_KEY,
};
use dsv2_core::{expected_tensors, Checkpoint, DType, ModelConfig, TensorView, Weight};
use safetensors::tensor::View;

/// Arguments of `dsv2 quantize`.
#[derive(Args)]
pub struct QuantizeArgs {
    /// Model folder or hub id to quantize.
    #[arg(long)]
    model: String,
    /// Target format: q8, or q4 (routed experts at 4 bits, other matrices at q8).
    #[arg(long)]
    to: QuantFormat,
    /// Output folder (created; must not hold a model.safetensors already).
    #[arg(long)]
    output: PathBuf,
}

/// Files copied next to the quantized weights when present.
const SIDE_FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// One tensor of the output file, produced when the writer asks for its bytes.
enum Plane {
    Dense(TensorView),
    QWeight(TensorView, QuantFormat, Vec<usize>),
    Scales(TensorView, QuantFormat, Vec<usize>),
}

fn st_dtype(d: &DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I8 => safetensors::Dtype::I8,
        DType::U8 => safetensors::Dtype::U8,
        DType::Unsupported(_) => unreachable!("validated before writing"),
    }
}

impl View for &Plane {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Plane::Dense(v) => st_dtype(&v.dtype),
            Plane::QWeight(_, QuantFormat::Q8, _) => safetensors::Dtype::I8,
            Plane::QWeight(_, QuantFormat::Q4, _) => safetensors::Dtype::U8,
            Plane::Scales(..) => safetensors::Dtype::F16,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Plane::Dense(v) => &v.shape,
            Plane::QWeight(_, _, s) | Plane::Scales(_, _, s) => s,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Plane::Dense(v) => Cow::Borrowed(v.data.as_slice()),
            Plane::QWeight(v, f, _) => {
                Cow::Owned(quantize_tensor(v, *f).qweight.data.as_slice().to_vec())
            }
            Plane::Scales(v, f, _) => {
                Cow::Owned(quantize_tensor(v, *f).scales.data.as_slice().to_vec())
            }
        }
    }

    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        match self.dtype() {
            safetensors::Dtype::F32 => n * 4,
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => n * 2,
            _ => n,
        }
    }
}

/// Runs `dsv2 quantize`.
pub fn run(args: QuantizeArgs) -> Result<()> {
    let dir = crate::load::resolve(Some(&args.model))?.expect("a model was named");
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(&dir)?;
    checkpoint.validate(&expected_tensors(&config))?;
    let out_file = args.output.join("model.safetensors");
    if out_file.exists() {
        bail!("{} already exists", out_file.display());
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut planes = Vec::new();
    let (mut quantized, mut kept) = (0usize, 0usize);
    for expected in expected_tensors(&config) {
        let name = expected.name;
        let view = match checkpoint.weight(&name)? {
            Weight::Dense(view) => view,
            Weight::Quantized(_) => bail!("{}: already quantized", dir.display()),
        };
        match quantized_format(&name, &view.shape, args.to) {
            Some(format) => {
                let (rows, cols) = (view.shape[0], view.shape[1]);
                let qshape = vec![rows, format.row_bytes(cols)];
                let sshape = vec![rows, cols / dsv2_core::quant::BLOCK];
                planes.push((
                    format!("{name}{QWEIGHT_SUFFIX}"),
                    Plane::QWeight(view.clone(), format, qshape),
                ));
                planes.push((
                    format!("{name}{SCALES_SUFFIX}"),
                    Plane::Scales(view, format, sshape),
                ));
                quantized += 1;
            }
            None => {
                planes.push((name, Plane::Dense(view)));
                kept += 1;
            }
        }
    }
    let metadata = HashMap::from([
        (METADATA_KEY.to_string(), args.to.name().to_string()),
        (VERSION_KEY.to_string(), LAYOUT_VERSION.to_string()),
    ]);
    safetensors::serialize_to_file(
        planes.iter().map(|(n, p)| (n.as_str(), p)),
        Some(metadata),
        &out_file,
    )
    .with_context(|| format!("writing {}", out_file.display()))?;
    for file in SIDE_FILES {
        copy_if_present(&dir, &args.output, file)?;
    }
    eprintln!(
        "wrote {} ({} matrices quantized to {}, {} tensors kept)",
        out_file.display(),
        quantized,
        args.to.name(),
        kept
    );
    Ok(())
}

fn copy_if_present(from: &Path, to: &Path, name: &str) -> Result<()> {
    let src = from.join(name);
    if src.exists() {
        std::fs::copy(&src, to.join(name)).with_context(|| format!("copying {name}"))?;
    }
    Ok(())
}
