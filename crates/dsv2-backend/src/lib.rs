//! The seam between the DeepSeek-V2 forward pass and the hardware.
//!
//! [`Backend`] is a small set of coarse, fused operations with documented shapes and
//! precision; the model (`dsv2-model`) is written once over it, and each backend
//! (`dsv2-cpu`, `dsv2-cuda`) implements it. Batch metadata ([`Batch`], [`SeqSlice`])
//! speaks vLLM/FlashAttention's language: flattened tokens, per-sequence query ranges,
//! context lengths and block tables into a paged latent cache.
//!
//! Shape legend used in every doc comment:
//! `T` tokens in the batch (all sequences flattened), `D` hidden size, `H` attention
//! heads, `Dn` = `qk_nope_head_dim`, `Dr` = `qk_rope_head_dim`, `Dv` = `v_head_dim`,
//! `C` = `kv_lora_rank` (latent width), `W` = `C + Dr` (latent cache width), `E` routed
//! experts, `I` an MLP's intermediate size, `V` vocabulary size.

pub mod routing;

/// The cache slot of a padding token (see [`Backend::decode_bucket`]): its latent is not
/// written anywhere.
pub const PAD_SLOT: u32 = u32::MAX;

use dsv2_core::{QuantizedTensor, TensorView};

/// Precision of activations (weights keep their checkpoint dtype either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// f32 activations throughout; matches the f32 reference to ~1e-6.
    #[default]
    F32,
    /// Activations rounded to bf16 wherever the reference (bf16, eager) rounds them.
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(ComputeDtype::F32),
            "bf16" | "bfloat16" => Ok(ComputeDtype::Bf16),
            other => Err(format!("unknown dtype `{other}` (expected f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        })
    }
}

/// Which attention formulation to run over the latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionPath {
    /// Absorbed for single-token (decode) queries, expanded for prompts.
    #[default]
    Auto,
    /// Keys and values re-derived from the cached latents (`kv_b_proj`), MHA over
    /// `Dn + Dr` keys and `Dv` values: the prefill path.
    Expanded,
    /// `W_UK` folded into the query and `W_UV` applied after the weighted sum of latents:
    /// MQA over `W`-wide keys shared by all heads; the decode path.
    Absorbed,
}

/// One sequence's part of a batch.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct SeqSlice {
    /// First row of this sequence's new tokens in the flattened batch.
    pub query_start: usize,
    /// Number of new tokens (1 for a decode step).
    pub query_len: usize,
    /// Tokens in the cache once this step's tokens are written (past + new).
    pub context_len: usize,
    /// Tokens of the prompt (or recomputed prefix) this step's tokens belong to, 0 for a
    /// decode token: a property of the request, whatever the chunking, so a backend may
    /// pick a row's arithmetic by it and stay batch-invariant (the CPU's q8 prompt rows).
    pub prompt_len: usize,
    /// Physical cache block of each logical block of the sequence.
    pub block_table: Vec<u32>,
}

impl Clone for SeqSlice {
    fn clone(&self) -> Self {
        SeqSlice {
            query_start: self.query_start,
            query_len: self.query_len,
            context_len: self.context_len,
            prompt_len: self.prompt_len,
            block_table: self.block_table.clone(),
        }
    }

    /// Reuses the block table's buffer (no allocation once it is large enough).
    fn clone_from(&mut self, source: &Self) {
        self.query_start = source.query_start;
        self.query_len = source.query_len;
        self.context_len = source.context_len;
        self.prompt_len = source.prompt_len;
        self.block_table.clone_from(&source.block_table);
    }
}

/// The inputs of one forward step: several sequences of different lengths, flattened.
///
/// Built step after step with [`clear`](Batch::clear) and [`push_seq`](Batch::push_seq)
/// (or copied with `clone_from`), a batch reuses its buffers: the per-token path does not
/// allocate once the batch has reached its size.
#[derive(Debug, Default)]
pub struct Batch {
    /// `[T]` token ids.
    pub token_ids: Vec<u32>,
    /// `[T]` absolute positions (`past_len + i` within each sequence).
    pub positions: Vec<u32>,
    /// `[T]` cache slot (`block * block_size + offset`) each token's latent is written to.
    pub slots: Vec<u32>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqSlice>,
    /// Rows whose logits are wanted, in output order.
    pub logits_rows: Vec<u32>,
    /// Block-table buffers of cleared sequences, reused by `push_seq`.
    spare_tables: Vec<Vec<u32>>,
}

