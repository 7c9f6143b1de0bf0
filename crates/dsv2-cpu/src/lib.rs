//! The CPU backend: the reference implementation every other backend is checked against.
//!
//! [`CpuBackend`] implements [`dsv2_backend::Backend`] with f32 activations, weights read
//! in their checkpoint dtype straight from the memory map ([`CpuWeight`]), GEMMs through
//! the `gemm` crate and both cores through a spinning thread team ([`team`]). Created with
//! [`ComputeDtype::Bf16`], it rounds each op's output to bf16 where the bf16 reference
//! rounds.
//!
//! ```no_run
//! use dsv2_backend::ComputeDtype;
//! let backend = dsv2_cpu::CpuBackend::new(ComputeDtype::F32);
//! ```

mod amx;
mod attention;
pub mod bf16dot;

/// Whether this CPU runs the bf16-arithmetic kernels: AVX-512 F, BW and BF16 present and
/// not turned off by `DSV2_BF16_ATTENTION=0`. The prefill attention over a bf16 latent
/// cache (`prefill_bf16`) then runs in bf16; the decode attention over it (`flash_bf16`)
/// and the prompt rows of q8 products (`q8_bf16`) do where the CPU's `vdpbf16ps` also keeps
/// pace with its int8 and f32 instructions ([`dsv2_core::isa::bf16_dot_keeps_pace`]).
/// Logits then differ slightly from a CPU without them, as with any bf16 kernel.
pub fn bf16_arithmetic() -> bool {
    flash_bf16::available()
}

/// Whether the prompt rows of a q8 model's products take bf16 activations on this CPU
/// ([`CpuBackend::bf16_prompt_rows`] with the activation terms unset): [`bf16_arithmetic`]
/// on a CPU whose `vdpbf16ps` keeps pace with its `vpdpbusd`
/// ([`dsv2_core::isa::bf16_dot_keeps_pace`]), or on one with AMX tiles
/// ([`q8_prompt_rows_on_amx_tiles`]), where they beat two int8 terms.
pub fn q8_prompt_rows_in_bf16() -> bool {
    q8_bf16::preferred()
}

/// Whether those bf16 prompt rows run on the CPU's AMX tiles (`amx.rs`: Intel's Sapphire
/// Rapids and later, where the OS grants the tile state; `DSV2_AMX=0` turns them off).
pub fn q8_prompt_rows_on_amx_tiles() -> bool {
    amx::available()
}

/// The shortest of `reps` timed runs of `f` after one untimed, in seconds (the kernels'
/// ignored timing tests).
#[cfg(test)]
pub(crate) fn min_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Deterministic test values in [-1, 1) (xorshift64), shared by the kernel tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Bit patterns of `v`, for tests that compare kernel paths bit for bit.
#[cfg(test)]
pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}
pub mod bandwidth;
mod exp;
mod flash;
mod flash_bf16;
mod flash_tiles;
pub mod kernels;
pub mod matmul;
mod mla;
mod moe;
pub mod peak;
mod prefill_bf16;
mod q8_bf16;
mod q8_f32;
pub mod qmatmul;
mod scratch;
mod softmax;
pub mod team;

use dsv2_backend::{
    Backend, BackendError, Batch, CacheSpec, ComputeDtype, MlaAttention, MlaDims, Mlp, MoeWeights,
    PeakRate, Result, RopeAngles,
};
use dsv2_core::{DType, QuantizedTensor, TensorView};
use half::{bf16, f16};

use kernels::{round_bf16, round_bf16_slice, Elem};
use qmatmul::PromptRows;

/// Logits per task of the greedy tokens' argmax: 13 tasks for a row of V2's 102,400.
const ARGMAX_SPAN: usize = 8192;

/// A weight on the CPU: a view of the checkpoint bytes, never a converted copy.
pub struct CpuWeight {
    view: TensorView,
    /// The quantized planes, for a q8/q4 weight (then `view` is its `qweight` plane).
    quant: Option<QuantizedTensor>,
    rows: usize,
    cols: usize,
    /// 1-D weights (norms) widened to f32 once at load: they are tiny and read per row.
    vector: Option<Vec<f32>>,
}

/// The stored elements of a weight, by dtype.
pub(crate) enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// Calls a generic body with the weight's typed elements.
macro_rules! with_elems {
    ($w:expr, |$s:ident| $body:expr) => {
        match $w.data() {
            $crate::WeightData::F32($s) => $body,
            $crate::WeightData::F16($s) => $body,
            $crate::WeightData::Bf16($s) => $body,
        }
    };
}
pub(crate) use with_elems;

