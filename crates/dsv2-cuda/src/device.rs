//! The GPU underneath the backend: context and stream, device memory, kernel launches
//! and cuBLAS GEMMs.
//!
//! Everything runs on one non-blocking stream in issue order, so cudarc's per-buffer event
//! tracking is switched off and kernels take raw device addresses: buffers keep fixed
//! addresses for their whole life (what CUDA graphs will need).

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as blas;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaStream,
};

use crate::compile::{self, Source};
use crate::error::{unsupported, CudaError, DriverContext, Result};

/// Library symbols the backend calls, checked at start so that an old driver or library
/// is a clear error rather than a panic inside the first call that needs one. All exist
/// in CUDA 12.0 and later.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8Async",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cuFuncSetAttribute",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
];
const BLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
    "cublasGemmBatchedEx",
];
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcDestroyProgram",
];

/// Dynamic shared memory of `mla_decode` (keep in step with attention.cu): the 16 query
/// rows and two 32-row latent tiles, each row padded to 584 bf16, plus the probabilities
/// and the per-warp maxima.
pub(crate) const MLA_DECODE_SMEM: usize = (16 + 2 * 32) * 584 * 2 + 16 * 40 * 2 + 4 * 16 * 4;

/// Most rows of the small-batch GEMV kernel (GEMV_MAX_ROWS in moe.cu).
const GEMV_MAX_ROWS: usize = 8;

/// Byte offsets in `Device::sync`: the block counter, and the argmax keys (one u64 per
/// row, at most `GEMV_MAX_ROWS`).
pub(crate) const SYNC_COUNTER: u64 = 0;
pub(crate) const SYNC_ARGMAX: u64 = 256;
const SYNC_BYTES: usize = 512;

/// cuBLAS workspace, set explicitly so that GEMMs can later be captured in CUDA graphs.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Device memory owned by the backend: a fixed address until dropped.
pub(crate) struct DevMem {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevMem {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the context records them.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: `ptr` came from cuMemAlloc and is freed once. cuMemFree waits for
        // outstanding work using it.
        self.ctx.record_err(unsafe { drv::free_sync(self.ptr) });
    }
}

/// A kernel argument: a device address, an integer or a float, passed by value (the
/// kernel reads as many low bytes of the 8-byte slot as its parameter has).
#[derive(Clone, Copy)]
pub(crate) struct KArg(u64);

impl From<u64> for KArg {
    fn from(v: u64) -> Self {
        KArg(v)
    }
}
impl From<i32> for KArg {
    fn from(v: i32) -> Self {
        KArg(v as u32 as u64)
    }
}
impl From<f32> for KArg {
    fn from(v: f32) -> Self {
        KArg(v.to_bits() as u64)
    }
}

/// A null device pointer argument (an absent list).
pub(crate) const NULL: u64 = 0;

