//! The CUDA backend: the DeepSeek-V2 forward pass on an NVIDIA GPU.
//!
//! [`CudaBackend`] implements [`dsv2_backend::Backend`] with weights resident on the
//! device in bf16 (or f32 for [`ComputeDtype::F32`]), activations in the same element
//! type with f32 arithmetic inside every kernel, GEMMs through cuBLAS with f32
//! accumulation, and kernels written in CUDA C++ (`kernels/*.cu`) that NVRTC compiles for
//! the device's architecture at first use and caches on disk ([`compile`]).
//!
//! - [`CudaWeight`]: a matrix in the element type, or a vector (norm weight) in f32.
//! - [`CudaBuffer`]: an activation buffer; [`CudaCache`]: the paged latent cache
//!   `[layers, blocks * block_size, C + Dr]`; [`CudaStep`]: a step's metadata, uploaded
//!   once per step by `prepare_step`.
//! - Attention (`attention.rs`) runs the absorbed formulation for decode
//!   tokens and the expanded one for prompts; MoE (`moe.rs`) routes on the
//!   device and runs the experts as batched GEMMs over device-planned tiles, so nothing
//!   returns to the host inside a step except the logits or the greedy token ids.
//!
//! The crate builds without the CUDA toolkit: the driver, cuBLAS and NVRTC are loaded at
//! run time, and [`CudaBackend::new`] returns [`CudaError::Unavailable`] on a machine
//! without them.
//!
//! ```no_run
//! use dsv2_backend::ComputeDtype;
//! let backend = dsv2_cuda::CudaBackend::new(0, ComputeDtype::Bf16)?;
//! let mem = backend.memory_info()?;
//! println!("{}: {} of {} bytes free", backend_name(&backend), mem.free, mem.total);
//! # fn backend_name(b: &dsv2_cuda::CudaBackend) -> String { dsv2_backend::Backend::describe(b) }
//! # Ok::<(), dsv2_cuda::CudaError>(())
//! ```

mod attention;
pub mod compile;
mod device;
mod error;
mod moe;
mod scratch;
mod step;
mod weights;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use cudarc::driver::CudaGraph;

use dsv2_backend::{
    AttentionPath, Backend, BackendError, Batch, CacheSpec, ComputeDtype, MlaAttention, MlaDims,
    Mlp, MoeWeights, PeakRate, Result as BResult, RopeAngles,
};
use dsv2_core::TensorView;

use device::{DevMem, Device};
pub use error::{CudaError, Result};
use scratch::{Scratch, Slot};
pub use step::CudaStep;
pub use weights::CudaWeight;

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;

/// Limits of the kernels that normalize their input rows themselves (at most
/// NORM_MAX_ROWS of common.cuh; `2 * rows * dim` bf16 values of shared memory, at most
/// 32 KiB). Every block normalizes all rows, which measured slower than a separate
/// `add_rms_norm` launch from 4 rows on (V2-Lite, H200).
const FUSED_NORM_MAX_ROWS: usize = 2;
const FUSED_NORM_MAX_VALUES: usize = 8192;

/// Free and total memory of a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: usize,
    pub total: usize,
}

/// An activation buffer on the device: `len` values of the backend's element type.
pub struct CudaBuffer {
    mem: DevMem,
    len: usize,
}

impl CudaBuffer {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
}

/// The paged latent cache on the device: `[layers, blocks * block_size, W]`.
pub struct CudaCache {
    mem: DevMem,
    spec: CacheSpec,
    /// Unique among the caches of this process (keys captured graphs).
    id: u64,
}

/// What a captured decode graph depends on: the model and attention path (the caller's
/// key), the step buffer, the cache, the work buffers' addresses and every count that
/// sizes a launch. Steps with equal keys issue exactly the same launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    caller: u64,
    step_id: u64,
    step_generation: u64,
    cache_id: u64,
    scratch_generation: u64,
    /// The step's layout without the parts read outside the graph (the logits rows) or
    /// through device offsets only (the block tables' length).
    layout: step::Layout,
    tokens: usize,
    seqs: usize,
}

/// Most graphs kept at once (each is one step's worth of launches).
const MAX_GRAPHS: usize = 128;
/// Largest decode batch captured as a graph.
const MAX_GRAPH_TOKENS: usize = 1024;

/// A captured graph, used only under the backend's `graphs` mutex.
struct StepGraph(CudaGraph);

// SAFETY: CUDA graph objects may be used from any thread as long as calls on one graph
// are serialized; every use goes through the `graphs` mutex.
unsafe impl Send for StepGraph {}

/// Captured decode steps.
#[derive(Default)]
struct Graphs {
    /// Steps seen once: a step shape is captured the second time it runs, when its work
    /// buffers have already grown to size (no allocation may happen while capturing).
    seen: HashSet<GraphKey>,
    ready: HashMap<GraphKey, StepGraph>,
    /// The key being recorded between `begin_step_graph` and `end_step_graph`.
    recording: Option<GraphKey>,
    /// Off after a failed capture, with `DSV2_CUDA_GRAPHS=0`, or while profiling.
    disabled: bool,
    /// Pad decode steps to [`decode_bucket`] sizes (`DSV2_CUDA_GRAPH_BUCKETS=0`: exact).
    buckets: bool,
}

