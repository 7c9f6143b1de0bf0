//! `dsv2 quantize`: write a checkpoint in dsv2's q8/q4 block format.
//!
//! The output folder holds `model.safetensors`, or with `--max-shard-size` numbered shards
//! and a `model.safetensors.index.json` (quantized planes `<name>.qweight` and
//! `<name>.scales` for eligible matrices, every other tensor as stored), each file with
//! `{"dsv2_quantization": FORMAT, "dsv2_quant_version": "2"}` metadata (the interleaved
//! layout documented in `dsv2_core::quant`), plus copies of the config, tokenizer and
//! generation files. It loads memory-mapped, without re-quantizing (the CPU backend
//! copies the planes once into huge pages).
//!
//! Each file is laid out as `safetensors::serialize` lays it out (the same bytes), but
//! written tensor by tensor at its offsets: each matrix is quantized once and its input
//! pages released, and a writer thread writes its planes while the next is quantized, so
//! the process holds about two tensors at a time however large the checkpoint. Files are
//! written under temporary names and renamed when complete (the index last), so a failed
//! run leaves no truncated model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use dsv2_core::checkpoint::{INDEX_FILE, SINGLE_FILE};
use dsv2_core::quant::{
    quantize_tensor, quantized_format, QuantFormat, LAYOUT_VERSION, METADATA_KEY, QWEIGHT_SUFFIX,
    SCALES_SUFFIX, VERSION_KEY,
};
use dsv2_core::{expected_tensors, Bytes, Checkpoint, DType, ModelConfig, TensorView, Weight};
use indicatif::{ProgressBar, ProgressStyle};
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
    /// Output folder (created; must not hold a checkpoint already).
    #[arg(long)]
    output: PathBuf,
    /// Split the output into shards of at most this size (e.g. 5GB, 4GiB), named
    /// `model-00001-of-0000N.safetensors` with a `model.safetensors.index.json`, as
    /// `save_pretrained` does; a tensor larger than this gets a shard of its own. Default:
    /// one `model.safetensors`.
    #[arg(long, value_parser = crate::serve::parse_bytes)]
    max_shard_size: Option<usize>,
}

/// Files copied next to the quantized weights when present.
const SIDE_FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// One tensor of the output file as the header describes it.
struct Entry {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl Entry {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n * self.dtype.bitsize() / 8
    }
}

/// An [`Entry`] as a `safetensors` view without data: `safetensors::serialize` of these
/// is the file's header alone, in the crate's own order and format.
impl View for &Entry {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn data_len(&self) -> usize {
        self.bytes()
    }
}

/// One input tensor: how it is written (quantized to `format`, or copied as stored when
/// `None`), the output tensors it becomes and the shard they go to.
struct Job {
    view: TensorView,
    format: Option<QuantFormat>,
    entries: Vec<Entry>,
    shard: usize,
}

impl Job {
    fn bytes(&self) -> usize {
        self.entries.iter().map(Entry::bytes).sum()
    }
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

/// A safetensors file written tensor by tensor at the offsets its header gives.
struct SafetensorsWriter {
    file: File,
    /// Where the tensors' data starts: 8 bytes of header length plus the header.
    data_start: u64,
    /// Each tensor's `[start, end)` within the data.
    offsets: HashMap<String, (usize, usize)>,
}

impl SafetensorsWriter {
    /// Creates `path`, sized for every entry, with the header `safetensors::serialize`
    /// would write for them.
    fn create(
        path: &Path,
        entries: &[&Entry],
        metadata: HashMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        let header = safetensors::serialize(
            entries.iter().map(|e| (e.name.as_str(), *e)),
            Some(metadata),
        )
        .context("making the safetensors header")?;
        let json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header[8..]).context("reading back the safetensors header")?;
        let mut offsets = HashMap::new();
        let mut data_len = 0usize;
        for (name, info) in &json {
            if name == "__metadata__" {
                continue;
            }
            let range = info["data_offsets"]
                .as_array()
                .and_then(|r| Some((r.first()?.as_u64()? as usize, r.get(1)?.as_u64()? as usize)))
                .with_context(|| format!("{name}: no data_offsets in the header"))?;
            data_len = data_len.max(range.1);
            offsets.insert(name.clone(), range);
        }
        let mut file =
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&header)?;
        let data_start = header.len() as u64;
        file.set_len(data_start + data_len as u64)?;
        Ok(SafetensorsWriter {
            file,
            data_start,
            offsets,
        })
    }

    /// Writes tensor `name`'s bytes at its offset.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (start, end) = *self
            .offsets
            .get(name)
            .with_context(|| format!("{name}: not in the header"))?;
        ensure!(
            end - start == bytes.len(),
            "{name}: {} bytes, the header has {}",
            bytes.len(),
            end - start
        );
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))?;
        self.file
            .write_all(bytes)
            .with_context(|| format!("writing {name}"))
    }
}

