//! Memory-mapped safetensors checkpoints in the HuggingFace hub layout.
//!
//! A checkpoint is one `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped and never copied: a
//! [`TensorView`] is a typed window (dtype, shape, bytes) into a mapping. Headers are
//! parsed here (not by the `safetensors` crate) so that a truncated or inconsistent file
//! is reported with the name of the first tensor it breaks.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use serde_json::Value;

use crate::error::{CoreError, Result};
use crate::quant::{QuantFormat, QuantizedTensor, BLOCK, QWEIGHT_SUFFIX, SCALES_SUFFIX};

/// A weight as stored: dense, or quantized in one of dsv2's block formats.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(TensorView),
    Quantized(QuantizedTensor),
}

/// Element type of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Quantized values of dsv2's `q8` format.
    I8,
    /// Packed nibbles of dsv2's `q4` format.
    U8,
    /// A dtype the engine cannot compute with (e.g. `F8_E4M3`); rejected at validation.
    Unsupported(String),
}

impl DType {
    fn parse(s: &str) -> DType {
        match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            other => DType::Unsupported(other.to_string()),
        }
    }

    /// Bytes per element, if the dtype is known.
    pub fn size(&self) -> Option<usize> {
        match self {
            DType::F32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::I8 | DType::U8 => Some(1),
            DType::Unsupported(s) => match s.as_str() {
                "F64" | "I64" | "U64" => Some(8),
                "I32" | "U32" => Some(4),
                "I16" | "U16" => Some(2),
                "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
                _ => None,
            },
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("F32"),
            DType::F16 => f.write_str("F16"),
            DType::BF16 => f.write_str("BF16"),
            DType::I8 => f.write_str("I8"),
            DType::U8 => f.write_str("U8"),
            DType::Unsupported(s) => f.write_str(s),
        }
    }
}

/// Shared, immutable bytes: a window into a memory map or an owned buffer.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// The same owner when it is a file mapping (for `release_pages`).
    map: Option<Arc<Mapped>>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// Wraps owned bytes, stored 4-byte aligned so any supported dtype can be viewed.
    ///
    /// The vector is kept as it is when its buffer is already 4-byte aligned (what the
    /// system allocator returns for any buffer of that size in practice), so wrapping a
    /// large tensor does not hold two copies; otherwise the bytes are copied once.
    pub fn from_vec(bytes: Vec<u8>) -> Bytes {
        let len = bytes.len();
        if (bytes.as_ptr() as usize).is_multiple_of(4) {
            return Bytes {
                owner: Arc::new(bytes),
                map: None,
                start: 0,
                len,
            };
        }
        let mut words = vec![0u32; len.div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len].copy_from_slice(&bytes);
        Bytes {
            owner: Arc::new(AlignedBytes { words, len }),
            map: None,
            start: 0,
            len,
        }
    }

    /// Wraps an owner of `len` bytes (4-byte aligned).
    pub(crate) fn from_owner(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, len: usize) -> Bytes {
        Bytes {
            owner,
            map: None,
            start: 0,
            len,
        }
    }

    /// Whether these bytes are a window into a file mapping.
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    /// Drops these bytes' pages from the process when they are a window into a file
    /// mapping, so a tensor read once (quantized at load, say) stops counting in the
    /// resident set; touched again, they are read back from the file. Owned bytes are
    /// left as they are.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Some(map) = &self.map {
            // SAFETY: the mapping is a read-only file mapping: MADV_DONTNEED discards no
            // data, the pages are faulted in again from the file on the next access.
            let _ = unsafe {
                map.0.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.start,
                    self.len,
                )
            };
        }
    }
}

struct AlignedBytes {
    words: Vec<u32>,
    len: usize,
}

impl AsRef<[u8]> for AlignedBytes {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

struct Mapped(memmap2::Mmap);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A typed view of one tensor: dtype, shape and the bytes in its file.
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Bytes,
    /// The file the tensor lives in (for error messages).
    pub file: PathBuf,
}