/// The batch-size buckets of decode graphs: a step of `tokens` tokens runs as the next
/// size of 1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ..., 128 (steps of 16), 160, ..., 256
/// (steps of 32), then multiples of 64 up to `MAX_GRAPH_TOKENS`; larger steps as they
/// are.
pub fn decode_bucket(tokens: usize) -> usize {
    let step = match tokens {
        0..=2 => return tokens,
        3..=4 => return 4,
        5..=8 => return 8,
        9..=32 => 8,
        33..=128 => 16,
        129..=256 => 32,
        257..=MAX_GRAPH_TOKENS => 64,
        _ => return tokens,
    };
    tokens.div_ceil(step) * step
}

impl CudaCache {
    /// The shape of the cache.
    pub fn spec(&self) -> CacheSpec {
        self.spec
    }
}

/// The CUDA implementation of [`Backend`].
pub struct CudaBackend {
    // Field order is drop order: device memory before the device's stream and handles.
    /// Grow-only work buffers shared by the ops (one stream: ops never overlap).
    scratch: Mutex<Scratch>,
    /// Per MoE layer (keyed by the router's address): the device table of its experts'
    /// gate, up and down weight addresses `[3, E]` (host copy, device table), uploaded at
    /// the layer's first use.
    expert_tables: Mutex<HashMap<u64, (Vec<u64>, DevMem)>>,
    /// Captured decode-step graphs (dropped before the device).
    graphs: Mutex<Graphs>,
    dev: Device,
    dtype: ComputeDtype,
}

impl CudaBackend {
    /// Opens GPU `ordinal` computing in `dtype` (bf16: weights and activations in bf16;
    /// f32: both in f32) and prepares its kernels.
    ///
    /// # Errors
    /// [`CudaError::Unavailable`] without a driver, libraries or such a device; a kernel
    /// compilation or driver failure otherwise.
    pub fn new(ordinal: usize, dtype: ComputeDtype) -> Result<CudaBackend> {
        let dev = Device::new(ordinal, dtype == ComputeDtype::Bf16)?;
        let graphs = Graphs {
            disabled: dev.profile.is_some()
                || std::env::var("DSV2_CUDA_GRAPHS").is_ok_and(|v| v == "0"),
            buckets: std::env::var("DSV2_CUDA_GRAPH_BUCKETS").map_or(true, |v| v != "0"),
            ..Graphs::default()
        };
        Ok(CudaBackend {
            scratch: Mutex::new(Scratch::default()),
            expert_tables: Mutex::new(HashMap::new()),
            graphs: Mutex::new(graphs),
            dev,
            dtype,
        })
    }

    /// The per-op timings gathered so far with `DSV2_CUDA_PROFILE=1` (waits for the
    /// device), or `None` when not profiling.
    pub fn profile_report(&self) -> Option<String> {
        let p = self.dev.profile.as_ref()?;
        Some(p.lock().unwrap_or_else(|e| e.into_inner()).report())
    }

    /// Number of decode-step graphs captured and kept.
    pub fn captured_graphs(&self) -> usize {
        self.graphs_lock().ready.len()
    }

    /// Turns the padding of decode steps to graph buckets on or off (on by default; for
    /// comparisons).
    pub fn set_graph_buckets(&self, on: bool) {
        self.graphs_lock().buckets = on;
    }

    fn graphs_lock(&self) -> std::sync::MutexGuard<'_, Graphs> {
        self.graphs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Free and total memory of the device (for sizing the latent cache).
    ///
    /// # Errors
    /// A driver failure.
    pub fn memory_info(&self) -> Result<MemoryInfo> {
        let (free, total) = self.dev.memory_info()?;
        Ok(MemoryInfo { free, total })
    }

    /// Bytes one cached token takes in one layer (`W` values of the element type).
    pub fn cache_bytes_per_token(&self, spec: &CacheSpec) -> usize {
        spec.width() * self.dev.elem_bytes()
    }