/// Runs `dsv2 quantize`.
pub fn run(args: QuantizeArgs) -> Result<()> {
    let dir = crate::load::resolve(Some(&args.model))?.expect("a model was named");
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(&dir)?;
    checkpoint.validate(&expected_tensors(&config))?;
    if args.max_shard_size == Some(0) {
        bail!("--max-shard-size must be positive");
    }
    let mut jobs = Vec::new();
    let (mut quantized, mut kept) = (0usize, 0usize);
    for expected in expected_tensors(&config) {
        let name = expected.name;
        let view = match checkpoint.weight(&name)? {
            Weight::Dense(view) => view,
            Weight::Quantized(_) => bail!("{}: already quantized", dir.display()),
        };
        let format = quantized_format(&name, &view.shape, args.to);
        let entries = match format {
            Some(format) => {
                let (rows, cols) = (view.shape[0], view.shape[1]);
                quantized += 1;
                vec![
                    Entry {
                        name: format!("{name}{QWEIGHT_SUFFIX}"),
                        dtype: match format {
                            QuantFormat::Q8 => safetensors::Dtype::I8,
                            QuantFormat::Q4 => safetensors::Dtype::U8,
                        },
                        shape: vec![rows, format.row_bytes(cols)],
                    },
                    Entry {
                        name: format!("{name}{SCALES_SUFFIX}"),
                        dtype: safetensors::Dtype::F16,
                        shape: vec![rows, cols / dsv2_core::quant::BLOCK],
                    },
                ]
            }
            None => {
                kept += 1;
                vec![Entry {
                    name,
                    dtype: st_dtype(&view.dtype),
                    shape: view.shape.clone(),
                }]
            }
        };
        jobs.push(Job {
            view,
            format,
            entries,
            shard: 0,
        });
    }
    let shards = assign_shards(&mut jobs, args.max_shard_size);
    let files: Vec<String> = match args.max_shard_size {
        None => vec![SINGLE_FILE.to_string()],
        Some(_) => (1..=shards)
            .map(|i| format!("model-{i:05}-of-{shards:05}.safetensors"))
            .collect(),
    };
    for file in files.iter().map(String::as_str).chain([INDEX_FILE]) {
        let path = args.output.join(file);
        if path.exists() || (file == INDEX_FILE && args.output.join(SINGLE_FILE).exists()) {
            bail!(
                "{} already holds a checkpoint ({file})",
                args.output.display()
            );
        }
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let metadata = HashMap::from([
        (METADATA_KEY.to_string(), args.to.name().to_string()),
        (VERSION_KEY.to_string(), LAYOUT_VERSION.to_string()),
    ]);
    let mut finals: Vec<PathBuf> = files.iter().map(|f| args.output.join(f)).collect();
    if args.max_shard_size.is_some() {
        finals.push(args.output.join(INDEX_FILE));
    }
    let partials: Vec<PathBuf> = finals
        .iter()
        .map(|f| {
            let mut partial = f.clone().into_os_string();
            partial.push(".partial");
            PathBuf::from(partial)
        })
        .collect();
    let written = write_jobs(&partials[..files.len()], metadata, &jobs).and_then(|()| {
        if args.max_shard_size.is_some() {
            write_index(&partials[files.len()], &jobs, &files)?;
        }
        Ok(())
    });
    if let Err(e) = written {
        for partial in &partials {
            let _ = std::fs::remove_file(partial);
        }
        return Err(e.context(format!("writing {}", args.output.display())));
    }
    // In order, so the index comes last: until it is in place, the folder holds no
    // checkpoint.
    for (partial, done) in partials.iter().zip(&finals) {
        std::fs::rename(partial, done)
            .with_context(|| format!("renaming {} to {}", partial.display(), done.display()))?;
    }
    for file in SIDE_FILES {
        copy_if_present(&dir, &args.output, file)?;
    }
    eprintln!(
        "wrote {} ({} matrices quantized to {}, {} tensors kept{})",
        args.output.display(),
        quantized,
        args.to.name(),
        kept,
        if args.max_shard_size.is_some() {
            format!("; {shards} shards")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Puts the jobs in shards of at most `max` bytes, in order (a job larger than `max`
/// alone in one); returns the number of shards.
fn assign_shards(jobs: &mut [Job], max: Option<usize>) -> usize {
    let Some(max) = max else {
        return 1;
    };
    let (mut shard, mut filled) = (0, 0);
    for job in jobs.iter_mut() {
        let bytes = job.bytes();
        if filled > 0 && filled + bytes > max {
            shard += 1;
            filled = 0;
        }
        job.shard = shard;
        filled += bytes;
    }
    shard + 1
}

/// Writes `model.safetensors.index.json`: the total size and each tensor's shard.
fn write_index(path: &Path, jobs: &[Job], files: &[String]) -> Result<()> {
    let mut weight_map = serde_json::Map::new();
    for job in jobs {
        for entry in &job.entries {
            weight_map.insert(entry.name.clone(), files[job.shard].clone().into());
        }
    }
    let total: usize = jobs.iter().map(Job::bytes).sum();
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    std::fs::write(path, serde_json::to_string_pretty(&index)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the shard files `paths`: each job's tensor once, then its input pages
/// released. A second thread writes while the next matrix is quantized.
fn write_jobs(paths: &[PathBuf], metadata: HashMap<String, String>, jobs: &[Job]) -> Result<()> {
    let mut writers = Vec::new();
    for (shard, path) in paths.iter().enumerate() {
        let entries: Vec<&Entry> = jobs
            .iter()
            .filter(|j| j.shard == shard)
            .flat_map(|j| &j.entries)
            .collect();
        writers.push(SafetensorsWriter::create(path, &entries, metadata.clone())?);
    }
    let bar = ProgressBar::new(
        jobs.iter()
            .map(|j| j.view.data.as_slice().len() as u64)
            .sum(),
    );
    bar.set_style(
        ProgressStyle::with_template(
            "quantizing [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("a valid template"),
    );
    std::thread::scope(|scope| {
        // Two planes in flight: one matrix's, while the next is quantized.
        let (send, receive) = std::sync::mpsc::sync_channel::<(usize, String, Bytes)>(2);
        let written = scope.spawn(move || -> Result<Vec<SafetensorsWriter>> {
            for (shard, name, bytes) in receive {
                writers[shard].write(&name, bytes.as_slice())?;
                // A copied tensor's mapped pages; a no-op for the planes made in memory.
                bytes.release_pages();
            }
            Ok(writers)
        });
        for job in jobs {
            let view = &job.view;
            let planes = match job.format {
                None => vec![(job.shard, view.name.clone(), view.data.clone())],
                Some(format) => {
                    let q = quantize_tensor(view, format);
                    view.data.release_pages();
                    vec![
                        (job.shard, job.entries[0].name.clone(), q.qweight.data),
                        (job.shard, job.entries[1].name.clone(), q.scales.data),
                    ]
                }
            };
            // A closed channel means the writer failed: its error is returned below.
            if planes.into_iter().any(|plane| send.send(plane).is_err()) {
                break;
            }
            bar.inc(view.data.as_slice().len() as u64);
        }
        drop(send);
        let writers = written.join().expect("the writer thread panicked")?;
        bar.finish_and_clear();
        for writer in writers {
            writer.file.sync_all()?;
        }
        Ok(())
    })
}

fn copy_if_present(from: &Path, to: &Path, name: &str) -> Result<()> {
    let src = from.join(name);
    if src.exists() {
        std::fs::copy(&src, to.join(name)).with_context(|| format!("copying {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor with its bytes, for `safetensors::serialize`.
    struct Owned(safetensors::Dtype, Vec<usize>, Vec<u8>);

    impl View for &Owned {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    #[test]
    fn the_writer_gives_the_bytes_of_safetensors_serialize() {
        use safetensors::Dtype::{BF16, F16, F32, I8, U8};
        let specs: [(&str, safetensors::Dtype, Vec<usize>); 7] = [
            ("b.qweight", I8, vec![3, 7]),
            ("b.scales", F16, vec![3, 1]),
            ("a.weight", BF16, vec![5, 3]),
            ("norm", F32, vec![3]),
            ("c.qweight", U8, vec![1, 5]),
            ("c.scales", F16, vec![1, 1]),
            ("embed", F32, vec![2, 3]),
        ];
        let mut seed = 7u32;
        let tensors: Vec<(String, Owned)> = specs
            .iter()
            .map(|(name, dtype, shape)| {
                let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                let bytes = (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        (seed >> 16) as u8
                    })
                    .collect();
                (name.to_string(), Owned(*dtype, shape.clone(), bytes))
            })
            .collect();
        let metadata = HashMap::from([("k".to_string(), "v".to_string())]);
        let want = safetensors::serialize(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata.clone()),
        )
        .unwrap();
        let entries: Vec<Entry> = tensors
            .iter()
            .map(|(name, t)| Entry {
                name: name.clone(),
                dtype: t.0,
                shape: t.1.clone(),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let mut writer =
            SafetensorsWriter::create(&path, &entries.iter().collect::<Vec<_>>(), metadata)
                .unwrap();
        // In an order of its own, as the quantizer's jobs come.
        for (name, t) in tensors.iter().rev() {
            writer.write(name, &t.2).unwrap();
        }
        drop(writer);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn the_writer_refuses_a_tensor_of_the_wrong_size_or_name() {
        let entries = [Entry {
            name: "w".into(),
            dtype: safetensors::Dtype::F32,
            shape: vec![2, 2],
        }];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let mut writer = SafetensorsWriter::create(&path, &[&entries[0]], HashMap::new()).unwrap();
        let err = writer.write("w", &[0; 12]).unwrap_err().to_string();
        assert!(err.contains("w: 12 bytes, the header has 16"), "{err}");
        let err = writer.write("x", &[0; 16]).unwrap_err().to_string();
        assert!(err.contains("x: not in the header"), "{err}");
    }
}