impl CpuWeight {
    pub(crate) fn data(&self) -> WeightData<'_> {
        match self.view.dtype {
            DType::F32 => WeightData::F32(self.view.as_f32()),
            DType::F16 => WeightData::F16(self.view.as_f16()),
            DType::BF16 => WeightData::Bf16(self.view.as_bf16()),
            _ => unreachable!("embeddings and kv_b_proj are never quantized"),
        }
    }

    /// Rows of the `[rows, cols]` matrix (1 for a vector).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix (length of a vector).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Copies row `r` out as f32.
    pub(crate) fn row_to(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        with_elems!(self, |s| out
            .iter_mut()
            .zip(&s[r * c..(r + 1) * c])
            .for_each(|(o, v)| *o = v.to_f32()))
    }

    /// The quantized planes as a product's operand, when this weight is quantized, read
    /// with the activation terms the backend takes for its format
    /// ([`CpuBackend::activation_terms`]).
    pub(crate) fn qmatrix(&self, be: &CpuBackend) -> Option<qmatmul::QMatrix<'_>> {
        self.quant
            .as_ref()
            .map(|q| qmatmul::QMatrix::of(q, be.activation_terms(q.format)))
    }

    /// `y[m, rows] = x[m, cols] · selfᵀ`. A bf16 weight under bf16 compute runs on
    /// `vdpbf16ps` where the CPU has AVX-512 BF16 ([`bf16dot`]).
    ///
    /// Quantized, its `prompt` rows take bf16 activations where the weights allow
    /// ([`qmatmul::qmatmul_prompt`]); a dense weight computes every row alike.
    pub(crate) fn matmul(
        &self,
        be: &CpuBackend,
        x: &[f32],
        m: usize,
        prompt: PromptRows<'_>,
        y: &mut [f32],
    ) {
        if let Some(q) = self.qmatrix(be) {
            return qmatmul::qmatmul_prompt(x, m, q, prompt, y);
        }
        match self.data() {
            WeightData::Bf16(w) if be.bf16() && bf16dot::available() => {
                bf16dot::matmul(x, m, w, self.rows, self.cols, y)
            }
            _ => with_elems!(self, |s| kernels::linear(x, m, s, self.rows, self.cols, y)),
        }
    }

    /// Bytes a full pass over this weight reads.
    pub fn bytes(&self) -> usize {
        match &self.quant {
            Some(q) => q.qweight_bytes().len() + q.scales.data.as_slice().len(),
            None => self.view.data.as_slice().len(),
        }
    }
}

/// The paged latent cache on the CPU: `[layers, blocks * block_size, W]`, f32 or bf16
/// (see [`CpuBackend::with_cache_dtype`]).
pub struct CpuCache {
    spec: CacheSpec,
    values: CacheValues,
}

/// The cache's storage, by dtype.
pub(crate) enum CacheValues {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// One layer's cached rows, by dtype: `[blocks * block_size, W]`.
pub(crate) enum LayerRows<'a> {
    F32(CacheLayer<'a, f32>),
    Bf16(CacheLayer<'a, bf16>),
}

/// One layer of the paged latent cache in its stored dtype.
#[derive(Clone, Copy)]
pub(crate) struct CacheLayer<'a, E> {
    values: &'a [E],
    width: usize,
    block_size: usize,
}

impl<'a, E> CacheLayer<'a, E> {
    /// The `W` cached values of `slot`.
    pub(crate) fn row(&self, slot: usize) -> &'a [E] {
        &self.values[slot * self.width..(slot + 1) * self.width]
    }

    /// The `block_size × W` cached values of block `block`, position-major.
    pub(crate) fn block_rows(&self, block: usize) -> &'a [E] {
        let len = self.block_size * self.width;
        &self.values[block * len..(block + 1) * len]
    }
}

impl CpuCache {
    /// The shape of the cache.
    pub fn spec(&self) -> CacheSpec {
        self.spec
    }

    /// The dtype the cached values are stored in.
    pub fn dtype(&self) -> ComputeDtype {
        match self.values {
            CacheValues::F32(_) => ComputeDtype::F32,
            CacheValues::Bf16(_) => ComputeDtype::Bf16,
        }
    }

    /// The `W` cached values of `slot` in `layer`, widened to f32 (exact): a copy, for
    /// tests and inspection (the attention reads the rows in place, `layer`).
    pub fn row(&self, layer: usize, slot: usize) -> Vec<f32> {
        match self.layer(layer) {
            LayerRows::F32(l) => l.row(slot).to_vec(),
            LayerRows::Bf16(l) => l.row(slot).iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// The rows of `layer` in their stored dtype.
    pub(crate) fn layer(&self, layer: usize) -> LayerRows<'_> {
        let (w, bs) = (self.spec.width(), self.spec.block_size);
        let len = self.spec.num_blocks * bs * w;
        fn cut<E>(
            v: &[E],
            layer: usize,
            len: usize,
            width: usize,
            block_size: usize,
        ) -> CacheLayer<'_, E> {
            CacheLayer {
                values: &v[layer * len..(layer + 1) * len],
                width,
                block_size,
            }
        }
        match &self.values {
            CacheValues::F32(v) => LayerRows::F32(cut(v, layer, len, w, bs)),
            CacheValues::Bf16(v) => LayerRows::Bf16(cut(v, layer, len, w, bs)),
        }
    }