/// The kernels of the three modules.
pub(crate) struct Kernels {
    pub embed: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_assign: CudaFunction,
    pub add_rms_norm: CudaFunction,
    pub rope_queries: CudaFunction,
    pub rope_and_write_cache: CudaFunction,
    pub mla_write_cache: CudaFunction,
    pub silu_mul: CudaFunction,
    pub gather_rows: CudaFunction,
    pub round_f32: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub mla_absorbed: CudaFunction,
    pub gather_context: CudaFunction,
    pub mla_expanded: CudaFunction,
    pub moe_route: CudaFunction,
    pub moe_plan: CudaFunction,
    pub moe_gather: CudaFunction,
    pub moe_combine: CudaFunction,
    pub mla_decode: CudaFunction,
    pub mla_decode_combine: CudaFunction,
    pub mla_prefill: CudaFunction,
    pub moe_small_up: CudaFunction,
    pub moe_small_down: CudaFunction,
    pub moe_small_down_all: CudaFunction,
    pub moe_small_combine: CudaFunction,
    pub gemv_small: CudaFunction,
    pub absorb_q_small: CudaFunction,
    pub moe_route_small: CudaFunction,
    pub moe_tile_up: CudaFunction,
    pub moe_tile_down: CudaFunction,
    pub norm_gemv_pair: CudaFunction,
    pub moe_norm_route: CudaFunction,
    pub argmax_finish: CudaFunction,
    pub rope_absorb_q: CudaFunction,
    pub gemv_small_r1: CudaFunction,
    pub norm_gemv_pair_r1: CudaFunction,
    pub rope_absorb_q_r1: CudaFunction,
    pub moe_norm_route_r1: CudaFunction,
    pub moe_combine_v: CudaFunction,
    pub moe_silu_rows: CudaFunction,
    pub moe_gather_v: CudaFunction,
    pub add_rms_norm_v: CudaFunction,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, arch: (i32, i32), bf16: bool) -> Result<Kernels> {
        let module = |s: &Source| compile::load_module(ctx, s, arch, bf16);
        let (ew, at, moe) = (
            module(&compile::ELEMENTWISE)?,
            module(&compile::ATTENTION)?,
            module(&compile::MOE)?,
        );
        let f = |m: &Arc<cudarc::driver::CudaModule>, name: &str| {
            m.load_function(name)
                .ctx(format!("loading kernel `{name}`"))
        };
        Ok(Kernels {
            embed: f(&ew, "embed")?,
            rms_norm: f(&ew, "rms_norm")?,
            add_assign: f(&ew, "add_assign")?,
            add_rms_norm: f(&ew, "add_rms_norm")?,
            rope_queries: f(&ew, "rope_queries")?,
            rope_and_write_cache: f(&ew, "rope_and_write_cache")?,
            mla_write_cache: f(&ew, "mla_write_cache")?,
            silu_mul: f(&ew, "silu_mul")?,
            gather_rows: f(&ew, "gather_rows")?,
            round_f32: f(&ew, "round_f32")?,
            argmax_rows: f(&ew, "argmax_rows")?,
            mla_absorbed: f(&at, "mla_absorbed")?,
            gather_context: f(&at, "gather_context")?,
            mla_expanded: f(&at, "mla_expanded")?,
            moe_route: f(&moe, "moe_route")?,
            moe_plan: f(&moe, "moe_plan")?,
            moe_gather: f(&moe, "moe_gather")?,
            moe_combine: f(&moe, "moe_combine")?,
            mla_decode: f(&at, "mla_decode")?,
            mla_decode_combine: f(&at, "mla_decode_combine")?,
            mla_prefill: f(&at, "mla_prefill")?,
            moe_small_up: f(&moe, "moe_small_up")?,
            moe_small_down: f(&moe, "moe_small_down")?,
            moe_small_down_all: f(&moe, "moe_small_down_all")?,
            moe_small_combine: f(&moe, "moe_small_combine")?,
            gemv_small: f(&moe, "gemv_small")?,
            absorb_q_small: f(&moe, "absorb_q_small")?,
            moe_route_small: f(&moe, "moe_route_small")?,
            moe_tile_up: f(&moe, "moe_tile_up")?,
            moe_tile_down: f(&moe, "moe_tile_down")?,
            norm_gemv_pair: f(&moe, "norm_gemv_pair")?,
            moe_norm_route: f(&moe, "moe_norm_route")?,
            argmax_finish: f(&moe, "argmax_finish")?,
            rope_absorb_q: f(&moe, "rope_absorb_q")?,
            gemv_small_r1: f(&moe, "gemv_small_r1")?,
            norm_gemv_pair_r1: f(&moe, "norm_gemv_pair_r1")?,
            rope_absorb_q_r1: f(&moe, "rope_absorb_q_r1")?,
            moe_norm_route_r1: f(&moe, "moe_norm_route_r1")?,
            moe_combine_v: f(&moe, "moe_combine_v")?,
            moe_silu_rows: f(&moe, "moe_silu_rows")?,
            moe_gather_v: f(&moe, "moe_gather_v")?,
            add_rms_norm_v: f(&ew, "add_rms_norm_v")?,
        })
    }
}