impl std::fmt::Debug for TensorView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {:?}", self.name, self.dtype, self.shape)
    }
}

impl TensorView {
    /// Makes an in-memory tensor (used by built-in and random-weight models).
    pub fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> TensorView {
        TensorView {
            name: name.to_string(),
            dtype,
            shape,
            data: Bytes::from_vec(bytes),
            file: PathBuf::from("<in memory>"),
        }
    }

    /// A tensor read from a file mapping copied into weight memory of transparent huge
    /// pages ([`crate::hugemem`]), the file pages released: for a dense matrix that
    /// decode streams every step, as the quantized planes are. Bytes made in memory are
    /// left where their maker put them (random bench weights make such matrices in huge
    /// pages directly, without a transient second copy).
    pub fn into_huge_pages(self) -> TensorView {
        if !self.data.is_mapped() {
            return self;
        }
        let mut buf = crate::hugemem::alloc(self.data.as_slice().len());
        buf.as_mut_slice().copy_from_slice(self.data.as_slice());
        self.data.release_pages();
        TensorView {
            data: buf.freeze(),
            ..self
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as bf16. Panics if the dtype differs (checked at load).
    pub fn as_bf16(&self) -> &[bf16] {
        assert_eq!(self.dtype, DType::BF16, "{}", self.name);
        bytemuck::cast_slice(self.data.as_slice())
    }

    /// The elements as f16. Panics if the dtype differs (checked at load).
    pub fn as_f16(&self) -> &[f16] {
        assert_eq!(self.dtype, DType::F16, "{}", self.name);
        bytemuck::cast_slice(self.data.as_slice())
    }

    /// The elements as f32. Panics if the dtype differs (checked at load).
    pub fn as_f32(&self) -> &[f32] {
        assert_eq!(self.dtype, DType::F32, "{}", self.name);
        bytemuck::cast_slice(self.data.as_slice())
    }

    /// True for the float dtypes a dense weight may have.
    pub fn is_float(&self) -> bool {
        matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Copies the elements out as f32 (for small tensors such as norm weights).
    ///
    /// # Panics
    /// If the dtype is not a float dtype (checked at validation).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.copy_f32(0, &mut out);
        out
    }

    /// Copies row `r` of a 2-D float tensor into `out` as f32.
    ///
    /// # Panics
    /// If the dtype is not a float dtype or the row is out of range.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.shape.last().copied().unwrap_or(1);
        self.copy_f32(r * cols, &mut out[..cols]);
    }

    fn copy_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.as_f32()[start..start + n]),
            DType::F16 => out
                .iter_mut()
                .zip(&self.as_f16()[start..start + n])
                .for_each(|(o, v)| *o = v.to_f32()),
            DType::BF16 => out
                .iter_mut()
                .zip(&self.as_bf16()[start..start + n])
                .for_each(|(o, v)| *o = v.to_f32()),
            _ => panic!("{}: {} is not a float dtype", self.name, self.dtype),
        }
    }
}

/// A tensor the config implies: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

