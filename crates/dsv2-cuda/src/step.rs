//! One step's metadata on the device, uploaded by `prepare_step` in a single copy.
//!
//! Everything a step's kernels index by is packed into one `u32` array: per token (ids,
//! cache slots, owning sequence, visible context), per sequence (context length, offset
//! of its block table, offsets of its rows when its context is gathered for the expanded
//! path), the token and sequence lists of the two attention paths under
//! `AttentionPath::Auto`, the block tables, and the RoPE cos/sin (f32 bits).

use dsv2_backend::{Batch, RopeAngles, PAD_SLOT};

use crate::device::{DevMem, Device};
use crate::error::{unsupported, Result};

/// Word offsets of the sections of the packed metadata.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Layout {
    pub token_ids: usize,
    pub slots: usize,
    pub tok_seq: usize,
    pub tok_visible: usize,
    pub logits_rows: usize,
    /// `0..logits_rows.len()`: the logits rows once `keep_logits_rows` moved them to the
    /// front.
    pub logits_identity: usize,
    pub seq_ctx: usize,
    /// Per sequence: first row and number of its new tokens.
    pub seq_qstart: usize,
    pub seq_qlen: usize,
    pub seq_bt_off: usize,
    /// Row offset of each sequence's context when every sequence is gathered.
    pub goff_all: usize,
    /// Row offset when only the prefill (query_len > 1) sequences are gathered.
    pub goff_auto: usize,
    /// Tokens of decode (query_len == 1) sequences.
    pub abs_auto_tokens: usize,
    /// Prefill sequences.
    pub exp_auto_seqs: usize,
    /// Tokens of prefill sequences.
    pub exp_auto_tokens: usize,
    pub block_tables: usize,
    pub cos: usize,
    pub sin: usize,
    pub words: usize,
}

/// Counts the host needs to size launches (the lists themselves stay on the device).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Counts {
    pub tokens: usize,
    pub seqs: usize,
    pub logits_rows: usize,
    pub abs_auto_tokens: usize,
    pub exp_auto_seqs: usize,
    pub exp_auto_tokens: usize,
    /// Context rows gathered for the expanded path: all sequences / prefill ones only.
    pub gathered_all: usize,
    pub gathered_auto: usize,
    /// Longest context: all sequences / prefill ones only.
    pub max_ctx_all: usize,
    pub max_ctx_auto: usize,
    /// Most new tokens of one sequence: all sequences / prefill ones only.
    pub max_qlen_all: usize,
    pub max_qlen_auto: usize,
    /// Largest cache slot written and block referenced (checked against the cache).
    pub max_slot: Option<u32>,
    pub max_block: Option<u32>,
    /// Fewest blocks per context token over the sequences, as (blocks, context_len) of
    /// the tightest sequence (checked against the cache's block size).
    pub tightest_table: Option<(usize, usize)>,
}

/// A step's metadata on the device (see the module docs). Reused between steps; grows
/// (and moves) only when a step needs more room than any before it.
pub struct CudaStep {
    pub(crate) mem: Option<DevMem>,
    pub(crate) layout: Layout,
    pub(crate) counts: Counts,
    /// Token ids on the host, to check them against the vocabulary in `embed`.
    pub(crate) token_ids: Vec<u32>,
    staging: Vec<u32>,
    max_tokens: usize,
    /// Unique among the steps of this process (keys captured graphs).
    pub(crate) id: u64,
    /// Bumped whenever `mem` moves (graphs captured before then are stale).
    pub(crate) generation: u64,
}