/// One GPU: its context, the stream every op runs on, cuBLAS and the kernels.
pub(crate) struct Device {
    // Field order is drop order: cuBLAS and memory before the stream and context.
    blas: CudaBlas,
    _blas_workspace: DevMem,
    /// Zeroed words the fused kernels synchronize through: the arrival counter of
    /// `last_block` (common.cuh; each launch leaves it at zero) at [`SYNC_COUNTER`], the
    /// greedy keys of `gemv_small` (reset by `argmax_finish`) at [`SYNC_ARGMAX`].
    pub sync: DevMem,
    pub kernels: Kernels,
    pub stream: Arc<CudaStream>,
    pub ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    pub arch: (i32, i32),
    /// bf16 elements (else f32).
    pub bf16: bool,
    /// Per-op timing with events (`DSV2_CUDA_PROFILE=1`): for finding where a step's
    /// time goes, never on by default (it adds two event records around every op).
    pub profile: Option<Mutex<Profile>>,
    /// Most rows `linear` runs through `gemv_small` (bf16; `DSV2_CUDA_GEMV_MAX`, at most
    /// 8, 0 for cuBLAS always).
    gemv_max_rows: usize,
    /// Launch with programmatic dependent launch (sm_90; `DSV2_CUDA_PDL=0` turns it off).
    pdl: bool,
    /// Forced weight rows per warp of the GEMV kernels (`DSV2_CUDA_GEMV_RPW`).
    gemv_rpw: Option<usize>,
    /// The batch-1 instances of the small-batch kernels (`gemv_small_r1`,
    /// `norm_gemv_pair_r1`, `rope_absorb_q_r1`, `moe_norm_route_r1`) for one-row launches;
    /// `DSV2_CUDA_ROW1=0`: the 8-row kernels at every row count.
    row1: bool,
}

/// Event timings of every op, grouped by the step's token count and the op's name.
#[derive(Default)]
pub(crate) struct Profile {
    /// Token count of the current step (set by `prepare_step`).
    pub tokens: usize,
    pending: Vec<(usize, String, CudaEvent, CudaEvent)>,
    /// (tokens, op) -> (launches, milliseconds).
    totals: BTreeMap<(usize, String), (usize, f64)>,
}

impl Profile {
    /// Folds the recorded events into the totals (waits for them).
    fn collect(&mut self) {
        for (tokens, name, start, end) in self.pending.drain(..) {
            let ms = start.elapsed_ms(&end).unwrap_or(0.0) as f64;
            let e = self.totals.entry((tokens, name)).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms;
        }
    }

    /// The table of totals, per token count, the costliest ops first.
    pub fn report(&mut self) -> String {
        self.collect();
        let mut by_tokens: BTreeMap<usize, Vec<(&String, usize, f64)>> = BTreeMap::new();
        for ((tokens, name), (n, ms)) in &self.totals {
            by_tokens.entry(*tokens).or_default().push((name, *n, *ms));
        }
        let mut out = String::new();
        for (tokens, mut ops) in by_tokens {
            ops.sort_by(|a, b| b.2.total_cmp(&a.2));
            let total: f64 = ops.iter().map(|o| o.2).sum();
            out += &format!("profile: steps of {tokens} tokens: {total:.3} ms in ops\n");
            for (name, n, ms) in ops {
                out += &format!(
                    "  {name:<28} {n:>7} launches {ms:>10.3} ms {:>9.1} us each\n",
                    1e3 * ms / n as f64
                );
            }
        }
        out
    }
}

/// The symbols of `symbols` that the loaded library `$lib` does not export.
macro_rules! missing_symbols {
    ($lib:expr, $symbols:expr) => {{
        let lib = $lib;
        $symbols
            .iter()
            .copied()
            // SAFETY: only looks the symbol up; nothing is called.
            .filter(|s| unsafe { lib.get::<unsafe extern "C" fn()>(*s) }.is_err())
            .collect::<Vec<&str>>()
    }};
}

/// An error for a library that is absent, or lacks some of the symbols we call.
fn check_library(
    what: &str,
    present: bool,
    missing: impl FnOnce() -> Vec<&'static str>,
) -> Result<()> {
    if !present {
        return Err(CudaError::Unavailable(format!(
            "the {what} library could not be loaded (is the NVIDIA driver / CUDA toolkit \
             installed, and its lib64 folder on LD_LIBRARY_PATH?)"
        )));
    }
    let missing = missing();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CudaError::Unavailable(format!(
            "the {what} library is too old: it lacks {} (CUDA 12.0 or newer is needed)",
            missing.join(", ")
        )))
    }
}