/// All tensors of a checkpoint, by name.
pub struct Checkpoint {
    root: PathBuf,
    tensors: HashMap<String, TensorView>,
}

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Opens the safetensors files of the model folder `dir` (memory-mapped).
    ///
    /// # Errors
    /// A missing file, a malformed or truncated header, or a tensor whose bytes run past
    /// the end of its file, named with the tensor and the file.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut tensors = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| CoreError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
                path: index_path.clone(),
                source,
            })?;
            let weight_map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| CoreError::Checkpoint {
                    path: index_path.clone(),
                    problem: "no `weight_map` object".into(),
                })?;
            let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (name, file) in weight_map {
                let file = file.as_str().ok_or_else(|| CoreError::Checkpoint {
                    path: index_path.clone(),
                    problem: format!("weight_map entry `{name}` is not a file name"),
                })?;
                by_file.entry(file).or_default().push(name);
            }
            for (file, names) in by_file {
                let path = dir.join(file);
                if !path.exists() {
                    return Err(CoreError::Tensor {
                        file: path,
                        tensor: names[0].to_string(),
                        problem: format!(
                            "shard listed in {INDEX_FILE} is missing ({} tensors live there)",
                            names.len()
                        ),
                    });
                }
                let shard = read_safetensors(&path)?;
                for name in names {
                    if !shard.contains_key(name) {
                        return Err(CoreError::Tensor {
                            file: path.clone(),
                            tensor: name.to_string(),
                            problem: format!("listed in {INDEX_FILE} but not in this shard"),
                        });
                    }
                }
                tensors.extend(shard);
            }
        } else if single_path.exists() {
            tensors = read_safetensors(&single_path)?;
        } else {
            return Err(CoreError::Checkpoint {
                path: dir.to_path_buf(),
                problem: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            });
        }
        Ok(Checkpoint {
            root: dir.to_path_buf(),
            tensors,
        })
    }

    /// Wraps in-memory tensors (built-in and random-weight models).
    pub fn from_tensors(label: &str, list: Vec<TensorView>) -> Checkpoint {
        Checkpoint {
            root: PathBuf::from(label),
            tensors: list.into_iter().map(|t| (t.name.clone(), t)).collect(),
        }
    }

    /// Where the checkpoint came from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True if the checkpoint has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name)
    }

    /// Checks every expected tensor for presence, shape and a supported dtype.
    ///
    /// # Errors
    /// The first missing, misshapen or unsupported tensor, with its file.
    pub fn validate(&self, expected: &[ExpectedTensor]) -> Result<()> {
        for want in expected {
            if !self.tensors.contains_key(&want.name) {
                if let Some(q) = self.quantized(&want.name)? {
                    if [q.rows, q.cols] != want.shape[..] {
                        return Err(CoreError::Tensor {
                            file: q.qweight.file.clone(),
                            tensor: want.name.clone(),
                            problem: format!(
                                "quantized shape [{}, {}] does not match {:?} implied by \
                                 config.json",
                                q.rows, q.cols, want.shape
                            ),
                        });
                    }
                    continue;
                }
            }
            let Some(have) = self.tensors.get(&want.name) else {
                let hint = self.fused_expert_hint(&want.name);
                return Err(CoreError::Tensor {
                    file: self.root.clone(),
                    tensor: want.name.clone(),
                    problem: format!("missing from the checkpoint{hint}"),
                });
            };
            if have.shape != want.shape {
                return Err(CoreError::Tensor {
                    file: have.file.clone(),
                    tensor: want.name.clone(),
                    problem: format!(
                        "shape {:?} does not match {:?} implied by config.json",
                        have.shape, want.shape
                    ),
                });
            }
            if !have.is_float() {
                return Err(CoreError::Tensor {
                    file: have.file.clone(),
                    tensor: want.name.clone(),
                    problem: format!("dtype {} is not supported (BF16, F16 or F32)", have.dtype),
                });
            }
        }
        Ok(())
    }

    fn fused_expert_hint(&self, name: &str) -> String {
        let Some(pos) = name.find(".mlp.experts.") else {
            return String::new();
        };
        let fused = format!("{}.mlp.experts.gate_up_proj", &name[..pos]);
        if self.tensors.contains_key(&fused) {
            format!(
                " (found fused `{fused}`, the transformers>=5 save format; dsv2 reads the hub's \
                 per-expert tensors `experts.N.gate_proj/up_proj/down_proj`)"
            )
        } else {
            String::new()
        }
    }

    /// The weight `name`, dense or in a dsv2 quantized format.
    ///
    /// # Errors
    /// The tensor is missing or its quantized planes are inconsistent.
    pub fn weight(&self, name: &str) -> Result<Weight> {
        if let Some(view) = self.tensors.get(name) {
            return Ok(Weight::Dense(view.clone()));
        }
        match self.quantized(name)? {
            Some(q) => Ok(Weight::Quantized(q)),
            None => self.tensor(name).map(|v| Weight::Dense(v.clone())),
        }
    }

    /// Whether the checkpoint stores any tensor quantized (a `dsv2 quantize` output).
    pub fn has_quantized_tensors(&self) -> bool {
        self.tensors.keys().any(|k| k.ends_with(QWEIGHT_SUFFIX))
    }

    /// The quantized planes of `name`, if the checkpoint stores it quantized.
    fn quantized(&self, name: &str) -> Result<Option<QuantizedTensor>> {
        let qname = format!("{name}{QWEIGHT_SUFFIX}");
        let sname = format!("{name}{SCALES_SUFFIX}");
        let (Some(qweight), Some(scales)) = (self.tensors.get(&qname), self.tensors.get(&sname))
        else {
            return Ok(None);
        };
        let bad = |problem: String| CoreError::Tensor {
            file: qweight.file.clone(),
            tensor: qname.clone(),
            problem,
        };
        let format = match qweight.dtype {
            DType::I8 => QuantFormat::Q8,
            DType::U8 => QuantFormat::Q4,
            ref d => return Err(bad(format!("dtype {d} is neither I8 (q8) nor U8 (q4)"))),
        };
        let [rows, qcols] = qweight.shape[..] else {
            return Err(bad(format!(
                "expected 2 dimensions, got {:?}",
                qweight.shape
            )));
        };
        let cols = match format {
            QuantFormat::Q8 => qcols,
            QuantFormat::Q4 => qcols * 2,
        };
        if cols % BLOCK != 0 || scales.dtype != DType::F16 || scales.shape != [rows, cols / BLOCK] {
            return Err(bad(format!(
                "scales `{sname}` must be F16 [{rows}, {}], got {} {:?}",
                cols / BLOCK,
                scales.dtype,
                scales.shape
            )));
        }
        Ok(Some(QuantizedTensor {
            name: name.to_string(),
            format,
            rows,
            cols,
            qweight: qweight.clone(),
            scales: scales.clone(),
        }))
    }

    /// Returns a tensor that [`validate`](Self::validate) has checked.
    ///
    /// # Errors
    /// The tensor is missing.
    pub fn tensor(&self, name: &str) -> Result<&TensorView> {
        self.tensors.get(name).ok_or_else(|| CoreError::Tensor {
            file: self.root.clone(),
            tensor: name.to_string(),
            problem: "missing from the checkpoint".into(),
        })
    }
}

