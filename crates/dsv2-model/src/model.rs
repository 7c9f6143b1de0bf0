//! DeepSeek-V2 (arXiv:2405.04434): multi-head latent attention and DeepSeekMoE.
//!
//! Reference: HuggingFace `modeling_deepseek.py` (deepseek-ai/DeepSeek-V2*) and
//! transformers' `models/deepseek_v2`. Field names are the checkpoint's keys; shapes use
//! the legend of `dsv2-backend`. Variants (query LoRA or not, dense MLP or MoE) are
//! chosen once at load time, so the forward pass runs straight down.

use dsv2_backend::{
    AttentionPath, Backend, Batch, CacheSpec, MlaAttention, MlaDims, Mlp, MoeWeights, RopeAngles,
    Routing, PAD_SLOT,
};
use dsv2_core::quant::{dense_streamed_matrix, quantize_tensor, quantized_format};
use dsv2_core::{expected_tensors, Checkpoint, ModelConfig, QuantFormat, TopkMethod, Weight};

use crate::error::{ModelError, Result};
use crate::rope::Rope;

/// How queries are projected.
pub enum QueryProj<W> {
    /// V2-Lite: `q_proj` `[H*(Dn+Dr), D]`.
    Plain { q_proj: W },
    /// V2: `q_a_proj` `[R, D]`, `q_a_layernorm` `[R]`, `q_b_proj` `[H*(Dn+Dr), R]`.
    LowRank {
        q_a_proj: W,
        q_a_layernorm: W,
        q_b_proj: W,
    },
}

/// Multi-head latent attention weights of one layer.
pub struct Attention<W> {
    pub query: QueryProj<W>,
    /// `[C + Dr, D]`: rows `..C` give the latent, rows `C..` the shared RoPE key.
    pub kv_a_proj_with_mqa: W,
    /// `[C]`
    pub kv_a_layernorm: W,
    /// `[H*(Dn+Dv), C]`: per head, `Dn` rows of `W_UK` then `Dv` rows of `W_UV`.
    pub kv_b_proj: W,
    /// `[D, H*Dv]`
    pub o_proj: W,
}

/// The feed-forward block of a layer.
pub enum FeedForward<W> {
    Dense(Mlp<W>),
    Moe(MoeWeights<W>),
}

/// One decoder layer.
pub struct Layer<W> {
    /// `[D]`
    pub input_layernorm: W,
    pub self_attn: Attention<W>,
    /// `[D]`
    pub post_attention_layernorm: W,
    pub mlp: FeedForward<W>,
}

/// A loaded model: weights on the backend's device, plus the constants of its forward.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    /// `[V, D]`
    pub embed_tokens: B::Weight,
    pub layers: Vec<Layer<B::Weight>>,
    /// `[D]`
    pub norm: B::Weight,
    /// `[V, D]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<B::Weight>,
    pub rope: Rope,
    pub dims: MlaDims,
    /// Unique among the models of this process: keys the step graphs a backend captures.
    id: u64,
}

/// Source of [`Model`] ids.
static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Options of [`Model::load_with`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Quantize eligible dense weights at load time (like ISQ); weights already stored
    /// quantized load as they are.
    pub quantize: Option<QuantFormat>,
}

/// Reusable activation buffers of a forward pass, sized for `capacity` tokens.
pub struct Workspace<B: Backend> {
    capacity: usize,
    /// `[T, D]` the residual stream.
    hidden: B::Buffer,
    /// `[T, D]` normalized input of a block.
    normed: B::Buffer,
    /// `[T, R]` low-rank query (V2 only).
    q_low: B::Buffer,
    q_low_normed: B::Buffer,
    /// `[T, H*(Dn+Dr)]`
    q: B::Buffer,
    /// `[T, C+Dr]`
    kv_a: B::Buffer,
    /// `[T, H*Dv]`
    attn: B::Buffer,
    /// `[T, D]` output of a block before the residual add.
    block_out: B::Buffer,
    /// `[T, Dr/2]` RoPE angles of the batch's positions (host).
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The step's metadata on the device.
    step: B::Step,
    /// A decode step with its padding tokens (`Backend::decode_bucket`), reused.
    padded: Batch,
}