impl Clone for Batch {
    fn clone(&self) -> Self {
        Batch {
            token_ids: self.token_ids.clone(),
            positions: self.positions.clone(),
            slots: self.slots.clone(),
            seqs: self.seqs.clone(),
            logits_rows: self.logits_rows.clone(),
            spare_tables: Vec::new(),
        }
    }

    /// Reuses every buffer of `self` (the per-step copy into a backend's step state).
    fn clone_from(&mut self, source: &Self) {
        self.token_ids.clone_from(&source.token_ids);
        self.positions.clone_from(&source.positions);
        self.slots.clone_from(&source.slots);
        self.logits_rows.clone_from(&source.logits_rows);
        let keep = self.seqs.len().min(source.seqs.len());
        for seq in self.seqs.drain(keep..) {
            self.spare_tables.push(seq.block_table);
        }
        for (dst, src) in self.seqs.iter_mut().zip(&source.seqs) {
            dst.clone_from(src);
        }
        for src in &source.seqs[keep..] {
            let mut block_table = self.spare_tables.pop().unwrap_or_default();
            block_table.clone_from(&src.block_table);
            self.seqs.push(SeqSlice {
                query_start: src.query_start,
                query_len: src.query_len,
                context_len: src.context_len,
                prompt_len: src.prompt_len,
                block_table,
            });
        }
    }
}

impl Batch {
    /// Appends the one-token sequence of a padding token already pushed at `row` (see
    /// [`Backend::decode_bucket`]): context 1, block table `[block]`.
    pub fn push_padding_seq(&mut self, row: usize, block: u32) {
        let mut block_table = self.spare_tables.pop().unwrap_or_default();
        block_table.clear();
        block_table.push(block);
        self.seqs.push(SeqSlice {
            query_start: row,
            query_len: 1,
            context_len: 1,
            prompt_len: 0,
            block_table,
        });
    }

    /// Clears the batch for reuse without freeing its buffers.
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slots.clear();
        for seq in self.seqs.drain(..) {
            self.spare_tables.push(seq.block_table);
        }
        self.logits_rows.clear();
    }

    /// Appends a sequence's new tokens: `past_len` tokens are already cached, the new ones
    /// go to the slots given by `block_table`. Logits are requested for its last token
    /// when `want_logits` (or for all of them with `all_logits`). More than one new token
    /// are taken as a whole prompt's last part (`prompt_len` = `past_len` + their
    /// count); a caller computing a prompt in chunks says its length with
    /// [`set_prompt_len`](Batch::set_prompt_len).
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        past_len: usize,
        block_table: &[u32],
        block_size: usize,
        want_logits: LogitsWanted,
    ) {
        let query_start = self.token_ids.len();
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = past_len + i;
            self.token_ids.push(tok);
            self.positions.push(pos as u32);
            let block = block_table[pos / block_size];
            self.slots
                .push(block * block_size as u32 + (pos % block_size) as u32);
        }
        match want_logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => {
                if !tokens.is_empty() {
                    self.logits_rows
                        .push((query_start + tokens.len() - 1) as u32);
                }
            }
            LogitsWanted::All => {
                self.logits_rows
                    .extend((query_start..query_start + tokens.len()).map(|r| r as u32));
            }
        }
        let mut table = self.spare_tables.pop().unwrap_or_default();
        table.clear();
        table.extend_from_slice(block_table);
        self.seqs.push(SeqSlice {
            query_start,
            query_len: tokens.len(),
            context_len: past_len + tokens.len(),
            prompt_len: if tokens.len() > 1 {
                past_len + tokens.len()
            } else {
                0
            },
            block_table: table,
        });
    }

    /// Sets the prompt length of the last sequence pushed (one computing a chunk of a
    /// longer prompt): every chunk of a prompt then carries the same length.
    ///
    /// # Panics
    /// If no sequence was pushed.
    pub fn set_prompt_len(&mut self, prompt_len: usize) {
        self.seqs.last_mut().expect("a pushed sequence").prompt_len = prompt_len;
    }

    /// Number of tokens (`T`).
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// Which rows of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// Shape of the paged latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub num_layers: usize,
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// `C`: latent width (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// `Dr`: RoPE key width.
    pub rope_dim: usize,
}