    /// Waits until the device has finished all work issued so far.
    ///
    /// # Errors
    /// A failure of that work (kernel faults surface here).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.sync("synchronize")
    }

    /// A buffer holding `values` (rounded to bf16 in a bf16 backend): for tests and tools
    /// that feed ops directly.
    ///
    /// # Errors
    /// Device memory or copy failures.
    pub fn upload(&self, values: &[f32]) -> Result<CudaBuffer> {
        self.dev.bind()?;
        let mem = self.dev.alloc(values.len() * self.elem())?;
        self.write_elems(mem.ptr(), values)?;
        Ok(CudaBuffer {
            mem,
            len: values.len(),
        })
    }

    /// The values of `buf`, as f32 (waits for the device).
    ///
    /// # Errors
    /// Device failures (including those of earlier work).
    pub fn download(&self, buf: &CudaBuffer) -> Result<Vec<f32>> {
        self.read_elems(buf.ptr(), buf.len)
    }

    /// The whole cache `[layers, blocks * block_size, W]`, as f32 (waits for the device).
    ///
    /// # Errors
    /// Device failures.
    pub fn download_cache(&self, cache: &CudaCache) -> Result<Vec<f32>> {
        let s = cache.spec;
        self.read_elems(
            cache.mem.ptr(),
            s.num_layers * s.num_blocks * s.block_size * s.width(),
        )
    }

    fn write_elems(&self, dst: u64, values: &[f32]) -> Result<()> {
        if self.dev.bf16 {
            let bits: Vec<u16> = values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            self.dev.htod(dst, &bits, "upload")
        } else {
            self.dev.htod(dst, values, "upload")
        }
    }

    fn read_elems(&self, src: u64, len: usize) -> Result<Vec<f32>> {
        self.dev.bind()?;
        if self.dev.bf16 {
            let mut bits = vec![0u16; len];
            self.dev.dtoh(&mut bits, src, "download")?;
            Ok(bits
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect())
        } else {
            let mut out = vec![0f32; len];
            self.dev.dtoh(&mut out, src, "download")?;
            Ok(out)
        }
    }

    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        // A panic while holding the lock leaves buffers that are still valid memory.
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn elem(&self) -> usize {
        self.dev.elem_bytes()
    }

    /// True when a residual add and RMSNorm of `rows` rows of width `dim` can be computed
    /// inside the next kernel (`norm_rows_to_smem` in common.cuh): bf16 GEMV-sized
    /// batches whose rows fit in shared memory twice.
    fn fused_norm_applies(&self, rows: usize, dim: usize) -> bool {
        self.dev.gemv_applies(rows)
            && rows <= FUSED_NORM_MAX_ROWS
            && dim.is_multiple_of(8)
            && rows * dim <= FUSED_NORM_MAX_VALUES
            && std::env::var("DSV2_CUDA_FUSED_NORM").map_or(true, |v| v != "0")
    }

    fn check_len(&self, op: &str, what: &str, buf: &CudaBuffer, needed: usize) -> Result<()> {
        if buf.len < needed {
            return Err(error::unsupported(
                op,
                format!("{what} holds {} values, {needed} needed", buf.len),
            ));
        }
        Ok(())
    }

    /// `out = x · wᵀ` over `rows` rows (the one GEMM wrapper the ops share).
    fn gemm_rows(
        &self,
        op: &str,
        x: u64,
        rows: usize,
        w: &CudaWeight,
        out: u64,
        out_f32: bool,
    ) -> Result<()> {
        let (n, k) = w.matrix(op)?;
        self.dev.linear(op, x, rows, w.ptr(), n, k, out, out_f32)
    }

    fn rms_norm_impl(
        &self,
        x: &CudaBuffer,
        w: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        let d = w.vector("rms_norm")?;
        self.check_len("rms_norm", "input", x, rows * d)?;
        self.check_len("rms_norm", "output", out, rows * d)?;
        let k = &self.dev.kernels;
        self.dev.launch(
            &k.rms_norm,
            "rms_norm",
            (rows, 1),
            ROW_THREADS,
            0,
            &[
                x.ptr().into(),
                w.ptr().into(),
                out.ptr().into(),
                (d as i32).into(),
                eps.into(),
            ],
        )
    }

    /// SwiGLU MLP into `out`, with its work buffers taken from `scratch`.
    fn mlp_impl(
        &self,
        scratch: &mut Scratch,
        x: &CudaBuffer,
        rows: usize,
        mlp: &Mlp<CudaWeight>,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        let (inter, d) = mlp.gate_proj.matrix("mlp gate_proj")?;
        let (d_out, _) = mlp.down_proj.matrix("mlp down_proj")?;
        self.check_len("mlp", "input", x, rows * d)?;
        self.check_len("mlp", "output", out, rows * d_out)?;
        let e = self.elem();
        let g = scratch.get(&self.dev, Slot::MlpGate, rows * inter * e)?;
        let u = scratch.get(&self.dev, Slot::MlpUp, rows * inter * e)?;
        if self.dev.gemv_applies(rows)
            && mlp_pair()
            && d.is_multiple_of(8)
            && mlp.up_proj.matrix("mlp up_proj")? == (inter, d)
        {
            // A few rows: gate and up in one GEMV launch (`DSV2_CUDA_MLP_PAIR=0`: two).
            self.dev.gemv_pair(
                "mlp gate_up",
                &device::Gemv {
                    x: x.ptr(),
                    w: mlp.gate_proj.ptr(),
                    out: g,
                    rows,
                    n: inter,
                    k: d,
                    out_f32: false,
                    ldx: d,
                    ldo: inter,
                },
                Some((mlp.up_proj.ptr(), u, inter)),
                1,
                [0; 3],
            )?;
        } else {
            self.gemm_rows("mlp gate_proj", x.ptr(), rows, &mlp.gate_proj, g, false)?;
            self.gemm_rows("mlp up_proj", x.ptr(), rows, &mlp.up_proj, u, false)?;
        }
        self.silu_mul(g, u, rows * inter)?;
        self.gemm_rows("mlp down_proj", g, rows, &mlp.down_proj, out.ptr(), false)
    }

    /// Checks a latent cache write of `layer`; returns the latent width.
    fn check_cache_write(
        &self,
        op: &str,
        kv_a: &CudaBuffer,
        kv_norm: &CudaWeight,
        step: &CudaStep,
        layer: usize,
        cache: &CudaCache,
    ) -> Result<usize> {
        let spec = cache.spec;
        let c = kv_norm.vector(op)?;
        if c != spec.kv_lora_rank || layer >= spec.num_layers {
            return Err(error::unsupported(
                op,
                format!("layer {layer}, latent {c} vs cache {spec:?}"),
            ));
        }
        attention::check_step_against_cache(op, step, &spec)?;
        self.check_len(op, "kv_a", kv_a, step.counts.tokens * spec.width())?;
        Ok(c)
    }

    fn silu_mul(&self, g: u64, u: u64, n: usize) -> Result<()> {
        let k = &self.dev.kernels;
        self.dev.launch(
            &k.silu_mul,
            "silu_mul",
            (grid_for(n), 1),
            ROW_THREADS,
            0,
            &[g.into(), u.into(), (n as u64).into()],
        )
    }

    /// Copies the step's logits rows of `x` `[T, d]` to `rows` `[R, d]`.
    fn gather_logits_rows(
        &self,
        x: &CudaBuffer,
        step: &CudaStep,
        rows: u64,
        d: usize,
    ) -> Result<()> {
        let list = step.at(step.layout.logits_rows);
        self.gather_rows(x.ptr(), list, rows, step.counts.logits_rows, d)
    }

    /// `out[i] = x[list[i]]` for `n` rows of `d` compute-dtype values.
    fn gather_rows(&self, x: u64, list: u64, out: u64, n: usize, d: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev.launch(
            &self.dev.kernels.gather_rows,
            "gather_rows",
            (n, 1),
            ROW_THREADS,
            0,
            &[x.into(), list.into(), out.into(), (d as i32).into()],
        )
    }

    /// f32 logits `[R, V]` of the step's logits rows, in scratch; returns (address, R, V).
    fn logits_device(
        &self,
        scratch: &mut Scratch,
        x: &CudaBuffer,
        step: &CudaStep,
        lm_head: &CudaWeight,
    ) -> Result<(u64, usize, usize)> {
        let (v, d) = lm_head.matrix("lm_head")?;
        let r = step.counts.logits_rows;
        self.check_len("logits", "hidden states", x, step.counts.tokens * d)?;
        let rows = scratch.get(&self.dev, Slot::LogitsRows, r * d * self.elem())?;
        let logits = scratch.get(&self.dev, Slot::Logits, r * v * 4)?;
        let k = &self.dev.kernels;
        self.gather_logits_rows(x, step, rows, d)?;
        self.dev
            .linear("lm_head", rows, r, lm_head.ptr(), v, d, logits, true)?;
        if self.dtype == ComputeDtype::Bf16 {
            // The reference's head is a bf16 GEMM, upcast afterwards.
            self.dev.launch(
                &k.round_f32,
                "round_f32",
                (grid_for(r * v), 1),
                ROW_THREADS,
                0,
                &[logits.into(), ((r * v) as u64).into()],
            )?;
        }
        Ok((logits, r, v))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // With DSV2_CUDA_PROFILE=1, the per-op timings of the whole run.
        if let Some(report) = self.profile_report() {
            eprint!("{report}");
        }
    }
}