    /// Stores `row` (`W` values) at `slot` of `layer`, rounded to bf16 (to nearest even)
    /// in a bf16 cache.
    fn store_row(&mut self, layer: usize, slot: usize, row: &[f32]) {
        let w = self.spec.width();
        let at = (layer * self.spec.num_blocks * self.spec.block_size + slot) * w;
        match &mut self.values {
            CacheValues::F32(v) => v[at..at + w].copy_from_slice(row),
            CacheValues::Bf16(v) => v[at..at + w]
                .iter_mut()
                .zip(row)
                .for_each(|(d, s)| *d = bf16::from_f32(*s)),
        }
    }
}

/// A step's metadata on the CPU: a copy of the batch and its RoPE angles, kept between
/// steps so its buffers are reused.
#[derive(Debug, Default)]
pub struct CpuStep {
    batch: Batch,
    /// `[T, Dr/2]`
    cos: Vec<f32>,
    /// `[T, Dr/2]`
    sin: Vec<f32>,
}

impl CpuStep {
    fn angles(&self, t: usize) -> (&[f32], &[f32]) {
        let half = self.cos.len() / self.batch.num_tokens().max(1);
        (
            &self.cos[t * half..(t + 1) * half],
            &self.sin[t * half..(t + 1) * half],
        )
    }
}

/// The CPU implementation of [`Backend`].
#[derive(Debug, Default)]
pub struct CpuBackend {
    dtype: ComputeDtype,
    /// What the latent cache stores when set ([`CpuBackend::with_cache_dtype`]); unset,
    /// [`CpuBackend::cache_dtype`] picks it.
    cache_dtype: Option<ComputeDtype>,
    /// Set once a q4 weight is loaded: the default cache is then bf16.
    q4_weights: std::sync::atomic::AtomicBool,
    /// Set once a quantized weight is loaded: the model's bf16 `lm_head` (kept dense
    /// under q8, see [`dsv2_core::quant::quantized_format`]) then takes activations
    /// rounded to bf16 on `vdpbf16ps` ([`bf16dot`]) where the CPU has AVX-512 BF16:
    /// their ~1e-3 rounding is small next to the int8 weights' and the product streams
    /// the 0.42 GB head at the memory's pace, where widening it to f32 (the exact path)
    /// reached ~37 GB/s and cost V2-Lite's q8 decode 17%.
    quantized: std::sync::atomic::AtomicBool,
    /// Distinct routed experts run, summed over MoE layer calls
    /// ([`Backend::routed_experts_run`]).
    routed_experts_run: std::sync::atomic::AtomicU64,
    /// The int8 activation terms of q8 products when set
    /// ([`CpuBackend::with_q8_activation_terms`]); unset, [`qmatmul::activation_terms`]
    /// picks them from the model's formats.
    q8_terms: Option<usize>,
    /// The prepared step's prompt length of each row (its sequence's
    /// [`SeqSlice::prompt_len`](dsv2_backend::SeqSlice) when it computes more than one
    /// token, else 0), when this backend computes prompt rows of q8 products in float
    /// arithmetic ([`CpuBackend::float_prompt_rows`]); empty otherwise.
    step_prompt_lens: std::sync::Mutex<Vec<u32>>,
}