impl CacheSpec {
    /// Values per token per layer (`W = C + Dr`).
    pub fn width(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    /// Bytes one token takes in the cache across all layers, for a backend that stores
    /// each value in `value_bytes` (see [`Backend::cache_value_bytes`]).
    pub fn bytes_per_token(&self, value_bytes: usize) -> usize {
        self.num_layers * self.width() * value_bytes
    }
}

/// Attention dimensions of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaDims {
    /// `H`
    pub num_heads: usize,
    /// `Dn`
    pub nope_dim: usize,
    /// `Dr`
    pub rope_dim: usize,
    /// `Dv`
    pub v_dim: usize,
    /// `C`
    pub kv_lora_rank: usize,
    /// Multiplies every attention logit (`q_head_dim^-0.5 * mscale^2`).
    pub softmax_scale: f32,
}

impl MlaDims {
    /// `Dn + Dr`: width of one query head.
    pub fn q_head_dim(&self) -> usize {
        self.nope_dim + self.rope_dim
    }
}

/// cos/sin of the RoPE angles of the batch's positions, `[T, Dr/2]` each, already
/// multiplied by the YaRN amplitude. Pair `i` rotates the adjacent values `(2i, 2i+1)`.
#[derive(Debug, Clone, Copy)]
pub struct RopeAngles<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// Routing rule of a MoE layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    /// Experts per token (`k`).
    pub top_k: usize,
    /// `None` for greedy top-k; `Some((n_group, topk_group))` for group-limited greedy.
    pub groups: Option<(usize, usize)>,
    /// Renormalize the chosen weights to sum to 1 (then no scaling is applied).
    pub norm_topk_prob: bool,
    /// Multiplies the chosen weights when not renormalizing (16 in V2).
    pub routed_scaling_factor: f32,
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp<W> {
    /// `[I, D]`
    pub gate_proj: W,
    /// `[I, D]`
    pub up_proj: W,
    /// `[D, I]`
    pub down_proj: W,
}

/// A DeepSeekMoE block's weights.
pub struct MoeWeights<W> {
    /// `[E, D]` router.
    pub gate: W,
    /// The routed experts.
    pub experts: Vec<Mlp<W>>,
    /// The shared experts fused into one MLP (`I = moe_intermediate * n_shared`).
    pub shared_experts: Option<Mlp<W>>,
    pub routing: Routing,
}

/// Arguments of [`Backend::mla_attention`].
pub struct MlaAttention<'a, B: Backend + ?Sized> {
    /// `[T, H, Dn + Dr]` queries, RoPE already applied to the last `Dr` of each head.
    pub q: &'a B::Buffer,
    /// `[H * (Dn + Dv), C]` `kv_b_proj`: rows `h*(Dn+Dv) .. +Dn` are `W_UK[h]`, the next
    /// `Dv` rows are `W_UV[h]`.
    pub kv_b_proj: &'a B::Weight,
    pub cache: &'a B::Cache,
    pub layer: usize,
    pub step: &'a B::Step,
    pub dims: MlaDims,
    pub path: AttentionPath,
}

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A weight could not be prepared (unsupported dtype, device memory, ...).
    #[error("weight `{name}`: {problem}")]
    Weight { name: String, problem: String },
    /// A device-level failure.
    #[error("{op}: {problem}")]
    Device { op: &'static str, problem: String },
}

/// Result alias for backends.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A device's peak matrix rate ([`Backend::peak_matrix_rate`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PeakRate {
    /// FLOP/s, two per multiply-add.
    pub flops_per_s: f64,
    /// Where the figure comes from, for reports (`"int8 dot products (avx512-vnni)
    /// measured on 2 threads"`).
    pub basis: String,
}

/// Coarse operations of the DeepSeek-V2 forward pass.
///
/// Buffers hold logical f32 values in row-major order; each method documents shapes
/// with the legend of this crate. A backend created for [`ComputeDtype::Bf16`] rounds
/// each op's output to bf16 where the reference does.
pub trait Backend: Send + Sync {
    /// A weight resident on the device (dense in checkpoint dtype, or quantized).
    type Weight: Send + Sync;
    /// An activation buffer.
    type Buffer: Send;
    /// The paged latent cache: `[layers, blocks, block_size, W]`.
    type Cache: Send;
    /// One step's metadata on the device: token ids, positions, slots, block tables and
    /// RoPE angles, uploaded once per step by [`prepare_step`](Self::prepare_step).
    type Step: Send;

    /// Human-readable description (device, dtype).
    fn describe(&self) -> String;