/// Blocks for a grid-stride loop over `n` values.
fn grid_for(n: usize) -> usize {
    n.div_ceil(ROW_THREADS as usize).clamp(1, 8192)
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Buffer = CudaBuffer;
    type Cache = CudaCache;
    type Step = CudaStep;

    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{}, {} weights and activations)",
            self.dev.ordinal, self.dev.name, self.dev.arch.0, self.dev.arch.1, self.dtype
        )
    }

    fn load_weight(&self, view: &TensorView) -> BResult<CudaWeight> {
        self.dev.bind()?;
        weights::load(&self.dev, view).map_err(|e| BackendError::Weight {
            name: view.name.clone(),
            problem: e.to_string(),
        })
    }

    fn alloc(&self, len: usize) -> BResult<CudaBuffer> {
        let mem = self.dev.alloc_zeroed(len * self.elem())?;
        Ok(CudaBuffer { mem, len })
    }

    fn cache_value_bytes(&self) -> usize {
        self.elem()
    }

    fn measure_read_bandwidth(&self) -> BResult<f64> {
        Ok(self.dev.measure_read_bandwidth()?)
    }

    /// The H100/H200 SXM datasheet's dense figures: 989 TFLOP/s bf16 on the tensor
    /// cores, 67 TFLOP/s f32 (the f32 path runs pedantic f32, no TF32); `None` for other
    /// GPUs and for quantized weights (not run on CUDA).
    fn peak_matrix_rate(&self, quantized: bool) -> BResult<Option<PeakRate>> {
        let hopper = self.dev.name.contains("H100") || self.dev.name.contains("H200");
        let rate = |tflops: f64, what: &str| PeakRate {
            flops_per_s: tflops * 1e12,
            basis: format!("{what}, H100/H200 SXM datasheet"),
        };
        Ok(match (hopper && !quantized, self.dtype) {
            (true, ComputeDtype::Bf16) => Some(rate(989.0, "dense bf16")),
            (true, ComputeDtype::F32) => Some(rate(67.0, "f32")),
            _ => None,
        })
    }

    fn alloc_cache(&self, spec: CacheSpec) -> BResult<CudaCache> {
        let bytes =
            spec.num_layers * spec.num_blocks * spec.block_size * spec.width() * self.elem();
        let mem = self.dev.alloc_zeroed(bytes)?;
        Ok(CudaCache {
            mem,
            spec,
            id: step::next_id(),
        })
    }

    fn alloc_step(&self, max_tokens: usize) -> BResult<CudaStep> {
        Ok(CudaStep::new(&self.dev, max_tokens)?)
    }

    fn prepare_step(
        &self,
        batch: &Batch,
        angles: RopeAngles<'_>,
        step: &mut CudaStep,
    ) -> BResult<()> {
        self.dev.bind()?;
        if let Some(p) = &self.dev.profile {
            p.lock().unwrap_or_else(|e| e.into_inner()).tokens = batch.num_tokens();
        }
        Ok(step.prepare(&self.dev, batch, angles)?)
    }

    fn keep_logits_rows(
        &self,
        step: &mut CudaStep,
        rows: usize,
        bufs: &mut [(&mut CudaBuffer, usize)],
    ) -> BResult<usize> {
        let c = step.counts;
        let n = c.logits_rows;
        // Steps without a prompt chunk keep every row: those are the ones step graphs
        // capture, and a replay would not repeat the host-side narrowing below.
        if n == rows || rows != c.tokens || c.max_qlen_all <= 1 {
            return Ok(rows);
        }
        let identity = step.at(step.layout.logits_identity);
        let mut scratch = self.scratch();
        for (buf, width) in bufs.iter_mut() {
            let width = *width;
            self.check_len("keep_logits_rows", "a buffer", buf, rows * width)?;
            // Through scratch, not in place: a row may be read after another block wrote it.
            let front = scratch.get(&self.dev, Slot::LogitsRows, n * width * self.elem())?;
            self.gather_rows(buf.ptr(), step.at(step.layout.logits_rows), front, n, width)?;
            self.gather_rows(front, identity, buf.ptr(), n, width)?;
        }
        step.layout.logits_rows = step.layout.logits_identity;
        Ok(n)
    }

    fn decode_bucket(&self, tokens: usize) -> usize {
        let g = self.graphs_lock();
        if g.disabled || !g.buckets {
            tokens
        } else {
            decode_bucket(tokens)
        }
    }

    fn begin_step_graph(&self, step: &CudaStep, cache: &CudaCache, key: u64) -> BResult<bool> {
        let mut graphs = self.graphs_lock();
        if graphs.disabled {
            return Ok(false);
        }
        let c = &step.counts;
        // Decode steps only (every sequence one new token), on the absorbed path (the
        // expanded path sizes its launches by the context lengths).
        let path = key & 0xff;
        let decode = c.tokens > 0 && c.abs_auto_tokens == c.tokens && c.seqs == c.tokens;
        if !decode || c.tokens > MAX_GRAPH_TOKENS || path == AttentionPath::Expanded as u64 {
            return Ok(false);
        }
        let gk = GraphKey {
            caller: key,
            step_id: step.id,
            step_generation: step.generation,
            cache_id: cache.id,
            scratch_generation: self.scratch().generation,
            layout: step::Layout {
                logits_rows: 0,
                logits_identity: 0,
                words: 0,
                ..step.layout
            },
            tokens: c.tokens,
            seqs: c.seqs,
        };
        if let Some(g) = graphs.ready.get(&gk) {
            // The checks the skipped ops would make on the host: the step's slots and
            // block tables must fit the cache.
            attention::check_step_against_cache("step graph", step, &cache.spec)?;
            g.0.launch()
                .map_err(|e| error::unsupported("step graph", format!("launch: {e:?}")))?;
            return Ok(true);
        }
        if graphs.seen.contains(&gk) {
            self.dev.begin_capture()?;
            graphs.recording = Some(gk);
        } else {
            if graphs.seen.len() >= 4 * MAX_GRAPHS {
                graphs.seen.clear();
            }
            graphs.seen.insert(gk);
        }
        Ok(false)
    }

    fn end_step_graph(&self, _step: &CudaStep, ok: bool) -> BResult<()> {
        let mut graphs = self.graphs_lock();
        let Some(gk) = graphs.recording.take() else {
            return Ok(());
        };
        let captured = self.dev.end_capture();
        if !ok {
            return Ok(());
        }
        let graph = match captured {
            Ok(Some(g)) if self.scratch().generation == gk.scratch_generation => g,
            other => {
                // The recorded work never ran: nothing of this step happened.
                graphs.disabled = true;
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(None) => "empty graph".into(),
                    Ok(Some(_)) => "a work buffer moved while recording".into(),
                };
                return Err(error::unsupported(
                    "step graph",
                    format!("capture failed ({why}); graphs are now off, run the step again"),
                )
                .into());
            }
        };
        graph
            .launch()
            .map_err(|e| error::unsupported("step graph", format!("launch: {e:?}")))?;
        if graphs.ready.len() >= MAX_GRAPHS {
            graphs.ready.clear();
        }
        graphs.ready.insert(gk, StepGraph(graph));
        Ok(())
    }

    fn embed(&self, table: &CudaWeight, step: &CudaStep, out: &mut CudaBuffer) -> BResult<()> {
        let (vocab, d) = table.matrix("embed")?;
        if let Some(&bad) = step.token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(BackendError::Device {
                op: "embed",
                problem: format!("token id {bad} >= vocabulary size {vocab}"),
            });
        }
        self.check_len("embed", "output", out, step.counts.tokens * d)?;
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            &k.embed,
            "embed",
            (step.counts.tokens, 1),
            ROW_THREADS,
            0,
            &[
                table.ptr().into(),
                step.at(step.layout.token_ids).into(),
                out.ptr().into(),
                (d as i32).into(),
            ],
        )?)
    }

    fn rms_norm(
        &self,
        x: &CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        Ok(self.rms_norm_impl(x, weight, eps, rows, out)?)
    }

    fn linear(
        &self,
        x: &CudaBuffer,
        rows: usize,
        w: &CudaWeight,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        let (n, k) = w.matrix("linear")?;
        self.check_len("linear", "input", x, rows * k)?;
        self.check_len("linear", "output", out, rows * n)?;
        Ok(self.gemm_rows("linear", x.ptr(), rows, w, out.ptr(), false)?)
    }

    fn add_assign(&self, acc: &mut CudaBuffer, x: &CudaBuffer, len: usize) -> BResult<()> {
        self.check_len("add_assign", "accumulator", acc, len)?;
        self.check_len("add_assign", "input", x, len)?;
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            &k.add_assign,
            "add_assign",
            (grid_for(len), 1),
            ROW_THREADS,
            0,
            &[acc.ptr().into(), x.ptr().into(), (len as u64).into()],
        )?)
    }

    fn linear_pair(
        &self,
        x: &CudaBuffer,
        rows: usize,
        w_a: &CudaWeight,
        out_a: &mut CudaBuffer,
        w_b: &CudaWeight,
        out_b: &mut CudaBuffer,
    ) -> BResult<()> {
        let (n_a, k_a) = w_a.matrix("linear_pair")?;
        let (n_b, k_b) = w_b.matrix("linear_pair")?;
        if k_a != k_b || !self.dev.gemv_applies(rows) || !k_a.is_multiple_of(8) {
            self.linear(x, rows, w_a, out_a)?;
            return self.linear(x, rows, w_b, out_b);
        }
        self.check_len("linear_pair", "input", x, rows * k_a)?;
        self.check_len("linear_pair", "first output", out_a, rows * n_a)?;
        self.check_len("linear_pair", "second output", out_b, rows * n_b)?;
        Ok(self.dev.gemv_pair(
            "linear_pair",
            &device::Gemv {
                x: x.ptr(),
                w: w_a.ptr(),
                out: out_a.ptr(),
                rows,
                n: n_a,
                k: k_a,
                out_f32: false,
                ldx: k_a,
                ldo: n_a,
            },
            Some((w_b.ptr(), out_b.ptr(), n_b)),
            1,
            [0; 3],
        )?)
    }

    fn rope_and_write_cache(
        &self,
        q: &mut CudaBuffer,
        dims: MlaDims,
        kv_a: &CudaBuffer,
        kv_norm: &CudaWeight,
        eps: f32,
        step: &CudaStep,
        layer: usize,
        cache: &mut CudaCache,
    ) -> BResult<()> {
        let op = "rope_and_write_cache";
        let t = step.counts.tokens;
        let qd = dims.q_head_dim();
        self.check_len(op, "queries", q, t * dims.num_heads * qd)?;
        let c = self.check_cache_write(op, kv_a, kv_norm, step, layer, cache)?;
        if dims.rope_dim != cache.spec.rope_dim {
            return Err(error::unsupported(
                op,
                format!("RoPE width {} vs cache {:?}", dims.rope_dim, cache.spec),
            )
            .into());
        }
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            &k.rope_and_write_cache,
            op,
            (t, 1),
            ROW_THREADS,
            0,
            &[
                q.ptr().into(),
                kv_a.ptr().into(),
                kv_norm.ptr().into(),
                step.at(step.layout.slots).into(),
                step.at(step.layout.cos).into(),
                step.at(step.layout.sin).into(),
                attention::layer_ptr(self, cache, layer).into(),
                (dims.num_heads as i32).into(),
                (qd as i32).into(),
                (dims.nope_dim as i32).into(),
                (c as i32).into(),
                (dims.rope_dim as i32).into(),
                eps.into(),
            ],
        )?)
    }

    fn add_rms_norm(
        &self,
        acc: &mut CudaBuffer,
        x: &CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        let d = weight.vector("add_rms_norm")?;
        if d != dim {
            return Err(error::unsupported(
                "add_rms_norm",
                format!("norm weight of {d} values for rows of {dim}"),
            )
            .into());
        }
        self.check_len("add_rms_norm", "accumulator", acc, rows * d)?;
        self.check_len("add_rms_norm", "input", x, rows * d)?;
        self.check_len("add_rms_norm", "output", out, rows * d)?;
        let k = &self.dev.kernels;
        // bf16 rows of whole 16-byte chunks, at most two a thread: the vectorized kernel.
        let vec =
            self.dev.bf16 && vec_kernels() && d.is_multiple_of(8) && d <= 16 * ROW_THREADS as usize;
        Ok(self.dev.launch(
            if vec {
                &k.add_rms_norm_v
            } else {
                &k.add_rms_norm
            },
            "add_rms_norm",
            (rows, 1),
            ROW_THREADS,
            0,
            &[
                acc.ptr().into(),
                x.ptr().into(),
                weight.ptr().into(),
                out.ptr().into(),
                (d as i32).into(),
                eps.into(),
            ],
        )?)
    }

    fn add_rms_norm_linear_pair(
        &self,
        acc: &mut CudaBuffer,
        x: &CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        dim: usize,
        normed: &mut CudaBuffer,
        w_a: &CudaWeight,
        out_a: &mut CudaBuffer,
        w_b: &CudaWeight,
        out_b: &mut CudaBuffer,
    ) -> BResult<()> {
        let op = "add_rms_norm_linear_pair";
        let (n_a, k_a) = w_a.matrix(op)?;
        let (n_b, k_b) = w_b.matrix(op)?;
        let d = weight.vector(op)?;
        if !self.fused_norm_applies(rows, dim) || d != dim || k_a != dim || k_b != dim {
            self.add_rms_norm(acc, x, weight, eps, rows, dim, normed)?;
            return self.linear_pair(normed, rows, w_a, out_a, w_b, out_b);
        }
        for (what, buf, n) in [
            ("accumulator", &*acc, dim),
            ("input", x, dim),
            ("normed", &*normed, dim),
            ("first output", &*out_a, n_a),
            ("second output", &*out_b, n_b),
        ] {
            self.check_len(op, what, buf, rows * n)?;
        }
        let rpw = self.dev.gemv_rows_per_warp(n_a + n_b);
        let blocks_a = n_a.div_ceil(4 * rpw);
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            if self.dev.row1_applies(rows, rpw) {
                &k.norm_gemv_pair_r1
            } else {
                &k.norm_gemv_pair
            },
            op,
            (blocks_a + n_b.div_ceil(4 * rpw), 1),
            128,
            (2 * rows * dim * 2) as u32,
            &[
                acc.ptr().into(),
                x.ptr().into(),
                weight.ptr().into(),
                eps.into(),
                normed.ptr().into(),
                (rows as i32).into(),
                (dim as i32).into(),
                w_a.ptr().into(),
                out_a.ptr().into(),
                (n_a as i32).into(),
                w_b.ptr().into(),
                out_b.ptr().into(),
                (n_b as i32).into(),
                (blocks_a as i32).into(),
                (self.dev.sync.ptr() + device::SYNC_COUNTER).into(),
                (rpw as i32).into(),
            ],
        )?)
    }

    fn add_rms_norm_moe(
        &self,
        acc: &mut CudaBuffer,
        x: &mut CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        dim: usize,
        normed: &mut CudaBuffer,
        moe: &MoeWeights<CudaWeight>,
    ) -> BResult<()> {
        let d = weight.vector("add_rms_norm_moe")?;
        if d == dim && self.fused_norm_applies(rows, dim) {
            let mut scratch = self.scratch();
            let fused = moe::NormInput {
                acc,
                weight,
                eps,
                normed,
            };
            if moe::norm_moe(self, &mut scratch, fused, x, rows, moe)? {
                return Ok(());
            }
        }
        self.add_rms_norm(acc, x, weight, eps, rows, dim, normed)?;
        self.moe(normed, rows, moe, x)
    }

    fn rope_queries(&self, q: &mut CudaBuffer, dims: MlaDims, step: &CudaStep) -> BResult<()> {
        let t = step.counts.tokens;
        let qd = dims.q_head_dim();
        self.check_len("rope_queries", "queries", q, t * dims.num_heads * qd)?;
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            &k.rope_queries,
            "rope_queries",
            (t, 1),
            ROW_THREADS,
            0,
            &[
                q.ptr().into(),
                step.at(step.layout.cos).into(),
                step.at(step.layout.sin).into(),
                (dims.num_heads as i32).into(),
                (qd as i32).into(),
                (dims.nope_dim as i32).into(),
                (dims.rope_dim as i32).into(),
            ],
        )?)
    }

    fn mla_write_cache(
        &self,
        kv_a: &CudaBuffer,
        kv_norm: &CudaWeight,
        eps: f32,
        step: &CudaStep,
        layer: usize,
        cache: &mut CudaCache,
    ) -> BResult<()> {
        let spec = cache.spec;
        let c = self.check_cache_write("mla_write_cache", kv_a, kv_norm, step, layer, cache)?;
        let k = &self.dev.kernels;
        Ok(self.dev.launch(
            &k.mla_write_cache,
            "mla_write_cache",
            (step.counts.tokens, 1),
            ROW_THREADS,
            0,
            &[
                kv_a.ptr().into(),
                kv_norm.ptr().into(),
                step.at(step.layout.slots).into(),
                step.at(step.layout.cos).into(),
                step.at(step.layout.sin).into(),
                attention::layer_ptr(self, cache, layer).into(),
                (c as i32).into(),
                (spec.rope_dim as i32).into(),
                eps.into(),
            ],
        )?)
    }

    fn rope_cache_attention(
        &self,
        q: &mut CudaBuffer,
        dims: MlaDims,
        kv_a: &CudaBuffer,
        kv_norm: &CudaWeight,
        eps: f32,
        kv_b_proj: &CudaWeight,
        step: &CudaStep,
        layer: usize,
        cache: &mut CudaCache,
        path: AttentionPath,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        let op = "rope_cache_attention";
        let t = step.counts.tokens;
        let args = MlaAttention {
            q,
            kv_b_proj,
            cache,
            layer,
            step,
            dims,
            path,
        };
        let fused = attention::all_absorbed(&args).filter(|_| {
            attention::small_absorb_applies(self, &dims, t)
                && dims.rope_dim == cache.spec.rope_dim
                && std::env::var("DSV2_CUDA_ROPE_ABSORB").map_or(true, |v| v != "0")
        });
        let Some(tokens) = fused else {
            self.rope_and_write_cache(q, dims, kv_a, kv_norm, eps, step, layer, cache)?;
            let args = MlaAttention {
                q,
                kv_b_proj,
                cache,
                layer,
                step,
                dims,
                path,
            };
            return self.mla_attention(args, out);
        };
        attention::check_args(self, &args, out)?;
        let c = self.check_cache_write(op, kv_a, kv_norm, step, layer, cache)?;
        let (h, qd) = (dims.num_heads, dims.q_head_dim());
        let mut scratch = self.scratch();
        let q_lat = scratch.get(&self.dev, Slot::QLat, t * h * c * self.elem())?;
        let k = &self.dev.kernels;
        self.dev.launch(
            if self.dev.row1_applies(t, 2) {
                &k.rope_absorb_q_r1
            } else {
                &k.rope_absorb_q
            },
            op,
            ((c / 128) * h + t, 1),
            256,
            0,
            &[
                q.ptr().into(),
                kv_b_proj.ptr().into(),
                q_lat.into(),
                (t as i32).into(),
                (h as i32).into(),
                (qd as i32).into(),
                (dims.nope_dim as i32).into(),
                (dims.v_dim as i32).into(),
                (c as i32).into(),
                kv_a.ptr().into(),
                kv_norm.ptr().into(),
                step.at(step.layout.slots).into(),
                step.at(step.layout.cos).into(),
                step.at(step.layout.sin).into(),
                attention::layer_ptr(self, cache, layer).into(),
                (dims.rope_dim as i32).into(),
                eps.into(),
            ],
        )?;
        let args = MlaAttention {
            q,
            kv_b_proj,
            cache,
            layer,
            step,
            dims,
            path,
        };
        Ok(attention::absorbed_after_q(
            self,
            &mut scratch,
            &args,
            tokens,
            out,
        )?)
    }

    fn mla_attention(&self, args: MlaAttention<'_, Self>, out: &mut CudaBuffer) -> BResult<()> {
        let mut scratch = self.scratch();
        Ok(attention::mla_attention(self, &mut scratch, args, out)?)
    }

    fn time_decode_attention(
        &self,
        args: MlaAttention<'_, Self>,
        reps: usize,
    ) -> BResult<Option<f64>> {
        let mut scratch = self.scratch();
        Ok(attention::time_decode(self, &mut scratch, args, reps)?)
    }

    fn mlp(
        &self,
        x: &CudaBuffer,
        rows: usize,
        mlp: &Mlp<CudaWeight>,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        let mut scratch = self.scratch();
        Ok(self.mlp_impl(&mut scratch, x, rows, mlp, out)?)
    }

    fn moe(
        &self,
        x: &CudaBuffer,
        rows: usize,
        moe: &MoeWeights<CudaWeight>,
        out: &mut CudaBuffer,
    ) -> BResult<()> {
        let mut scratch = self.scratch();
        Ok(moe::moe(self, &mut scratch, x, rows, moe, out)?)
    }

    fn logits(
        &self,
        x: &CudaBuffer,
        step: &CudaStep,
        lm_head: &CudaWeight,
        out: &mut [f32],
    ) -> BResult<()> {
        let mut scratch = self.scratch();
        let (logits, r, v) = self.logits_device(&mut scratch, x, step, lm_head)?;
        if out.len() < r * v {
            return Err(error::unsupported(
                "logits",
                format!("output holds {} values, {r} x {v} needed", out.len()),
            )
            .into());
        }
        Ok(self.dev.dtoh(&mut out[..r * v], logits, "logits")?)
    }

    fn greedy_tokens(
        &self,
        x: &CudaBuffer,
        step: &CudaStep,
        lm_head: &CudaWeight,
        out: &mut [u32],
    ) -> BResult<()> {
        let mut scratch = self.scratch();
        let (v, d) = lm_head.matrix("greedy_tokens")?;
        let r = step.counts.logits_rows;
        if self.dev.gemv_applies(r) && d.is_multiple_of(8) {
            // The argmax folded into the head's GEMV: no logits are written.
            if out.len() < r {
                return Err(error::unsupported(
                    "greedy_tokens",
                    format!("output holds {} ids, {r} needed", out.len()),
                )
                .into());
            }
            self.check_len("greedy_tokens", "hidden states", x, step.counts.tokens * d)?;
            let rows = scratch.get(&self.dev, Slot::LogitsRows, r * d * self.elem())?;
            let ids = scratch.get(&self.dev, Slot::TokenIds, r * 4)?;
            self.gather_logits_rows(x, step, rows, d)?;
            self.dev.gemv_argmax(
                "lm_head",
                &device::Gemv {
                    x: rows,
                    w: lm_head.ptr(),
                    out: 0,
                    rows: r,
                    n: v,
                    k: d,
                    out_f32: true,
                    ldx: d,
                    ldo: v,
                },
                ids,
            )?;
            return Ok(self.dev.dtoh(&mut out[..r], ids, "greedy_tokens")?);
        }
        let (logits, r, v) = self.logits_device(&mut scratch, x, step, lm_head)?;
        if out.len() < r {
            return Err(error::unsupported(
                "greedy_tokens",
                format!("output holds {} ids, {r} needed", out.len()),
            )
            .into());
        }
        let ids = scratch.get(&self.dev, Slot::TokenIds, r * 4)?;
        let k = &self.dev.kernels;
        self.dev.launch(
            &k.argmax_rows,
            "argmax_rows",
            (r, 1),
            1024,
            0,
            &[logits.into(), ids.into(), (v as i32).into()],
        )?;
        Ok(self.dev.dtoh(&mut out[..r], ids, "greedy_tokens")?)
    }
}