impl CpuBackend {
    /// A backend computing with the given activation precision.
    pub fn new(dtype: ComputeDtype) -> Self {
        CpuBackend {
            dtype,
            cache_dtype: None,
            q4_weights: std::sync::atomic::AtomicBool::new(false),
            quantized: std::sync::atomic::AtomicBool::new(false),
            routed_experts_run: std::sync::atomic::AtomicU64::new(0),
            q8_terms: None,
            step_prompt_lens: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Whether prompt rows of q8 products take bf16 activations (`q8_bf16.rs`): in a
    /// q8 model whose activation terms were not set ([`CpuBackend::with_q8_activation_terms`]
    /// asks for int8 terms on every row), on a CPU with AVX-512 BF16 whose `vdpbf16ps`
    /// keeps pace with its `vpdpbusd` ([`q8_prompt_rows_in_bf16`]: AMD's, not Intel's), or
    /// with AMX tiles ([`q8_prompt_rows_on_amx_tiles`]: Intel's Sapphire Rapids and
    /// later). A product's rows of a prompt long enough to give it 16 rows
    /// (`q8_bf16::PROMPT_MIN_ROWS`) then do 32 weight multiply-adds per `vdpbf16ps` (or
    /// 8,192 per `tdpbf16ps`) where two int8 terms take two `vpdpbusd`s per 64 and more
    /// work per block (products 1.1-1.27× the speed on Zen 4; with the prompt's attention
    /// in bf16 too, a V2-Lite prefill 1.15-1.35×; on the tiles of a 16-core Sapphire
    /// Rapids 1.4-1.9×), with logit error 2.9e-3..9.6e-3 on issue #5's fixtures (two int8
    /// terms: 2.5e-3..9.3e-3). Decode rows and short prompts keep the int8 terms (their
    /// products stream memory).
    pub fn bf16_prompt_rows(&self) -> bool {
        self.float_prompt_rows() && q8_bf16::preferred()
    }

    /// Whether prompt rows of q8 products take float activations: in bf16 arithmetic
    /// ([`CpuBackend::bf16_prompt_rows`]), or in f32 on a CPU with AVX2 and FMA but no
    /// int8 dot product (`q8_f32.rs`: exact activations, one FMA per 8 weight
    /// multiply-adds where two int8 terms take ~9 operations per 32).
    pub fn float_prompt_rows(&self) -> bool {
        self.q8_terms.is_none()
            && self.has_quantized_weights()
            && self.routed_format() == dsv2_core::QuantFormat::Q8
            && (q8_bf16::preferred() || q8_f32::available())
    }

    /// Whether a sequence's prompt chunk is prompt work in bf16 under
    /// [`CpuBackend::bf16_prompt_rows`]: its dense products' rows, its `kv_b_proj`
    /// expansion and its expanded attention (a prompt of at least 16 tokens).
    pub(crate) fn bf16_prompt(&self, seq: &dsv2_backend::SeqSlice) -> bool {
        seq.query_len > 1
            && seq.prompt_len >= q8_bf16::PROMPT_MIN_ROWS as usize
            && self.bf16_prompt_rows()
    }

    /// Locks the prepared step's prompt lengths ([`CpuBackend::step_prompt_lens`]):
    /// [`PromptRows::of`] them gives a product's prompt rows.
    fn step_prompt_lens(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.step_prompt_lens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Splits each activation row entering a q8 product into `terms` int8 rows instead
    /// of the model's default ([`qmatmul::activation_terms`]: 2 in a q8 model, 1 in a q4
    /// one). 2 carry ~15 bits per value, so the products are nearly those of the f32
    /// activations with the int8 weights; 1 is llama.cpp's `q8_0` activation rounding,
    /// which adds about as much logit error as the int8 weights themselves (issue #5's
    /// fixtures: q8 2.5e-3..9.3e-3 with 2, 5.4e-3..1.87e-2 with 1) for half the integer
    /// multiply-adds: a V2-Lite prefill 1.6-1.8× faster where the int8 arithmetic is the
    /// limit.
    /// (q4 products always take one term; their 4-bit weights' error is ~5× it.)
    ///
    /// # Panics
    /// If `terms` is not 1 or 2.
    pub fn with_q8_activation_terms(mut self, terms: usize) -> Self {
        assert!(
            terms == 1 || terms == qmatmul::TERMS,
            "{terms} activation terms (1 or 2)"
        );
        self.q8_terms = Some(terms);
        self
    }

    /// The int8 activation terms of products with `format` weights in this backend's
    /// model ([`CpuBackend::with_q8_activation_terms`], else
    /// [`qmatmul::activation_terms`] of the formats loaded).
    pub fn activation_terms(&self, format: dsv2_core::QuantFormat) -> usize {
        match (format, self.q8_terms) {
            (dsv2_core::QuantFormat::Q8, Some(terms)) => terms,
            _ => qmatmul::activation_terms(format, self.routed_format()),
        }
    }

    /// True once a quantized (q8 or q4) weight is loaded.
    pub fn has_quantized_weights(&self) -> bool {
        self.quantized.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds a MoE layer call's distinct routed experts to [`Backend::routed_experts_run`].
    pub(crate) fn count_routed_experts(&self, distinct: usize) {
        self.routed_experts_run
            .fetch_add(distinct as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stores the latent cache in `dtype` instead of the compute dtype. A bf16 cache
    /// under f32 activations (e.g. a quantized model) halves the cache's memory and the
    /// bytes decode attention reads, and rounds each cached latent and RoPE key to bf16
    /// (to nearest even) as the GPU's bf16 cache does; under bf16 activations the cached
    /// values are bf16 already and the bf16 cache is exact.
    pub fn with_cache_dtype(mut self, dtype: ComputeDtype) -> Self {
        self.cache_dtype = Some(dtype);
        self
    }

    /// The format of the model's routed experts as far as the weights tell: q4 once a q4
    /// weight is loaded, else q8 (it sets the activation terms of q8 products,
    /// [`qmatmul::activation_terms`]; products run after the load).
    pub fn routed_format(&self) -> dsv2_core::QuantFormat {
        if self.q4_weights.load(std::sync::atomic::Ordering::Relaxed) {
            dsv2_core::QuantFormat::Q4
        } else {
            dsv2_core::QuantFormat::Q8
        }
    }

    /// What the latent cache stores: the dtype [`CpuBackend::with_cache_dtype`] set, else
    /// the compute dtype (as on the GPU), except bf16 once the model has q4 weights: there
    /// the cache's rounding moves q4's error against the reference by ≤ 8e-4 (5e-3 on one
    /// prompt whose routing flips) next to q4's own 2e-2..1e-1
    /// (`crates/dsv2-engine/tests/fixtures.rs`), for half the cache's memory
    /// and a faster long-context decode. (Under q8 it took one trained fixture past
    /// issue #5's 1e-2, so q8 keeps the compute dtype.) Caches are allocated after the
    /// weights are loaded, so the choice is settled by then.
    pub fn cache_dtype(&self) -> ComputeDtype {
        self.cache_dtype.unwrap_or(
            if self.q4_weights.load(std::sync::atomic::Ordering::Relaxed) {
                ComputeDtype::Bf16
            } else {
                self.dtype
            },
        )
    }

    /// True when outputs are rounded to bf16.
    pub(crate) fn bf16(&self) -> bool {
        self.dtype == ComputeDtype::Bf16
    }

    /// Rounds to bf16 when computing in bf16.
    pub(crate) fn round(&self, x: &mut [f32]) {
        if self.bf16() {
            round_bf16_slice(x);
        }
    }

    /// RMSNorm of one row, with the reference's rounding points.
    pub(crate) fn rms_norm_row(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        if self.bf16() {
            for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
                *o = round_bf16(g * round_bf16(v * inv));
            }
        } else {
            for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
                *o = g * (v * inv);
            }
        }
    }

    /// Rotates adjacent pairs `(2i, 2i+1)` of `x` `[Dr]` by the angles of one token.
    pub(crate) fn rope_row(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        for i in 0..cos.len() {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos[i] - b * sin[i];
            x[2 * i + 1] = a * sin[i] + b * cos[i];
        }
        self.round(x);
    }

    fn vector<'w>(&self, w: &'w CpuWeight) -> &'w [f32] {
        w.vector
            .as_deref()
            .expect("a 1-D weight (checked against the config at load)")
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Buffer = Vec<f32>;
    type Cache = CpuCache;
    type Step = CpuStep;

    fn describe(&self) -> String {
        let threads = team::threads();
        // The int8 terms of q8 products (and q4's one), once quantized weights are loaded.
        let terms = match (self.has_quantized_weights(), self.routed_format()) {
            (false, _) => String::new(),
            (true, dsv2_core::QuantFormat::Q8) => format!(
                ", int8 activation terms {}{}",
                self.activation_terms(dsv2_core::QuantFormat::Q8),
                if self.bf16_prompt_rows() && amx::available() {
                    " (prompt rows bf16 on AMX tiles)"
                } else if self.bf16_prompt_rows() {
                    " (prompt rows bf16)"
                } else if self.float_prompt_rows() {
                    " (prompt rows f32)"
                } else {
                    ""
                }
            ),
            (true, dsv2_core::QuantFormat::Q4) => format!(
                ", int8 activation terms q8 {} q4 {}",
                self.activation_terms(dsv2_core::QuantFormat::Q8),
                self.activation_terms(dsv2_core::QuantFormat::Q4)
            ),
        };
        let limit = match dsv2_core::isa::limit() {
            dsv2_core::isa::IsaLimit::Native => String::new(),
            l => format!(", {}={}", dsv2_core::isa::ISA_LIMIT_ENV, l.name()),
        };
        format!(
            "cpu ({threads} thread{}, {} activations{terms}, {} latent cache; kernels int8 {}, \
             f32 {}{}{}{limit})",
            if threads == 1 { "" } else { "s" },
            self.dtype,
            self.cache_dtype(),
            qmatmul::isa_name(),
            matmul::isa_name(),
            if bf16dot::available() {
                ", bf16 avx512-bf16"
            } else {
                ""
            },
            if amx::available() {
                ", tiles amx-bf16"
            } else {
                ""
            },
        )
    }

    fn load_weight(&self, view: &TensorView) -> Result<CpuWeight> {
        if !view.is_float() {
            return Err(BackendError::Weight {
                name: view.name.clone(),
                problem: format!("dtype {} is not supported", view.dtype),
            });
        }
        let (rows, cols, vector) = match view.shape.as_slice() {
            [n] => (1, *n, Some(view.to_f32_vec())),
            [r, c] => (*r, *c, None),
            other => {
                return Err(BackendError::Weight {
                    name: view.name.clone(),
                    problem: format!("expected a vector or matrix, got shape {other:?}"),
                })
            }
        };
        Ok(CpuWeight {
            view: view.clone(),
            quant: None,
            rows,
            cols,
            vector,
        })
    }

    /// Planes of a pre-quantized checkpoint are copied from the file mapping into huge
    /// pages once (decode streams them every step; see `dsv2_core::hugemem`).
    fn load_quantized(&self, q: &QuantizedTensor) -> Result<CpuWeight> {
        self.quantized
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if q.format == dsv2_core::QuantFormat::Q4 {
            self.q4_weights
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let q = q.clone().into_huge_pages();
        Ok(CpuWeight {
            view: q.qweight.clone(),
            rows: q.rows,
            cols: q.cols,
            quant: Some(q),
            vector: None,
        })
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc_cache(&self, spec: CacheSpec) -> Result<CpuCache> {
        let len = spec.num_layers * spec.num_blocks * spec.block_size * spec.width();
        let values = match self.cache_dtype() {
            ComputeDtype::F32 => CacheValues::F32(vec![0.0; len]),
            ComputeDtype::Bf16 => CacheValues::Bf16(vec![bf16::ZERO; len]),
        };
        Ok(CpuCache { spec, values })
    }

    fn cache_value_bytes(&self) -> usize {
        match self.cache_dtype() {
            ComputeDtype::F32 => std::mem::size_of::<f32>(),
            ComputeDtype::Bf16 => std::mem::size_of::<bf16>(),
        }
    }

    fn measure_read_bandwidth(&self) -> Result<f64> {
        Ok(bandwidth::measure_read_bandwidth(bandwidth::buffer_bytes()))
    }

    /// Measured ([`peak::measure_peak_macs`]): int8 dot products for quantized weights
    /// (`vdpbf16ps` once q8 weights are loaded whose prompt rows take bf16 activations,
    /// [`CpuBackend::bf16_prompt_rows`], or the AMX tiles' `tdpbf16ps` where they run),
    /// `vdpbf16ps` for bf16 weights under bf16 activations where the CPU has AVX-512
    /// BF16, else f32 FMA.
    fn peak_matrix_rate(&self, quantized: bool) -> Result<Option<PeakRate>> {
        let (op, what) = if quantized && self.bf16_prompt_rows() && amx::available() {
            (
                peak::MatrixOp::AmxBf16,
                "bf16 tiles (amx-bf16, q8 prompt rows)".to_string(),
            )
        } else if quantized && self.bf16_prompt_rows() {
            (
                peak::MatrixOp::Bf16,
                "bf16 dot products (avx512-bf16, q8 prompt rows)".to_string(),
            )
        } else if quantized && self.float_prompt_rows() {
            (
                peak::MatrixOp::F32,
                format!("f32 FMA ({}, q8 prompt rows)", matmul::isa_name()),
            )
        } else if quantized {
            (
                peak::MatrixOp::Int8,
                format!("int8 dot products ({})", qmatmul::isa_name()),
            )
        } else if self.bf16() && bf16dot::available() {
            (
                peak::MatrixOp::Bf16,
                "bf16 dot products (avx512-bf16)".to_string(),
            )
        } else {
            (
                peak::MatrixOp::F32,
                format!("f32 FMA ({})", matmul::isa_name()),
            )
        };
        Ok(Some(PeakRate {
            flops_per_s: 2.0 * peak::measure_peak_macs(op),
            basis: format!("{what} measured on {} threads", team::threads()),
        }))
    }

    fn alloc_step(&self, max_tokens: usize) -> Result<CpuStep> {
        let mut step = CpuStep::default();
        step.batch.token_ids.reserve(max_tokens);
        Ok(step)
    }

    fn prepare_step(
        &self,
        batch: &Batch,
        angles: RopeAngles<'_>,
        step: &mut CpuStep,
    ) -> Result<()> {
        step.batch.clone_from(batch);
        let mut lens = self.step_prompt_lens();
        lens.clear();
        if self.float_prompt_rows() {
            for seq in &batch.seqs {
                let len = if seq.query_len > 1 { seq.prompt_len } else { 0 };
                lens.extend(std::iter::repeat_n(len as u32, seq.query_len));
            }
            lens.resize(batch.num_tokens(), 0);
        }
        drop(lens);
        step.cos.clear();
        step.cos.extend_from_slice(angles.cos);
        step.sin.clear();
        step.sin.extend_from_slice(angles.sin);
        Ok(())
    }

    fn embed(&self, table: &CpuWeight, step: &CpuStep, out: &mut Vec<f32>) -> Result<()> {
        let d = table.cols;
        for (t, &id) in step.batch.token_ids.iter().enumerate() {
            if id as usize >= table.rows {
                return Err(BackendError::Device {
                    op: "embed",
                    problem: format!("token id {id} >= vocabulary size {}", table.rows),
                });
            }
            table.row_to(id as usize, &mut out[t * d..(t + 1) * d]);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        weight: &CpuWeight,
        eps: f32,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let d = weight.cols;
        let w = self.vector(weight);
        team::for_each_chunk_mut(&mut out[..rows * d], d, |t, o| {
            self.rms_norm_row(&x[t * d..(t + 1) * d], w, eps, o)
        });
        Ok(())
    }

    fn linear(&self, x: &Vec<f32>, rows: usize, w: &CpuWeight, out: &mut Vec<f32>) -> Result<()> {
        let lens = self.step_prompt_lens();
        let prompt = PromptRows::of(&lens, rows, q8_bf16::PROMPT_MIN_ROWS);
        w.matmul(self, x, rows, prompt, out);
        self.round(&mut out[..rows * w.rows]);
        Ok(())
    }

    /// Two quantized matrices of the same width take their input quantized once: in one
    /// parallel loop for a decode batch (`moe::few_rows_pair`), as two loops beyond
    /// (`qmatmul::qmatmul_pair`); anything else as two [`linear`](Backend::linear)s.
    fn linear_pair(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w_a: &CpuWeight,
        out_a: &mut Vec<f32>,
        w_b: &CpuWeight,
        out_b: &mut Vec<f32>,
    ) -> Result<()> {
        match (w_a.qmatrix(self), w_b.qmatrix(self)) {
            (Some(a), Some(b)) if a.cols == b.cols => {
                let lens = self.step_prompt_lens();
                let prompt = PromptRows::of(&lens, rows, q8_bf16::PROMPT_MIN_ROWS);
                if prompt.any(rows) || !moe::few_rows_pair(x, rows, a, out_a, b, out_b) {
                    qmatmul::qmatmul_pair(x, rows, a, out_a, b, out_b, prompt);
                }
                self.round(&mut out_a[..rows * a.rows]);
                self.round(&mut out_b[..rows * b.rows]);
                Ok(())
            }
            _ => {
                self.linear(x, rows, w_a, out_a)?;
                self.linear(x, rows, w_b, out_b)
            }
        }
    }

    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> Result<()> {
        for (a, b) in acc[..len].iter_mut().zip(&x[..len]) {
            *a += b;
        }
        self.round(&mut acc[..len]);
        Ok(())
    }

    fn rope_queries(&self, q: &mut Vec<f32>, dims: MlaDims, step: &CpuStep) -> Result<()> {
        let qd = dims.q_head_dim();
        let row = dims.num_heads * qd;
        for t in 0..step.batch.num_tokens() {
            let (cos, sin) = step.angles(t);
            for h in 0..dims.num_heads {
                let at = t * row + h * qd + dims.nope_dim;
                self.rope_row(&mut q[at..at + dims.rope_dim], cos, sin);
            }
        }
        Ok(())
    }

    fn mla_write_cache(
        &self,
        kv_a: &Vec<f32>,
        kv_norm: &CpuWeight,
        eps: f32,
        step: &CpuStep,
        layer: usize,
        cache: &mut CpuCache,
    ) -> Result<()> {
        let c = cache.spec.kv_lora_rank;
        let w = cache.spec.width();
        let norm = self.vector(kv_norm);
        let mut row = scratch::take::<f32>(w);
        for (t, &slot) in step.batch.slots.iter().enumerate() {
            let src = &kv_a[t * w..(t + 1) * w];
            self.rms_norm_row(&src[..c], norm, eps, &mut row[..c]);
            row[c..].copy_from_slice(&src[c..]);
            let (cos, sin) = step.angles(t);
            self.rope_row(&mut row[c..], cos, sin);
            cache.store_row(layer, slot as usize, &row);
        }
        Ok(())
    }

    fn mla_attention(&self, args: MlaAttention<'_, Self>, out: &mut Vec<f32>) -> Result<()> {
        attention::mla_attention(self, args, out);
        Ok(())
    }

    /// Times the absorbed attention of the step's tokens over layer 0's cache: the
    /// scores, softmax and weighted sum over the cached rows, and on the CPU also the two
    /// small `W_UK`/`W_UV` products around them (~2 MB of bf16 on V2-Lite), which the
    /// kernels interleave per token. The runs repeat over the same rows, so a batch's
    /// cache that fits the last-level cache (32 MiB here: one V2-Lite sequence of 4K
    /// tokens is 9.4 MB in f32) is timed warm there, where a decode step reads it from
    /// memory.
    fn time_decode_attention(
        &self,
        args: MlaAttention<'_, Self>,
        reps: usize,
    ) -> Result<Option<f64>> {
        let d = args.dims;
        let mut out = vec![0.0f32; args.step.batch.num_tokens() * d.num_heads * d.v_dim];
        let again = || MlaAttention {
            q: args.q,
            kv_b_proj: args.kv_b_proj,
            cache: args.cache,
            layer: args.layer,
            step: args.step,
            dims: args.dims,
            path: args.path,
        };
        // One untimed run warms the scratch buffers and the caches' first rows.
        attention::mla_attention(self, again(), &mut out);
        let start = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            attention::mla_attention(self, again(), &mut out);
        }
        Ok(Some(start.elapsed().as_secs_f64() / reps.max(1) as f64))
    }

    fn mlp(
        &self,
        x: &Vec<f32>,
        rows: usize,
        mlp: &Mlp<CpuWeight>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let lens = self.step_prompt_lens();
        let prompt = PromptRows::of(&lens, rows, q8_bf16::PROMPT_MIN_ROWS);
        moe::mlp_rows(self, x, rows, prompt, mlp, out);
        Ok(())
    }

    fn moe(
        &self,
        x: &Vec<f32>,
        rows: usize,
        moe: &MoeWeights<CpuWeight>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let lens = self.step_prompt_lens();
        moe::moe(self, x, rows, &lens, moe, out);
        Ok(())
    }

    fn routed_experts_run(&self) -> Option<u64> {
        Some(
            self.routed_experts_run
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn keep_logits_rows(
        &self,
        step: &mut CpuStep,
        rows: usize,
        bufs: &mut [(&mut Vec<f32>, usize)],
    ) -> Result<usize> {
        let keep = &mut step.batch.logits_rows;
        let n = keep.len();
        // Ascending rows (as every batch lists them) move down in place; anything else,
        // or every row already, keeps the step as it is.
        let ascending = keep.windows(2).all(|w| w[0] < w[1]);
        if !ascending || n == rows || keep.last().is_some_and(|&r| r as usize >= rows) {
            return Ok(rows);
        }
        for (buf, width) in bufs.iter_mut() {
            let width = *width;
            for (i, &r) in keep.iter().enumerate() {
                let r = r as usize;
                buf.copy_within(r * width..(r + 1) * width, i * width);
            }
        }
        let mut lens = self.step_prompt_lens();
        if !lens.is_empty() {
            for (i, &r) in keep.iter().enumerate() {
                lens[i] = lens[r as usize];
            }
            lens.truncate(n);
        }
        for (i, r) in keep.iter_mut().enumerate() {
            *r = i as u32;
        }
        Ok(n)
    }

    fn logits(
        &self,
        x: &Vec<f32>,
        step: &CpuStep,
        lm_head: &CpuWeight,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = &step.batch.logits_rows;
        let (d, v) = (lm_head.cols, lm_head.rows);
        let mut gathered = scratch::take_empty::<f32>();
        for &r in rows {
            gathered
                .vec()
                .extend_from_slice(&x[r as usize * d..(r as usize + 1) * d]);
        }
        let out = &mut out[..rows.len() * v];
        let bf16_head = lm_head.quant.is_none()
            && lm_head.view.dtype == DType::BF16
            && self.quantized.load(std::sync::atomic::Ordering::Relaxed)
            && bf16dot::available();
        if bf16_head {
            bf16dot::matmul(&gathered, rows.len(), lm_head.view.as_bf16(), v, d, out)
        } else {
            lm_head.matmul(self, &gathered, rows.len(), PromptRows::None, out)
        }
        self.round(out);
        Ok(())
    }

    fn greedy_tokens(
        &self,
        x: &Vec<f32>,
        step: &CpuStep,
        lm_head: &CpuWeight,
        out: &mut [u32],
    ) -> Result<()> {
        let v = lm_head.rows;
        let mut logits = scratch::take_overwritten::<f32>(step.batch.logits_rows.len() * v);
        self.logits(x, step, lm_head, &mut logits)?;
        kernels::argmax_rows(&logits, v, ARGMAX_SPAN, out);
        Ok(())
    }
}

#[cfg(test)]
mod isa_limit {
    use dsv2_core::isa::{limit, IsaLimit};

    /// `scripts/test.sh` runs this crate's tests, and the model's and engine's, under each
    /// `DSV2_CPU_ISA`: every kernel family then takes the best path the limit allows.
    #[test]
    fn the_kernels_take_the_best_path_within_the_isa_limit() {
        let int8 = crate::qmatmul::isa_name();
        let f32 = crate::matmul::isa_name();
        let attention = crate::mla::isa();
        let bf16 = crate::bf16dot::available() || crate::flash_bf16::available();
        let has = |features: &[&str]| -> bool {
            #[cfg(target_arch = "x86_64")]
            {
                features.iter().all(|f| match *f {
                    "avx2" => std::is_x86_feature_detected!("avx2"),
                    "fma" => std::is_x86_feature_detected!("fma"),
                    "f16c" => std::is_x86_feature_detected!("f16c"),
                    "avx512f" => std::is_x86_feature_detected!("avx512f"),
                    "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
                    "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
                    "avx512dq" => std::is_x86_feature_detected!("avx512dq"),
                    "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
                    other => panic!("{other}"),
                })
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = features;
                false
            }
        };
        let avx2 = has(&["avx2", "fma", "f16c"]);
        let avx512 = avx2 && has(&["avx512f", "avx512bw", "avx512vl", "avx512dq"]);
        let vnni = avx512 && has(&["avx512vnni"]);
        let l = limit();
        match l {
            IsaLimit::Portable => {
                assert_eq!((int8, f32), ("portable", "portable"));
                assert!(matches!(attention, crate::mla::Isa::Portable));
            }
            IsaLimit::Avx2 if avx2 => {
                assert_eq!((int8, f32), ("avx2", "avx2+fma"));
            }
            IsaLimit::Avx512 | IsaLimit::Native if vnni => {
                assert_eq!((int8, f32), ("avx512-vnni", "avx512+fma"));
            }
            _ => {}
        }
        if l < IsaLimit::Native {
            assert!(!bf16, "bf16 dot products under {l:?}");
        }
        if l < IsaLimit::Avx512 {
            assert!(!int8.starts_with("avx512") && !f32.starts_with("avx512"));
        }
    }
}