    /// Prepares a checkpoint tensor for compute (no copy where the device allows it).
    fn load_weight(&self, view: &TensorView) -> Result<Self::Weight>;
    /// Prepares a weight stored in one of dsv2's quantized formats.
    ///
    /// # Errors
    /// The default: this backend does not run quantized weights.
    fn load_quantized(&self, q: &QuantizedTensor) -> Result<Self::Weight> {
        Err(BackendError::Weight {
            name: q.name.clone(),
            problem: format!(
                "{} weights are not supported on {}",
                q.format.name(),
                self.describe()
            ),
        })
    }
    /// Allocates an activation buffer of `len` values.
    fn alloc(&self, len: usize) -> Result<Self::Buffer>;
    /// Allocates the paged latent cache.
    fn alloc_cache(&self, spec: CacheSpec) -> Result<Self::Cache>;
    /// Bytes one value of the latent cache takes on this backend (4 for an f32 cache, 2
    /// for bf16); [`CacheSpec::bytes_per_token`] turns it into bytes per cached token.
    fn cache_value_bytes(&self) -> usize;

    /// Measures the read bandwidth, in bytes per second, of the memory that holds the
    /// weights and the cache (host memory for the CPU, device memory for a GPU): the best
    /// of a few passes over a buffer several times larger than the last-level cache.
    /// Benchmarks divide the bytes a decode step must read by it to get the step's floor,
    /// so it is measured in the same run, under the same neighbours.
    fn measure_read_bandwidth(&self) -> Result<f64>;

    /// The peak rate of the instruction this backend's prefill matrix products run on:
    /// for `q8`/`q4` weights when `quantized`, else for a checkpoint's bf16 weights under
    /// this backend's activation dtype. Benchmarks state a prefill's MFU against it.
    /// `None` (the default) where the backend cannot tell; the CPU measures it.
    fn peak_matrix_rate(&self, quantized: bool) -> Result<Option<PeakRate>> {
        let _ = quantized;
        Ok(None)
    }

    /// Bytes the paged latent cache of `spec` occupies on the device, so that the cache
    /// can be sized from a memory budget: by default every value at
    /// [`cache_value_bytes`](Self::cache_value_bytes).
    fn cache_bytes(&self, spec: CacheSpec) -> usize {
        spec.num_layers
            * spec.num_blocks
            * spec.block_size
            * spec.width()
            * self.cache_value_bytes()
    }

    /// Allocates step metadata for up to `max_tokens` tokens.
    fn alloc_step(&self, max_tokens: usize) -> Result<Self::Step>;
    /// Copies a batch's metadata and RoPE angles into `step` (the one host-to-device
    /// transfer of a step's inputs).
    fn prepare_step(
        &self,
        batch: &Batch,
        angles: RopeAngles<'_>,
        step: &mut Self::Step,
    ) -> Result<()>;

    /// Starts the device work of a step that the backend may replay as a whole (a CUDA
    /// graph): called after [`prepare_step`](Self::prepare_step), before the step's ops.
    /// `key` names the model and the ops the caller is about to issue (same key, same
    /// sequence of ops for a step of the same shape). Returns `true` when the backend has
    /// already issued the whole work (a replay): the caller then skips the ops and goes
    /// on after [`end_step_graph`](Self::end_step_graph)'s place. Returns `false` when
    /// the caller must issue the ops and then call `end_step_graph` (the backend may be
    /// recording them). The default never replays.
    fn begin_step_graph(&self, step: &Self::Step, cache: &Self::Cache, key: u64) -> Result<bool> {
        let _ = (step, cache, key);
        Ok(false)
    }

    /// Ends what [`begin_step_graph`](Self::begin_step_graph) started when it returned
    /// `false`: `ok` says whether every op of the step succeeded (if not, any recording is
    /// dropped). When the ops were recorded, the recording is issued now. The default
    /// does nothing.
    fn end_step_graph(&self, step: &Self::Step, ok: bool) -> Result<()> {
        let _ = (step, ok);
        Ok(())
    }

    /// `out[t] = table[token_ids[t]]`: table `[V, D]`, out `[T, D]`.
    fn embed(&self, table: &Self::Weight, step: &Self::Step, out: &mut Self::Buffer) -> Result<()>;