/// Source of [`CudaStep::id`] and of the caches' ids.
pub(crate) static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh id for a step or a cache.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl CudaStep {
    pub(crate) fn new(dev: &Device, max_tokens: usize) -> Result<CudaStep> {
        // Room for the token sections and modest block tables; grows when needed.
        let words = 16 * max_tokens.max(1) + 4096;
        Ok(CudaStep {
            mem: Some(dev.alloc_zeroed(words * 4)?),
            layout: Layout::default(),
            counts: Counts::default(),
            token_ids: Vec::with_capacity(max_tokens),
            staging: Vec::with_capacity(words),
            max_tokens,
            id: next_id(),
            generation: 0,
        })
    }

    /// Device address of the section starting at word `offset`.
    pub(crate) fn at(&self, offset: usize) -> u64 {
        self.mem.as_ref().expect("allocated in new").ptr() + 4 * offset as u64
    }

    /// Packs `batch` and `angles` and copies them to the device.
    pub(crate) fn prepare(
        &mut self,
        dev: &Device,
        batch: &Batch,
        angles: RopeAngles<'_>,
    ) -> Result<()> {
        let t = batch.num_tokens();
        if t > self.max_tokens {
            return Err(unsupported(
                "prepare_step",
                format!(
                    "batch of {t} tokens, step allocated for {}",
                    self.max_tokens
                ),
            ));
        }
        if batch.slots.len() != t || angles.cos.len() != angles.sin.len() {
            return Err(unsupported(
                "prepare_step",
                "slots or RoPE angles do not match the batch".to_string(),
            ));
        }
        let s = &mut self.staging;
        s.clear();
        let mut l = Layout::default();
        let mut c = Counts {
            tokens: t,
            seqs: batch.seqs.len(),
            logits_rows: batch.logits_rows.len(),
            ..Counts::default()
        };
        let section =
            |s: &mut Vec<u32>, field: &mut usize, values: &mut dyn Iterator<Item = u32>| {
                *field = s.len();
                s.extend(values);
            };
        if let Some(&r) = batch.logits_rows.iter().find(|&&r| r as usize >= t) {
            return Err(unsupported(
                "prepare_step",
                format!("logits row {r} past the batch's {t} tokens"),
            ));
        }
        c.max_slot = batch.slots.iter().copied().filter(|&s| s != PAD_SLOT).max();
        c.max_block = batch
            .seqs
            .iter()
            .flat_map(|q| q.block_table.iter().copied())
            .max();
        c.tightest_table = batch
            .seqs
            .iter()
            .map(|q| (q.block_table.len(), q.context_len))
            .min_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)));
        section(s, &mut l.token_ids, &mut batch.token_ids.iter().copied());
        section(s, &mut l.slots, &mut batch.slots.iter().copied());
        // Per token: owning sequence and visible context (causal within the new tokens).
        l.tok_seq = s.len();
        s.resize(s.len() + 2 * t, 0);
        l.tok_visible = l.tok_seq + t;
        for (i, seq) in batch.seqs.iter().enumerate() {
            let past = seq.context_len.checked_sub(seq.query_len).ok_or_else(|| {
                unsupported(
                    "prepare_step",
                    format!(
                        "sequence {i}: context_len {} < query_len {}",
                        seq.context_len, seq.query_len
                    ),
                )
            })?;
            if seq.query_start + seq.query_len > t {
                return Err(unsupported(
                    "prepare_step",
                    format!(
                        "sequence {i}: rows {}..{} past the batch's {t} tokens",
                        seq.query_start,
                        seq.query_start + seq.query_len
                    ),
                ));
            }
            for j in 0..seq.query_len {
                s[l.tok_seq + seq.query_start + j] = i as u32;
                s[l.tok_visible + seq.query_start + j] = (past + j + 1) as u32;
            }
        }
        section(
            s,
            &mut l.seq_ctx,
            &mut batch.seqs.iter().map(|q| q.context_len as u32),
        );
        section(
            s,
            &mut l.seq_qstart,
            &mut batch.seqs.iter().map(|q| q.query_start as u32),
        );
        section(
            s,
            &mut l.seq_qlen,
            &mut batch.seqs.iter().map(|q| q.query_len as u32),
        );
        // Block tables, flattened, and each sequence's offset into them.
        let mut bt_off = 0usize;
        l.seq_bt_off = s.len();
        for seq in &batch.seqs {
            s.push(bt_off as u32);
            bt_off += seq.block_table.len();
        }
        // Gather offsets of the expanded path, for all sequences and for prefill ones.
        l.goff_all = s.len();
        for seq in &batch.seqs {
            s.push(c.gathered_all as u32);
            c.gathered_all += seq.context_len;
            c.max_ctx_all = c.max_ctx_all.max(seq.context_len);
            c.max_qlen_all = c.max_qlen_all.max(seq.query_len);
        }
        l.goff_auto = s.len();
        for seq in &batch.seqs {
            s.push(c.gathered_auto as u32);
            if seq.query_len > 1 {
                c.gathered_auto += seq.context_len;
                c.max_ctx_auto = c.max_ctx_auto.max(seq.context_len);
                c.max_qlen_auto = c.max_qlen_auto.max(seq.query_len);
            }
        }
        l.abs_auto_tokens = s.len();
        for seq in batch.seqs.iter().filter(|q| q.query_len == 1) {
            s.push(seq.query_start as u32);
        }
        c.abs_auto_tokens = s.len() - l.abs_auto_tokens;
        l.exp_auto_seqs = s.len();
        for (i, seq) in batch.seqs.iter().enumerate() {
            if seq.query_len > 1 {
                s.push(i as u32);
            }
        }
        c.exp_auto_seqs = s.len() - l.exp_auto_seqs;
        l.exp_auto_tokens = s.len();
        for seq in batch.seqs.iter().filter(|q| q.query_len > 1) {
            s.extend((seq.query_start..seq.query_start + seq.query_len).map(|r| r as u32));
        }
        c.exp_auto_tokens = s.len() - l.exp_auto_tokens;
        // The angles before the block tables (and the logits rows after them): then every
        // offset a decode step's graph uses depends on its token count only, not on its
        // context lengths or logits rows.
        section(s, &mut l.cos, &mut angles.cos.iter().map(|v| v.to_bits()));
        section(s, &mut l.sin, &mut angles.sin.iter().map(|v| v.to_bits()));
        l.block_tables = s.len();
        for seq in &batch.seqs {
            s.extend_from_slice(&seq.block_table);
        }
        // Last: read only by the head, after a captured step.
        section(
            s,
            &mut l.logits_rows,
            &mut batch.logits_rows.iter().copied(),
        );
        section(s, &mut l.logits_identity, &mut (0..c.logits_rows as u32));
        l.words = s.len();
        let needed = l.words * 4;
        if self.mem.as_ref().is_none_or(|m| m.bytes() < needed) {
            // Free the old buffer first (cuMemFree waits for work still reading it).
            self.mem = None;
            self.mem = Some(dev.alloc_zeroed(needed + needed / 4)?);
            self.generation += 1;
        }
        dev.htod(self.at(0), &self.staging, "prepare_step")?;
        self.layout = l;
        self.counts = c;
        self.token_ids.clear();
        self.token_ids.extend_from_slice(&batch.token_ids);
        Ok(())
    }
}