impl Device {
    /// Opens GPU `ordinal`, checks the libraries and compiles (or loads) the kernels.
    pub fn new(ordinal: usize, bf16: bool) -> Result<Device> {
        // The dynamic loader panics when a library or symbol is missing: turn any such
        // panic into an error (the checks below should already have caught it).
        match std::panic::catch_unwind(|| Device::open(ordinal, bf16)) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown failure".into());
                Err(CudaError::Unavailable(msg))
            }
        }
    }

    fn open(ordinal: usize, bf16: bool) -> Result<Device> {
        // SAFETY: these only try to load the libraries.
        let (has_driver, has_blas, has_nvrtc) = unsafe {
            (
                drv_sys::is_culib_present(),
                blas::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        };
        if !has_driver {
            return Err(CudaError::Unavailable(
                "no NVIDIA driver on this machine (libcuda.so could not be loaded); \
                 use --device cpu"
                    .into(),
            ));
        }
        // SAFETY (the three culib calls): each library was found above, and culib only
        // loads it (it panics only when absent).
        check_library("CUDA driver", true, || {
            missing_symbols!(unsafe { drv_sys::culib() }, DRIVER_SYMBOLS)
        })?;
        check_library("cuBLAS", has_blas, || {
            missing_symbols!(unsafe { blas::culib() }, BLAS_SYMBOLS)
        })?;
        check_library("NVRTC", has_nvrtc, || {
            missing_symbols!(unsafe { cudarc::nvrtc::sys::culib() }, NVRTC_SYMBOLS)
        })?;
        drv::init().map_err(|e| {
            CudaError::Unavailable(format!("cuInit failed ({:?}): no usable CUDA device", e.0))
        })?;
        let count = CudaContext::device_count().ctx("counting CUDA devices")? as usize;
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device cuda:{ordinal} does not exist ({count} CUDA device(s) visible)"
            )));
        }
        let ctx = CudaContext::new(ordinal).ctx(format!("creating a context on cuda:{ordinal}"))?;
        // SAFETY: the backend issues all work on one stream in order, and buffers are
        // only freed through DevMem (cuMemFree waits for work using them), so cudarc's
        // cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ctx("creating a stream")?;
        let arch = ctx
            .compute_capability()
            .ctx("reading the compute capability")?;
        if arch.0 < 7 {
            return Err(CudaError::Unavailable(format!(
                "cuda:{ordinal} has compute capability {}.{}; 7.0 or newer is needed",
                arch.0, arch.1
            )));
        }
        let name = ctx.name().ctx("reading the device name")?;
        let blas = CudaBlas::new(stream.clone()).ctx("creating a cuBLAS handle")?;
        let workspace = alloc(&ctx, BLAS_WORKSPACE_BYTES)?;
        // SAFETY: the workspace outlives the handle (field order) and is used by it only.
        unsafe {
            blas::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                workspace.bytes(),
            )
        }
        .result()
        .ctx("cublasSetWorkspace")?;
        let kernels = Kernels::load(&ctx, arch, bf16)?;
        let sync = alloc(&ctx, SYNC_BYTES)?;
        // SAFETY: the range lies in `sync`; the stream orders it before every kernel.
        unsafe { drv::memset_d8_async(sync.ptr(), 0, sync.bytes(), stream.cu_stream()) }
            .ctx("clearing the sync words")?;
        // The decode attention kernel holds its latent tiles in more shared memory than a
        // block gets by default.
        kernels
            .mla_decode
            .set_attribute(
                drv_sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MLA_DECODE_SMEM as i32,
            )
            .ctx("raising the shared memory of mla_decode")?;
        let profile = std::env::var("DSV2_CUDA_PROFILE")
            .is_ok_and(|v| v == "1")
            .then(|| Mutex::new(Profile::default()));
        Ok(Device {
            blas,
            _blas_workspace: workspace,
            sync,
            kernels,
            stream,
            ctx,
            ordinal,
            name,
            arch,
            bf16,
            profile,
            pdl: arch.0 >= 9 && std::env::var("DSV2_CUDA_PDL").map_or(true, |v| v != "0"),
            gemv_rpw: std::env::var("DSV2_CUDA_GEMV_RPW")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|r| [1, 2].contains(r)),
            row1: std::env::var("DSV2_CUDA_ROW1").map_or(true, |v| v != "0"),
            gemv_max_rows: std::env::var("DSV2_CUDA_GEMV_MAX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(GEMV_MAX_ROWS)
                .min(GEMV_MAX_ROWS),
        })
    }

    /// Bytes per element of activations, matrices and the cache.
    pub fn elem_bytes(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// Makes the context current on the calling thread (the backend may be used from a
    /// thread other than the one that created it).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().ctx("binding the CUDA context")
    }

    /// Allocates `bytes` of device memory (uninitialized).
    pub fn alloc(&self, bytes: usize) -> Result<DevMem> {
        alloc(&self.ctx, bytes)
    }

    /// Allocates `bytes` of device memory set to zero.
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DevMem> {
        let mem = self.alloc(bytes)?;
        // SAFETY: the range lies in `mem`.
        unsafe { drv::memset_d8_async(mem.ptr(), 0, mem.bytes(), self.stream.cu_stream()) }
            .ctx(format!("clearing {bytes} bytes"))?;
        Ok(mem)
    }

    /// Copies `src` to device address `dst` (which must hold `size_of_val(src)` bytes).
    pub fn htod<T: Copy>(&self, dst: u64, src: &[T], op: &str) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass a destination with room for `src`; pageable sources are
        // staged by the driver before the call returns, so `src` may be reused at once.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .ctx(format!("{op}: copy to the device"))
    }

    /// Copies from device address `src` into `dst` and waits for the stream.
    pub fn dtoh<T: Copy>(&self, dst: &mut [T], src: u64, op: &str) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass a source holding `size_of_val(dst)` bytes.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .ctx(format!("{op}: copy to the host"))?;
        self.sync(op)
    }

    /// Starts recording the work issued on the stream (by this thread) into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        self.stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .ctx("starting a graph capture")
    }

    /// Ends the recording begun by `begin_capture` and instantiates it.
    pub fn end_capture(&self) -> Result<Option<cudarc::driver::CudaGraph>> {
        self.stream
            .end_capture(drv_sys::CUgraphInstantiate_flags(0))
            .ctx("ending a graph capture")
    }

    /// Waits for all work issued so far; reports asynchronous kernel failures.
    pub fn sync(&self, op: &str) -> Result<()> {
        self.stream
            .synchronize()
            .ctx(format!("{op}: waiting for the GPU"))
    }

    /// Device-memory read bandwidth in bytes per second: the best of several timed
    /// device-to-device copies of a 1 GiB buffer (each copy reads and writes it, so the
    /// bytes read per second are counted, as a decode step reads weights).
    pub fn measure_read_bandwidth(&self) -> Result<f64> {
        self.bind()?;
        let bytes = 1usize << 30;
        let (src, dst) = (self.alloc_zeroed(bytes)?, self.alloc(bytes)?);
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            self.sync("bandwidth probe")?;
            let started = std::time::Instant::now();
            // SAFETY: both ranges lie in buffers of `bytes` bytes.
            unsafe { drv::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream.cu_stream()) }
                .ctx("bandwidth probe: device copy")?;
            self.sync("bandwidth probe")?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        // A copy moves each byte twice (read + write) at the same memory bandwidth.
        Ok(2.0 * bytes as f64 / best)
    }

    /// Seconds the work `f` issues takes on the stream, measured with two events (waits
    /// for it).
    pub fn time(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.bind()?;
        let flags = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).ctx("creating an event")?;
        let end = self.ctx.new_event(flags).ctx("creating an event")?;
        start.record(&self.stream).ctx("recording an event")?;
        f()?;
        end.record(&self.stream).ctx("recording an event")?;
        let ms = start.elapsed_ms(&end).ctx("timing with events")?;
        Ok(ms as f64 / 1e3)
    }

    /// Free and total device memory, in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().ctx("cuMemGetInfo")
    }

    /// Starts timing an op (profiling only).
    fn prof_start(&self) -> Option<CudaEvent> {
        self.profile.as_ref()?;
        let ev = self
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()?;
        ev.record(&self.stream).ok()?;
        Some(ev)
    }

    /// Ends timing an op started by `prof_start`.
    fn prof_end(&self, start: Option<CudaEvent>, name: &str) {
        let (Some(start), Some(p)) = (start, self.profile.as_ref()) else {
            return;
        };
        let Ok(end) = self
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
        else {
            return;
        };
        if end.record(&self.stream).is_ok() {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            let tokens = p.tokens;
            p.pending.push((tokens, name.to_string(), start, end));
            if p.pending.len() > 4096 {
                p.collect();
            }
        }
    }

    /// Launches `f` on the stream. A grid with a zero dimension launches nothing.
    pub fn launch(
        &self,
        f: &CudaFunction,
        name: &str,
        grid: (usize, usize),
        block: u32,
        smem: u32,
        args: &[KArg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        if grid.0 > u32::MAX as usize || grid.1 > 65_535 {
            return Err(unsupported(
                name,
                format!("grid {grid:?} exceeds the device's limits"),
            ));
        }
        let mut slots: Vec<u64> = args.iter().map(|a| a.0).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let prof = self.prof_start();
        if self.pdl {
            // Programmatic dependent launch: the kernel may start while the previous one
            // drains; every kernel begins with `pdl_prologue` (common.cuh), which waits for
            // its predecessor's completion before touching memory.
            // SAFETY: a zeroed attribute value is valid; only the serialization flag is set.
            let mut value: drv_sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
            value.programmaticStreamSerializationAllowed = 1;
            let mut attr = drv_sys::CUlaunchAttribute {
                id: drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value,
            };
            let config = drv_sys::CUlaunchConfig {
                gridDimX: grid.0 as u32,
                gridDimY: grid.1 as u32,
                gridDimZ: 1,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as for cuLaunchKernel below; `config` and `attr` outlive the call.
            unsafe {
                drv_sys::cuLaunchKernelEx(
                    &config,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .ctx(format!("launching kernel `{name}`"))?;
        } else {
            // SAFETY: every parameter points to an 8-byte slot holding the value of the
            // kernel's parameter in its low bytes (little-endian); the slots outlive the
            // call, which copies them. Device addresses passed in are live allocations
            // sized by the callers for the kernel's documented shapes.
            unsafe {
                drv::launch_kernel(
                    f.cu_function(),
                    (grid.0 as u32, grid.1 as u32, 1),
                    (block, 1, 1),
                    smem,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .ctx(format!("launching kernel `{name}`"))?;
        }
        self.prof_end(prof, name);
        Ok(())
    }

    fn dtype(&self) -> blas::cudaDataType {
        if self.bf16 {
            blas::cudaDataType::CUDA_R_16BF
        } else {
            blas::cudaDataType::CUDA_R_32F
        }
    }

    fn compute(&self) -> blas::cublasComputeType_t {
        if self.bf16 {
            // bf16 products are exact in f32; accumulation in f32.
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F
        } else {
            // No TF32 or other reduced-precision shortcuts for the f32 path.
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        }
    }

    /// `out[rows, n] = x[rows, k] · wᵀ` for `w` `[n, k]`, all row-major in the element
    /// type; `out_f32` writes f32 output instead.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        op: &str,
        x: u64,
        rows: usize,
        w: u64,
        n: usize,
        k: usize,
        out: u64,
        out_f32: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if self.gemv_applies(rows) && k.is_multiple_of(8) {
            // A few rows: one pass over the weights with 16-byte loads beats cuBLAS.
            return self.gemv(
                op,
                &Gemv {
                    x,
                    w,
                    out,
                    rows,
                    n,
                    k,
                    out_f32,
                    ldx: k,
                    ldo: n,
                },
                1,
                [0; 3],
            );
        }
        let g = Gemm {
            trans_a: true,
            trans_b: false,
            m: n,
            n: rows,
            k,
            a: w,
            lda: k,
            b: x,
            ldb: k,
            c: out,
            ldc: n,
        };
        self.gemm(op, &g, out_f32)
    }

    fn gemm(&self, op: &str, g: &Gemm, out_f32: bool) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dt = self.dtype();
        let ct = if out_f32 {
            blas::cudaDataType::CUDA_R_32F
        } else {
            dt
        };
        let dims = g.dims(op)?;
        let prof = self.prof_start();
        // SAFETY: the pointers are live device allocations holding the matrices the
        // leading dimensions describe (callers size them); alpha/beta are host f32, as
        // the f32 compute type requires.
        unsafe {
            blas::cublasGemmEx(
                *self.blas.handle(),
                op_of(g.trans_a),
                op_of(g.trans_b),
                dims[0],
                dims[1],
                dims[2],
                &alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                dt,
                dims[3],
                g.b as *const c_void,
                dt,
                dims[4],
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ct,
                dims[5],
                self.compute(),
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .ctx(format!("{op}: GEMM m={} n={} k={}", g.m, g.n, g.k))?;
        self.prof_end(prof, op);
        Ok(())
    }

    /// True when `gemv` takes `rows` rows (bf16 and at most `DSV2_CUDA_GEMV_MAX`).
    pub fn gemv_applies(&self, rows: usize) -> bool {
        self.bf16 && rows <= self.gemv_max_rows
    }

    /// `batch` small-batch products `out[t, n] = x[t, :] · w[n, :]` through `gemv_small`,
    /// member `i` offset by `i * strides` elements (x, w, out). Callers check
    /// `gemv_applies` and `k % 8 == 0`.
    pub fn gemv(&self, op: &str, g: &Gemv, batch: usize, strides: [usize; 3]) -> Result<()> {
        self.gemv_pair(op, g, None, batch, strides)
    }

    /// Greedy sampling fused into a one-member `gemv`: the argmax keys of the (bf16-rounded)
    /// outputs of each row go to the sync words, and `argmax_finish` writes the ids.
    pub fn gemv_argmax(&self, op: &str, g: &Gemv, ids: u64) -> Result<()> {
        if g.rows > GEMV_MAX_ROWS {
            return Err(unsupported(
                op,
                format!("{} rows for the fused argmax", g.rows),
            ));
        }
        let best = self.sync.ptr() + SYNC_ARGMAX;
        self.gemv_launch(op, g, None, 1, [0; 3], best)?;
        self.launch(
            &self.kernels.argmax_finish,
            "argmax_finish",
            (1, 1),
            32,
            0,
            &[best.into(), ids.into(), (g.rows as i32).into()],
        )
    }

    /// `gemv`, plus (batch 1) a second product `(w, out, n)` of the same input in the
    /// same launch.
    pub fn gemv_pair(
        &self,
        op: &str,
        g: &Gemv,
        second: Option<(u64, u64, usize)>,
        batch: usize,
        strides: [usize; 3],
    ) -> Result<()> {
        self.gemv_launch(op, g, second, batch, strides, NULL)
    }

    fn gemv_launch(
        &self,
        op: &str,
        g: &Gemv,
        second: Option<(u64, u64, usize)>,
        batch: usize,
        strides: [usize; 3],
        best: u64,
    ) -> Result<()> {
        let i32_of = |v: usize| -> Result<KArg> {
            i32::try_from(v)
                .map(KArg::from)
                .map_err(|_| unsupported(op, format!("GEMV dimension {v} over 32 bits")))
        };
        let (w2, out2, n2) = second.unwrap_or((0, 0, 0));
        let rpw = self.gemv_rows_per_warp((g.n + n2) * batch);
        let blocks_a = g.n.div_ceil(4 * rpw);
        self.launch(
            if self.row1_applies(g.rows, rpw) {
                &self.kernels.gemv_small_r1
            } else {
                &self.kernels.gemv_small
            },
            op,
            (blocks_a + n2.div_ceil(4 * rpw), batch),
            128,
            0,
            &[
                g.x.into(),
                g.w.into(),
                g.out.into(),
                i32_of(g.rows)?,
                i32_of(g.n)?,
                i32_of(g.k)?,
                (g.out_f32 as i32).into(),
                i32_of(g.ldx)?,
                i32_of(g.ldo)?,
                (strides[0] as u64).into(),
                (strides[1] as u64).into(),
                (strides[2] as u64).into(),
                w2.into(),
                out2.into(),
                i32_of(n2)?,
                i32_of(blocks_a)?,
                best.into(),
                (rpw as i32).into(),
            ],
        )
    }

    /// Weight rows per warp of the GEMV kernels: two (one, with twice the warps, measured
    /// slower in captured V2-Lite decode steps on the H200: 3.04 against 2.84 ms at batch
    /// 1); `DSV2_CUDA_GEMV_RPW=1` forces one.
    pub fn gemv_rows_per_warp(&self, _n: usize) -> usize {
        self.gemv_rpw.unwrap_or(2)
    }

    /// True when a launch of `rows` rows takes the batch-1 instance of its kernel (one
    /// row; two weight rows a warp for the GEMV ones, `rpw`: pass 2 for the others).
    pub fn row1_applies(&self, rows: usize, rpw: usize) -> bool {
        self.row1 && rows == 1 && rpw == 2
    }

    /// `batch` GEMMs whose operands sit `stride_*` elements apart.
    pub fn gemm_strided(
        &self,
        op: &str,
        g: &Gemm,
        strides: [usize; 3],
        batch: usize,
    ) -> Result<()> {
        if batch == 0 || g.n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dt = self.dtype();
        let dims = g.dims(op)?;
        let prof = self.prof_start();
        // SAFETY: as in `gemm`; the strided operands stay inside their allocations.
        unsafe {
            blas::cublasGemmStridedBatchedEx(
                *self.blas.handle(),
                op_of(g.trans_a),
                op_of(g.trans_b),
                dims[0],
                dims[1],
                dims[2],
                &alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                dt,
                dims[3],
                strides[0] as i64,
                g.b as *const c_void,
                dt,
                dims[4],
                strides[1] as i64,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                dt,
                dims[5],
                strides[2] as i64,
                batch as i32,
                self.compute(),
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .ctx(format!(
            "{op}: batched GEMM m={} n={} k={} batch={batch}",
            g.m, g.n, g.k
        ))?;
        self.prof_end(prof, op);
        Ok(())
    }

    /// `batch` GEMMs `C[i] = op(A[i]) · op(B[i])` with the operands' addresses in the
    /// device arrays `a`, `b`, `c` (`batch` addresses each); `g.a/b/c` are ignored.
    pub fn gemm_pointers(
        &self,
        op: &str,
        g: &Gemm,
        a: u64,
        b: u64,
        c: u64,
        batch: usize,
    ) -> Result<()> {
        if batch == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dt = self.dtype();
        let dims = g.dims(op)?;
        let prof = self.prof_start();
        // SAFETY: `a`, `b`, `c` are device arrays of `batch` live device addresses, each
        // holding a matrix the leading dimensions describe (written by moe_plan).
        unsafe {
            blas::cublasGemmBatchedEx(
                *self.blas.handle(),
                op_of(g.trans_a),
                op_of(g.trans_b),
                dims[0],
                dims[1],
                dims[2],
                &alpha as *const f32 as *const c_void,
                a as *const *const c_void,
                dt,
                dims[3],
                b as *const *const c_void,
                dt,
                dims[4],
                &beta as *const f32 as *const c_void,
                c as *const *mut c_void,
                dt,
                dims[5],
                batch as i32,
                self.compute(),
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .ctx(format!(
            "{op}: pointer-batched GEMM m={} n={} k={} batch={batch}",
            g.m, g.n, g.k
        ))?;
        self.prof_end(prof, op);
        Ok(())
    }
}

fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DevMem> {
    ctx.bind_to_thread().ctx("binding the CUDA context")?;
    // cuMemAlloc rejects zero bytes; a minimal allocation keeps every buffer addressable.
    let size = bytes.max(256);
    // SAFETY: a plain device allocation, freed by DevMem's drop.
    let ptr = unsafe { drv::malloc_sync(size) }.map_err(|e| CudaError::Driver {
        op: format!(
            "allocating {:.1} MiB of device memory",
            size as f64 / (1 << 20) as f64
        ),
        code: format!("{:?}", e.0),
    })?;
    Ok(DevMem {
        ptr,
        bytes: size,
        ctx: ctx.clone(),
    })
}

fn op_of(trans: bool) -> blas::cublasOperation_t {
    if trans {
        blas::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N
    }
}

/// A small-batch product for `Device::gemv` (row-major; element strides).
pub(crate) struct Gemv {
    pub x: u64,
    pub w: u64,
    pub out: u64,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub out_f32: bool,
    pub ldx: usize,
    pub ldo: usize,
}

/// A column-major cuBLAS GEMM `C[m, n] = op(A) · op(B)` (dimensions as cuBLAS sees them).
pub(crate) struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
}

impl Gemm {
    /// m, n, k, lda, ldb, ldc as cuBLAS ints.
    fn dims(&self, op: &str) -> Result<[i32; 6]> {
        let v = [self.m, self.n, self.k, self.lda, self.ldb, self.ldc];
        let mut out = [0i32; 6];
        for (o, &x) in out.iter_mut().zip(&v) {
            *o = i32::try_from(x).map_err(|_| {
                unsupported(
                    op,
                    format!("GEMM dimension {x} does not fit cuBLAS's 32-bit ints"),
                )
            })?;
        }
        Ok(out)
    }
}