    /// RMSNorm of `rows` rows of width `dim`: `out = w * (x / rms(x))`, statistics in f32.
    fn rms_norm(
        &self,
        x: &Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        rows: usize,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// `out[rows, N] = x[rows, K] · wᵀ` for `w` `[N, K]`.
    fn linear(
        &self,
        x: &Self::Buffer,
        rows: usize,
        w: &Self::Weight,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// Two products of the same input, `out_a = x · w_aᵀ` and `out_b = x · w_bᵀ` (a layer's
    /// query and latent projections), in one pass where a backend can. The default runs
    /// two [`linear`](Self::linear)s.
    #[allow(clippy::too_many_arguments)]
    fn linear_pair(
        &self,
        x: &Self::Buffer,
        rows: usize,
        w_a: &Self::Weight,
        out_a: &mut Self::Buffer,
        w_b: &Self::Weight,
        out_b: &mut Self::Buffer,
    ) -> Result<()> {
        self.linear(x, rows, w_a, out_a)?;
        self.linear(x, rows, w_b, out_b)
    }

    /// `acc[i] += x[i]` for the first `len` values (the residual add).
    fn add_assign(&self, acc: &mut Self::Buffer, x: &Self::Buffer, len: usize) -> Result<()>;

    /// The token count a decode step of `tokens` tokens (every sequence one new token)
    /// should be padded to, so that steps of nearby sizes share one recorded launch
    /// sequence (CUDA graphs per batch-size bucket). The model appends the padding tokens
    /// as one-token sequences: token 0 at position 0, slot [`PAD_SLOT`] (the backend
    /// writes no latent for it), attending over one cache row of a real sequence's first
    /// block; their outputs are never read. The default pads nothing.
    fn decode_bucket(&self, tokens: usize) -> usize {
        tokens
    }

    /// The residual add then the next block's RMSNorm, fused where a backend can:
    /// `acc += x` over `rows` rows of width `dim`, then `out = rms_norm(acc)` with
    /// `weight` `[dim]`. The default runs [`add_assign`](Self::add_assign) and
    /// [`rms_norm`](Self::rms_norm).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        acc: &mut Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        self.add_assign(acc, x, rows * dim)?;
        self.rms_norm(acc, weight, eps, rows, out)
    }

    /// A layer's input: [`add_rms_norm`](Self::add_rms_norm) into `normed`, then
    /// [`linear_pair`](Self::linear_pair) of `normed` (`out_a = normed · w_aᵀ`,
    /// `out_b = normed · w_bᵀ`), in one pass where a backend can. The default runs both.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_linear_pair(
        &self,
        acc: &mut Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        rows: usize,
        dim: usize,
        normed: &mut Self::Buffer,
        w_a: &Self::Weight,
        out_a: &mut Self::Buffer,
        w_b: &Self::Weight,
        out_b: &mut Self::Buffer,
    ) -> Result<()> {
        self.add_rms_norm(acc, x, weight, eps, rows, dim, normed)?;
        self.linear_pair(normed, rows, w_a, out_a, w_b, out_b)
    }