/// The vectorized bf16 row kernels (`add_rms_norm_v`, and in MoE prefill `moe_gather_v`,
/// `moe_silu_rows`, `moe_combine_v`: 16-byte accesses, padding rows skipped);
/// `DSV2_CUDA_VEC_KERNELS=0`: the former scalar ones. Read once from the environment.
pub(crate) fn vec_kernels() -> bool {
    static VEC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VEC.get_or_init(|| std::env::var("DSV2_CUDA_VEC_KERNELS").map_or(true, |v| v != "0"))
}

/// The dense MLP's gate and up projections in one GEMV launch up to 8 rows
/// (`DSV2_CUDA_MLP_PAIR=0`: one launch each), read once from the environment.
fn mlp_pair() -> bool {
    static PAIR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAIR.get_or_init(|| std::env::var("DSV2_CUDA_MLP_PAIR").map_or(true, |v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_buckets_cover_and_round_up() {
        let mut last = 0;
        for t in 1..=MAX_GRAPH_TOKENS + 10 {
            let b = decode_bucket(t);
            assert!(b >= t && b >= last, "{t} -> {b}");
            last = b;
        }
        let sizes: std::collections::BTreeSet<usize> = (1..=256).map(decode_bucket).collect();
        let first: Vec<usize> = sizes.iter().copied().take(8).collect();
        assert_eq!(first, [1, 2, 4, 8, 16, 24, 32, 48]);
        assert_eq!(decode_bucket(256), 256);
        assert_eq!(decode_bucket(257), 320);
        assert_eq!(decode_bucket(MAX_GRAPH_TOKENS + 1), MAX_GRAPH_TOKENS + 1);
    }
}