impl<B: Backend> Workspace<B> {
    /// The most tokens a batch may hold with these buffers.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<B: Backend> Model<B> {
    /// Validates every tensor of `checkpoint` against `config`, then loads the weights.
    ///
    /// # Errors
    /// A missing, misshapen or unsupported tensor, named with its file; a backend failure.
    pub fn load(backend: &B, config: ModelConfig, checkpoint: &Checkpoint) -> Result<Self> {
        Self::load_with(backend, config, checkpoint, &LoadOptions::default())
    }

    /// [`load`](Self::load) with options (quantization at load time).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with(
        backend: &B,
        config: ModelConfig,
        checkpoint: &Checkpoint,
        options: &LoadOptions,
    ) -> Result<Self> {
        checkpoint.validate(&expected_tensors(&config))?;
        Self::load_from(
            backend,
            config,
            options,
            |name| Ok(checkpoint.weight(name)?),
        )
    }

    /// Loads the weights `weight` hands out, asked once for each tensor name `config`
    /// implies (those of [`expected_tensors`]), one at a time; eligible dense weights are
    /// quantized first under `options.quantize`. Each weight is dropped as soon as the
    /// backend has prepared it, so a source that makes tensors on demand (random weights
    /// of a real model's shapes) never holds the model twice.
    ///
    /// # Errors
    /// What `weight` reports; a backend failure (unsupported dtype or shape).
    pub fn load_from(
        backend: &B,
        config: ModelConfig,
        options: &LoadOptions,
        mut weight: impl FnMut(&str) -> Result<Weight>,
    ) -> Result<Self> {
        let mut quantized_model = options.quantize.is_some();
        let mut w = |name: &str| -> Result<B::Weight> {
            let weight = match (weight(name)?, options.quantize) {
                (Weight::Dense(view), Some(format)) => {
                    match quantized_format(name, &view.shape, format) {
                        Some(f) => {
                            let quantized = quantize_tensor(&view, f);
                            // The dense tensor was read once: its mapped pages need
                            // not stay resident next to the quantized copy.
                            view.data.release_pages();
                            Weight::Quantized(quantized)
                        }
                        None => Weight::Dense(view),
                    }
                }
                (weight, _) => weight,
            };
            // In a quantized model (quantized now or in the file: the first layer's
            // projections come before any dense matrix but the embeddings), a dense
            // matrix decode streams every step (`lm_head` under q8, `kv_b_proj`, the
            // routers) joins the quantized planes in huge pages: +15% read rate on 2 MiB
            // pages (`dsv2_core::hugemem`).
            quantized_model |= matches!(weight, Weight::Quantized(_));
            let weight = match weight {
                Weight::Dense(view)
                    if quantized_model && dense_streamed_matrix(name, &view.shape) =>
                {
                    Weight::Dense(view.into_huge_pages())
                }
                weight => weight,
            };
            Ok(match &weight {
                Weight::Dense(view) => backend.load_weight(view)?,
                Weight::Quantized(q) => backend.load_quantized(q)?,
            })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let query = match config.q_lora_rank {
                None => QueryProj::Plain {
                    q_proj: w(&format!("{a}.q_proj.weight"))?,
                },
                Some(_) => QueryProj::LowRank {
                    q_a_proj: w(&format!("{a}.q_a_proj.weight"))?,
                    q_a_layernorm: w(&format!("{a}.q_a_layernorm.weight"))?,
                    q_b_proj: w(&format!("{a}.q_b_proj.weight"))?,
                },
            };
            let self_attn = Attention {
                query,
                kv_a_proj_with_mqa: w(&format!("{a}.kv_a_proj_with_mqa.weight"))?,
                kv_a_layernorm: w(&format!("{a}.kv_a_layernorm.weight"))?,
                kv_b_proj: w(&format!("{a}.kv_b_proj.weight"))?,
                o_proj: w(&format!("{a}.o_proj.weight"))?,
            };
            let ffn = match (&config.moe, config.is_moe_layer(i)) {
                (Some(moe), true) => FeedForward::Moe(MoeWeights {
                    gate: w(&format!("{p}.mlp.gate.weight"))?,
                    experts: (0..moe.n_routed_experts)
                        .map(|e| load_mlp(&mut w, &format!("{p}.mlp.experts.{e}")))
                        .collect::<Result<_>>()?,
                    shared_experts: if moe.n_shared_experts > 0 {
                        Some(load_mlp(&mut w, &format!("{p}.mlp.shared_experts"))?)
                    } else {
                        None
                    },
                    routing: Routing {
                        top_k: moe.num_experts_per_tok,
                        groups: match moe.topk_method {
                            TopkMethod::Greedy => None,
                            TopkMethod::GroupLimitedGreedy {
                                n_group,
                                topk_group,
                            } => Some((n_group, topk_group)),
                        },
                        norm_topk_prob: moe.norm_topk_prob,
                        routed_scaling_factor: moe.routed_scaling_factor as f32,
                    },
                }),
                _ => FeedForward::Dense(load_mlp(&mut w, &format!("{p}.mlp"))?),
            };
            layers.push(Layer {
                input_layernorm: w(&format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: w(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: ffn,
            });
        }
        let dims = MlaDims {
            num_heads: config.num_attention_heads,
            nope_dim: config.qk_nope_head_dim,
            rope_dim: config.qk_rope_head_dim,
            v_dim: config.v_head_dim,
            kv_lora_rank: config.kv_lora_rank,
            softmax_scale: config.softmax_scale() as f32,
        };
        Ok(Model {
            embed_tokens: w("model.embed_tokens.weight")?,
            layers,
            norm: w("model.norm.weight")?,
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(w("lm_head.weight")?)
            },
            rope: Rope::new(&config),
            dims,
            config,
            id: NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The cache shape for `num_blocks` blocks of `block_size` tokens.
    pub fn cache_spec(&self, num_blocks: usize, block_size: usize) -> CacheSpec {
        CacheSpec {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            kv_lora_rank: self.config.kv_lora_rank,
            rope_dim: self.config.qk_rope_head_dim,
        }
    }

    /// Activation buffers for batches of up to `capacity` tokens.
    pub fn workspace(&self, backend: &B, capacity: usize) -> Result<Workspace<B>> {
        let c = &self.config;
        let t = capacity.max(1);
        let d = c.hidden_size;
        let q_low = c.q_lora_rank.unwrap_or(0);
        Ok(Workspace {
            capacity: t,
            hidden: backend.alloc(t * d)?,
            normed: backend.alloc(t * d)?,
            q_low: backend.alloc(t * q_low)?,
            q_low_normed: backend.alloc(t * q_low)?,
            q: backend.alloc(t * c.num_attention_heads * c.q_head_dim())?,
            kv_a: backend.alloc(t * c.latent_cache_width())?,
            attn: backend.alloc(t * c.num_attention_heads * c.v_head_dim)?,
            block_out: backend.alloc(t * d)?,
            cos: Vec::with_capacity(t * c.qk_rope_head_dim / 2),
            sin: Vec::with_capacity(t * c.qk_rope_head_dim / 2),
            step: backend.alloc_step(t)?,
            padded: Batch::default(),
        })
    }

    /// Runs one step: writes every token's latent to the cache and the logits of
    /// `batch.logits_rows` to `logits` `[rows, V]`.
    ///
    /// # Errors
    /// A token id outside the vocabulary, a position past `max_position_embeddings`, a
    /// batch larger than the workspace, or a backend failure.
    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
        path: AttentionPath,
        logits: &mut [f32],
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        if logits.len() < batch.logits_rows.len() * vocab {
            return Err(ModelError::Input(format!(
                "logits buffer holds {} values, {} rows of {vocab} needed",
                logits.len(),
                batch.logits_rows.len()
            )));
        }
        self.forward_hidden(backend, batch, cache, ws, path)?;
        backend.logits(&ws.normed, &ws.step, self.head(), logits)?;
        Ok(())
    }

    /// Like [`forward`](Self::forward), but returns the argmax token of each of
    /// `batch.logits_rows` in `tokens`, computed on the device.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_greedy(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
        path: AttentionPath,
        tokens: &mut [u32],
    ) -> Result<()> {
        if tokens.len() < batch.logits_rows.len() {
            return Err(ModelError::Input(
                "token buffer shorter than logits_rows".into(),
            ));
        }
        self.forward_hidden(backend, batch, cache, ws, path)?;
        backend.greedy_tokens(&ws.normed, &ws.step, self.head(), tokens)?;
        Ok(())
    }

    fn head(&self) -> &B::Weight {
        // Tied checkpoints reuse the embedding as the output projection.
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The decoder stack: leaves the final-normed hidden states `[T, D]` in `ws.normed`.
    fn forward_hidden(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
        path: AttentionPath,
    ) -> Result<()> {
        // A decode step padded to the backend's bucket, so that nearby batch sizes replay
        // the same graph; the padding tokens' outputs are never read (logits_rows keep
        // the real rows).
        let t = batch.num_tokens();
        let bucket = backend.decode_bucket(t);
        let decode = !batch.seqs.is_empty() && batch.seqs.len() == t;
        let t = if decode && bucket > t && bucket <= ws.capacity {
            let mut padded = std::mem::take(&mut ws.padded);
            pad_decode_batch(batch, bucket, &mut padded);
            let prepared = self.prepare(backend, &padded, ws);
            ws.padded = padded;
            prepared?;
            bucket
        } else {
            self.prepare(backend, batch, ws)?;
            t
        };
        // The ops below depend on the step's shape and `path` only: a backend may replay
        // them as one graph (CUDA graphs for decode steps).
        let key = (self.id << 8) | path as u64;
        if backend.begin_step_graph(&ws.step, cache, key)? {
            return Ok(());
        }
        let result = self.decoder(backend, t, cache, ws, path);
        let ended = backend.end_step_graph(&ws.step, result.is_ok());
        result?;
        ended?;
        Ok(())
    }

    /// Embedding, decoder layers and final norm of a prepared step of `t` tokens; the last
    /// layer's output projection and feed-forward block and the final norm run on the
    /// step's logits rows only ([`Backend::keep_logits_rows`]).
    fn decoder(
        &self,
        backend: &B,
        mut t: usize,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
        path: AttentionPath,
    ) -> Result<()> {
        backend.embed(&self.embed_tokens, &ws.step, &mut ws.hidden)?;
        let d = self.config.hidden_size;
        let eps = self.config.rms_norm_eps as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            // h = h + attention(input_layernorm(h)); the previous block's residual add is
            // fused with this norm (and, through `add_rms_norm_linear_pair`, with the
            // layer's first projections).
            let residual = if i == 0 {
                backend.rms_norm(&ws.hidden, &layer.input_layernorm, eps, t, &mut ws.normed)?;
                None
            } else {
                Some(&layer.input_layernorm)
            };
            self.attention(backend, i, &layer.self_attn, t, cache, ws, path, residual)?;
            if i + 1 == self.layers.len() {
                // The rest runs on the rows whose logits are read.
                let heads = self.config.num_attention_heads * self.config.v_head_dim;
                t = backend.keep_logits_rows(
                    &mut ws.step,
                    t,
                    &mut [(&mut ws.hidden, d), (&mut ws.attn, heads)],
                )?;
                if t == 0 {
                    return Ok(());
                }
            }
            backend.linear(&ws.attn, t, &layer.self_attn.o_proj, &mut ws.block_out)?;
            // h = h + mlp_or_moe(post_attention_layernorm(h))
            let norm = &layer.post_attention_layernorm;
            match &layer.mlp {
                FeedForward::Dense(mlp) => {
                    backend.add_rms_norm(
                        &mut ws.hidden,
                        &ws.block_out,
                        norm,
                        eps,
                        t,
                        d,
                        &mut ws.normed,
                    )?;
                    backend.mlp(&ws.normed, t, mlp, &mut ws.block_out)?
                }
                FeedForward::Moe(moe) => backend.add_rms_norm_moe(
                    &mut ws.hidden,
                    &mut ws.block_out,
                    norm,
                    eps,
                    t,
                    d,
                    &mut ws.normed,
                    moe,
                )?,
            }
        }
        // The last residual add and the final norm; the head runs on the requested rows.
        backend.add_rms_norm(
            &mut ws.hidden,
            &ws.block_out,
            &self.norm,
            eps,
            t,
            d,
            &mut ws.normed,
        )?;
        Ok(())
    }

    /// Times the backend's decode attention over the cache (first layer, absorbed path)
    /// for the decode tokens of `batch`, averaged over `reps` runs
    /// ([`Backend::time_decode_attention`]): for reporting the attention kernel's read
    /// rate. Writes nothing to the cache. `None` where the backend does not time it.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn time_decode_attention(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &B::Cache,
        ws: &mut Workspace<B>,
        reps: usize,
    ) -> Result<Option<f64>> {
        self.prepare(backend, batch, ws)?;
        let Some(layer) = self.layers.first() else {
            return Ok(None);
        };
        Ok(backend.time_decode_attention(
            MlaAttention {
                q: &ws.q,
                kv_b_proj: &layer.self_attn.kv_b_proj,
                cache,
                layer: 0,
                step: &ws.step,
                dims: self.dims,
                path: AttentionPath::Absorbed,
            },
            reps,
        )?)
    }

    /// Fills the latent cache for the batch's tokens cheaply: each layer caches the
    /// latent of the token's embedding (`kv_a_proj_with_mqa` of `input_layernorm` of the
    /// embedding), skipping attention and the MLPs that a real prefill runs first. For
    /// benchmarks of decode at long contexts, where the cache's size matters and its
    /// contents do not: filling costs one `[T, D]·[D, C + Dr]` product per layer.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn write_latents(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        self.prepare_and_embed(backend, batch, ws)?;
        let t = batch.num_tokens();
        let eps = self.config.rms_norm_eps as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            backend.rms_norm(&ws.hidden, &layer.input_layernorm, eps, t, &mut ws.normed)?;
            backend.linear(&ws.normed, t, &attn.kv_a_proj_with_mqa, &mut ws.kv_a)?;
            backend.mla_write_cache(&ws.kv_a, &attn.kv_a_layernorm, eps, &ws.step, i, cache)?;
        }
        Ok(())
    }

    /// Checks the batch, uploads its metadata and RoPE angles, and embeds its tokens into
    /// `ws.hidden` `[T, D]`.
    fn prepare_and_embed(&self, backend: &B, batch: &Batch, ws: &mut Workspace<B>) -> Result<()> {
        self.prepare(backend, batch, ws)?;
        backend.embed(&self.embed_tokens, &ws.step, &mut ws.hidden)?;
        Ok(())
    }

    /// Checks the batch and uploads its metadata and RoPE angles.
    fn prepare(&self, backend: &B, batch: &Batch, ws: &mut Workspace<B>) -> Result<()> {
        self.check_batch(batch, ws)?;
        self.rope.angles(&batch.positions, &mut ws.cos, &mut ws.sin);
        let angles = RopeAngles {
            cos: &ws.cos,
            sin: &ws.sin,
        };
        backend.prepare_step(batch, angles, &mut ws.step)?;
        Ok(())
    }

    /// MLA: queries, the latent cache write, attention over the cache; leaves the heads'
    /// outputs `[T, H*Dv]` in `ws.attn`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        backend: &B,
        layer: usize,
        attn: &Attention<B::Weight>,
        t: usize,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
        path: AttentionPath,
        residual: Option<&B::Weight>,
    ) -> Result<()> {
        let eps = self.config.rms_norm_eps as f32;
        let d = self.config.hidden_size;
        // q = q_proj(x), or q_b_proj(q_a_layernorm(q_a_proj(x))), and
        // [latent | k_pe] = kv_a_proj_with_mqa(x): the two products of x in one call, x
        // being `normed`, or (with `residual`, the input norm's weight) the norm of the
        // previous block's residual add, computed in the same call.
        let kv_a_proj = &attn.kv_a_proj_with_mqa;
        let (w_a, out_a) = match &attn.query {
            QueryProj::Plain { q_proj } => (q_proj, &mut ws.q),
            QueryProj::LowRank { q_a_proj, .. } => (q_a_proj, &mut ws.q_low),
        };
        match residual {
            None => backend.linear_pair(&ws.normed, t, w_a, out_a, kv_a_proj, &mut ws.kv_a)?,
            Some(norm) => backend.add_rms_norm_linear_pair(
                &mut ws.hidden,
                &ws.block_out,
                norm,
                eps,
                t,
                d,
                &mut ws.normed,
                w_a,
                out_a,
                kv_a_proj,
                &mut ws.kv_a,
            )?,
        }
        match &attn.query {
            QueryProj::Plain { .. } => {}
            QueryProj::LowRank {
                q_a_layernorm,
                q_b_proj,
                ..
            } => {
                backend.rms_norm(&ws.q_low, q_a_layernorm, eps, t, &mut ws.q_low_normed)?;
                backend.linear(&ws.q_low_normed, t, q_b_proj, &mut ws.q)?;
            }
        }
        // RoPE on each query head's tail; cache kv_a_layernorm(latent) and rope(k_pe);
        // then attention over the cache.
        backend.rope_cache_attention(
            &mut ws.q,
            self.dims,
            &ws.kv_a,
            &attn.kv_a_layernorm,
            eps,
            &attn.kv_b_proj,
            &ws.step,
            layer,
            cache,
            path,
            &mut ws.attn,
        )?;
        Ok(())
    }

    fn check_batch(&self, batch: &Batch, ws: &Workspace<B>) -> Result<()> {
        let t = batch.num_tokens();
        if t == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        if t > ws.capacity {
            return Err(ModelError::Input(format!(
                "batch of {t} tokens exceeds the workspace capacity of {}",
                ws.capacity
            )));
        }
        if batch.positions.len() != t || batch.slots.len() != t {
            return Err(ModelError::Input(
                "batch positions/slots do not match its tokens".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = batch.token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is out of range (vocab_size {vocab})"
            )));
        }
        let max_pos = self.config.max_position_embeddings;
        if let Some(&bad) = batch.positions.iter().find(|&&p| p as usize >= max_pos) {
            return Err(ModelError::Input(format!(
                "position {bad} is past max_position_embeddings ({max_pos})"
            )));
        }
        Ok(())
    }
}

/// Loads the three projections of the SwiGLU MLP under `prefix`.
fn load_mlp<W>(w: &mut impl FnMut(&str) -> Result<W>, prefix: &str) -> Result<Mlp<W>> {
    Ok(Mlp {
        gate_proj: w(&format!("{prefix}.gate_proj.weight"))?,
        up_proj: w(&format!("{prefix}.up_proj.weight"))?,
        down_proj: w(&format!("{prefix}.down_proj.weight"))?,
    })
}

/// `batch` (a decode step) followed by padding tokens up to `tokens` rows, into `out`
/// (its buffers reused): one-token sequences of token 0 at position 0 with slot
/// [`PAD_SLOT`], attending over the first row of the first real sequence's first block.
fn pad_decode_batch(batch: &Batch, tokens: usize, out: &mut Batch) {
    out.clone_from(batch);
    let block = batch.seqs[0].block_table.first().copied().unwrap_or(0);
    for row in batch.num_tokens()..tokens {
        out.token_ids.push(0);
        out.positions.push(0);
        out.slots.push(PAD_SLOT);
        out.push_padding_seq(row, block);
    }
}