    /// A MoE block's input and the block: [`add_rms_norm`](Self::add_rms_norm) of `x`
    /// into `acc` and `normed`, then [`moe`](Self::moe) of `normed` into `x` (the residual
    /// delta is consumed and replaced by the block's output), fused where a backend can
    /// (e.g. the norm with the router). The default runs both.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_moe(
        &self,
        acc: &mut Self::Buffer,
        x: &mut Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        rows: usize,
        dim: usize,
        normed: &mut Self::Buffer,
        moe: &MoeWeights<Self::Weight>,
    ) -> Result<()> {
        self.add_rms_norm(acc, x, weight, eps, rows, dim, normed)?;
        self.moe(normed, rows, moe, x)
    }

    /// Applies RoPE in place to the last `Dr` values of each of the `H` heads of `q`
    /// `[T, H, Dn + Dr]`, at the step's positions.
    fn rope_queries(&self, q: &mut Self::Buffer, dims: MlaDims, step: &Self::Step) -> Result<()>;

    /// From `kv_a` `[T, C + Dr]` (output of `kv_a_proj_with_mqa`): normalizes the latent
    /// with `kv_a_layernorm`, rotates the RoPE key, and writes both to the step's slots
    /// of `layer`.
    fn mla_write_cache(
        &self,
        kv_a: &Self::Buffer,
        kv_norm: &Self::Weight,
        eps: f32,
        step: &Self::Step,
        layer: usize,
        cache: &mut Self::Cache,
    ) -> Result<()>;

    /// [`rope_queries`](Self::rope_queries) then
    /// [`mla_write_cache`](Self::mla_write_cache), in one pass where a backend can (the
    /// default runs both).
    #[allow(clippy::too_many_arguments)]
    fn rope_and_write_cache(
        &self,
        q: &mut Self::Buffer,
        dims: MlaDims,
        kv_a: &Self::Buffer,
        kv_norm: &Self::Weight,
        eps: f32,
        step: &Self::Step,
        layer: usize,
        cache: &mut Self::Cache,
    ) -> Result<()> {
        self.rope_queries(q, dims, step)?;
        self.mla_write_cache(kv_a, kv_norm, eps, step, layer, cache)
    }

    /// [`rope_and_write_cache`](Self::rope_and_write_cache) then
    /// [`mla_attention`](Self::mla_attention) of the roped queries (the attention block
    /// after its projections), fused where a backend can. The default runs both.
    #[allow(clippy::too_many_arguments)]
    fn rope_cache_attention(
        &self,
        q: &mut Self::Buffer,
        dims: MlaDims,
        kv_a: &Self::Buffer,
        kv_norm: &Self::Weight,
        eps: f32,
        kv_b_proj: &Self::Weight,
        step: &Self::Step,
        layer: usize,
        cache: &mut Self::Cache,
        path: AttentionPath,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        self.rope_and_write_cache(q, dims, kv_a, kv_norm, eps, step, layer, cache)?;
        self.mla_attention(
            MlaAttention {
                q,
                kv_b_proj,
                cache,
                layer,
                step,
                dims,
                path,
            },
            out,
        )
    }

    /// Causal attention of every sequence's new tokens over its cached latents; writes
    /// `out` `[T, H * Dv]` (heads concatenated, ready for `o_proj`).
    fn mla_attention(&self, args: MlaAttention<'_, Self>, out: &mut Self::Buffer) -> Result<()>;

    /// Seconds one run of the decode attention kernels takes over the paged latent cache
    /// for the step's decode tokens (the attention over the cache alone: no projections,
    /// nothing written), averaged over `reps` runs; `None` where a backend does not time
    /// it (the default).
    fn time_decode_attention(
        &self,
        args: MlaAttention<'_, Self>,
        reps: usize,
    ) -> Result<Option<f64>> {
        let _ = (args, reps);
        Ok(None)
    }

    /// Routed experts the MoE layers have run since the backend was made: each layer
    /// call counts its distinct chosen experts (the experts whose weights it reads), so
    /// `dsv2 bench` can put the bytes a decode step really read in its floor. `None`
    /// where the routing stays on the device (the default): the bench then assumes
    /// uniform routing.
    fn routed_experts_run(&self) -> Option<u64> {
        None
    }

    /// A SwiGLU MLP over `rows` tokens: `out [rows, D]`.
    fn mlp(
        &self,
        x: &Self::Buffer,
        rows: usize,
        mlp: &Mlp<Self::Weight>,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// DeepSeekMoE over `rows` tokens: router in f32, top-k routing, the chosen experts'
    /// weighted sum in f32, plus the shared experts; `out [rows, D]`.
    fn moe(
        &self,
        x: &Self::Buffer,
        rows: usize,
        moe: &MoeWeights<Self::Weight>,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// Narrows a step to the rows whose logits are read, after the last layer's
    /// attention: moves row `logits_rows[i]` of each `(buffer, width)` of `bufs` to row
    /// `i`, and makes the step's later ops (the last layer's output projection and
    /// feed-forward block, the final norm, the head) take those rows as rows
    /// `0..logits_rows.len()`. Returns the rows kept. The other tokens' last-layer outputs
    /// are never read (the cache already holds their latents), so a prompt's tokens but
    /// its last skip the last layer's feed-forward block, as in llama.cpp. The default
    /// keeps every row (same results, more work).
    ///
    /// # Errors
    /// A backend failure.
    fn keep_logits_rows(
        &self,
        step: &mut Self::Step,
        rows: usize,
        bufs: &mut [(&mut Self::Buffer, usize)],
    ) -> Result<usize> {
        let _ = (step, bufs);
        Ok(rows)
    }

    /// Logits of the step's `logits_rows` of `x` `[T, D]` through `lm_head` `[V, D]`,
    /// copied to the host as f32 `[rows, V]`.
    fn logits(
        &self,
        x: &Self::Buffer,
        step: &Self::Step,
        lm_head: &Self::Weight,
        out: &mut [f32],
    ) -> Result<()>;

    /// The argmax token of each of the step's `logits_rows` (greedy sampling on the
    /// device: only the ids travel to the host), ties to the lowest id.
    fn greedy_tokens(
        &self,
        x: &Self::Buffer,
        step: &Self::Step,
        lm_head: &Self::Weight,
        out: &mut [u32],
    ) -> Result<()>;
}