/// Refuses a file written by `dsv2 quantize` in another layout version than this
/// build's (the planes would be read in the wrong order).
fn check_quant_version(metadata: &Value) -> std::result::Result<(), String> {
    let Some(format) = metadata.get(crate::quant::METADATA_KEY) else {
        return Ok(());
    };
    let version = metadata
        .get(crate::quant::VERSION_KEY)
        .and_then(Value::as_str)
        .unwrap_or("1");
    if version == crate::quant::LAYOUT_VERSION {
        return Ok(());
    }
    Err(format!(
        "quantized ({format}) in dsv2 quantization layout version {version}, but this dsv2 \
         reads only version {}; quantize the original checkpoint again with this dsv2 \
         (`dsv2 quantize`), or pass the original with `--quantize`",
        crate::quant::LAYOUT_VERSION
    ))
}

/// Parses one safetensors file's header and maps its data.
fn read_safetensors(path: &Path) -> Result<HashMap<String, TensorView>> {
    let io_err = |source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    // SAFETY: the mapping is read-only; a checkpoint modified while mapped is outside
    // what we can guard against (as in every mmap-based loader).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
    let file_len = mmap.len();
    let bad = |problem: String| CoreError::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "file has {file_len} bytes, too short for a safetensors header (truncated?)"
        )));
    }
    let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header claims {header_len} bytes but the file has {file_len} (truncated?)"
        )));
    }
    let header: Value = serde_json::from_slice(&mmap[8..8 + header_len])
        .map_err(|e| bad(format!("malformed safetensors header: {e}")))?;
    let header = header
        .as_object()
        .ok_or_else(|| bad("safetensors header is not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let map = Arc::new(Mapped(mmap));
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = map.clone();
    let mut out = HashMap::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            check_quant_version(info).map_err(bad)?;
            continue;
        }
        let tensor_err = |problem: String| CoreError::Tensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            problem,
        };
        let dtype = info
            .get("dtype")
            .and_then(Value::as_str)
            .map(DType::parse)
            .ok_or_else(|| tensor_err("header entry has no dtype".into()))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .ok_or_else(|| tensor_err("header entry has no valid shape".into()))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|o| o.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| tensor_err("header entry has no valid data_offsets".into()))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if let Some(size) = dtype.size() {
            let want = shape.iter().product::<usize>() * size;
            if want != end - begin {
                return Err(tensor_err(format!(
                    "shape {shape:?} of {dtype} needs {want} bytes but data_offsets span {}",
                    end - begin
                )));
            }
        }
        if data_start + end > file_len {
            return Err(tensor_err(format!(
                "data ends at byte {} but the file has {file_len} bytes (truncated?)",
                data_start + end
            )));
        }
        let mut data = Bytes {
            owner: owner.clone(),
            map: Some(map.clone()),
            start: data_start + begin,
            len: end - begin,
        };
        // Views are cast to typed slices; a misaligned tensor (odd header padding) is
        // copied once into an aligned buffer rather than read unaligned.
        let align = dtype.size().unwrap_or(1).min(4);
        if !(data.as_slice().as_ptr() as usize).is_multiple_of(align) {
            data = Bytes::from_vec(data.as_slice().to_vec());
        }
        out.insert(
            name.clone(),
            TensorView {
                name: name.clone(),
                dtype,
                shape,
                data,
                file: path.to_path_buf(),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView as StView};

    fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, StView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), StView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// A fresh folder under the system's temp folder, removed (with what the test wrote in
    /// it) when dropped.
    fn tmpdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("dsv2-ckpt-{tag}-"))
            .tempdir()
            .expect("create a scratch folder")
    }

    fn expect(name: &str, shape: &[usize]) -> ExpectedTensor {
        ExpectedTensor {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn a_mapped_tensor_moves_into_huge_pages_unchanged() {
        let scratch = tmpdir("huge");
        let dir = scratch.path();
        // 1 MiB: above hugemem's heap threshold, so it lands in a huge-page mapping.
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        write_file(
            &dir.join("model.safetensors"),
            &[("w", Dtype::BF16, vec![512, 1024], bytes.clone())],
        );
        let ck = Checkpoint::open(dir).unwrap();
        let view = ck.tensor("w").unwrap().clone();
        assert!(view.data.is_mapped());
        let moved = view.into_huge_pages();
        assert!(!moved.data.is_mapped());
        assert_eq!(
            (moved.dtype.clone(), moved.shape.clone()),
            (DType::BF16, vec![512, 1024])
        );
        assert_eq!(moved.data.as_slice(), &bytes[..]);
        assert_eq!(moved.name, "w");
    }

    #[test]
    fn reads_single_file_and_checks_shapes() {
        let scratch = tmpdir("single");
        let dir = scratch.path();
        let a: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [bf16::from_f32(0.5), bf16::from_f32(-1.0)]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect();
        write_file(
            &dir.join(SINGLE_FILE),
            &[
                ("a", Dtype::F32, vec![2, 2], a),
                ("b", Dtype::BF16, vec![2], b),
            ],
        );
        let ck = Checkpoint::open(dir).unwrap();
        assert_eq!(ck.get("a").unwrap().as_f32(), &[1.5, -2.0, 3.25, 0.0]);
        assert_eq!(ck.get("b").unwrap().to_f32_vec(), vec![0.5, -1.0]);
        ck.validate(&[expect("a", &[2, 2]), expect("b", &[2])])
            .unwrap();
        let e = ck.validate(&[expect("a", &[4])]).unwrap_err().to_string();
        assert!(e.contains("`a`") && e.contains("shape [2, 2]"), "{e}");
        let e = ck.validate(&[expect("c", &[1])]).unwrap_err().to_string();
        assert!(e.contains("`c`: missing"), "{e}");
    }

    #[test]
    fn released_pages_read_back_from_the_file() {
        let scratch = tmpdir("release");
        let dir = scratch.path();
        // Two tensors sharing pages: releasing one must not disturb the other.
        let big: Vec<f32> = (0..50_000).map(|i| i as f32 * 0.5).collect();
        let small = [7.0f32, 8.0, 9.0];
        write_file(
            &dir.join(SINGLE_FILE),
            &[
                (
                    "big",
                    Dtype::F32,
                    vec![50_000],
                    bytemuck::cast_slice(&big).to_vec(),
                ),
                (
                    "small",
                    Dtype::F32,
                    vec![3],
                    bytemuck::cast_slice(&small).to_vec(),
                ),
            ],
        );
        let ck = Checkpoint::open(dir).unwrap();
        let (b, s) = (ck.get("big").unwrap(), ck.get("small").unwrap());
        assert_eq!(b.as_f32(), &big[..]);
        b.data.release_pages();
        s.data.release_pages();
        assert_eq!(b.as_f32(), &big[..]);
        assert_eq!(s.as_f32(), &small[..]);
        // Owned bytes are untouched.
        let owned = TensorView::owned(
            "o",
            DType::F32,
            vec![3],
            bytemuck::cast_slice(&small).to_vec(),
        );
        owned.data.release_pages();
        assert_eq!(owned.as_f32(), &small[..]);
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let scratch = tmpdir("trunc");
        let dir = scratch.path();
        let path = dir.join(SINGLE_FILE);
        write_file(
            &path,
            &[
                ("first", Dtype::F32, vec![4], vec![0u8; 16]),
                ("second", Dtype::F32, vec![64], vec![0u8; 256]),
            ],
        );
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 10]).unwrap();
        let e = Checkpoint::open(dir).err().unwrap().to_string();
        assert!(e.contains("`second`") && e.contains("truncated"), "{e}");
        std::fs::write(&path, &full[..20]).unwrap();
        let e = Checkpoint::open(dir).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn sharded_index_and_missing_shard() {
        let scratch = tmpdir("shards");
        let dir = scratch.path();
        write_file(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("x", Dtype::F32, vec![1], vec![0u8; 4])],
        );
        write_file(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("y", Dtype::F16, vec![2], vec![0u8; 4])],
        );
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "x": "model-00001-of-00002.safetensors",
            "y": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let ck = Checkpoint::open(dir).unwrap();
        assert_eq!(ck.len(), 2);
        assert_eq!(ck.get("y").unwrap().dtype, DType::F16);
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let e = Checkpoint::open(dir).err().unwrap().to_string();
        assert!(
            e.contains("model-00002-of-00002") && e.contains("`y`"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let scratch = tmpdir("dtype");
        let dir = scratch.path();
        write_file(
            &dir.join(SINGLE_FILE),
            &[("q", Dtype::I32, vec![4], vec![0u8; 16])],
        );
        let ck = Checkpoint::open(dir).unwrap();
        let e = ck.validate(&[expect("q", &[4])]).unwrap_err().to_string();
        assert!(e.contains("`q`") && e.contains("I32"), "{e}");
    }

    #[test]
    fn owned_bytes_are_aligned_and_not_copied_when_aligned() {
        let bytes: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let ptr = bytes.as_ptr();
        let aligned = (ptr as usize).is_multiple_of(4);
        let wrapped = Bytes::from_vec(bytes);
        assert!((wrapped.as_slice().as_ptr() as usize).is_multiple_of(4));
        assert_eq!(wrapped.as_slice()[4095], 255);
        if aligned {
            assert_eq!(
                wrapped.as_slice().as_ptr(),
                ptr,
                "an aligned vector is kept"
            );
        }
    }
}
