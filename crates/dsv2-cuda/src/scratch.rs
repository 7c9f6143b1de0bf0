//! Grow-only work buffers of the ops.
//!
//! Ops run one after another on one stream, so each buffer can be reused by every op
//! that needs one of its kind. A buffer grows (to the request plus a quarter) the first
//! time a step needs more than before; steps of sizes seen before allocate nothing.

use crate::device::{DevMem, Device};
use crate::error::Result;

/// The kinds of work buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    MlpGate,
    MlpUp,
    LogitsRows,
    Logits,
    TokenIds,
    QLat,
    OLat,
    Latents,
    RopeKeys,
    ExpandedKv,
    Router,
    RouteIds,
    RouteWeights,
    RowToken,
    PairRow,
    TilePtrs,
    ExpertIn,
    ExpertGate,
    ExpertUp,
    ExpertOut,
    /// Split-KV partial results of the decode attention kernel.
    AttnPartial,
    /// SwiGLU products of the small-batch MoE kernels.
    MoeHidden,
    /// Per-expert down projections of the small-batch MoE kernels.
    MoePartial,
}

const NUM_SLOTS: usize = Slot::MoePartial as usize + 1;

/// The buffers, by slot.
#[derive(Default)]
pub(crate) struct Scratch {
    bufs: [Option<DevMem>; NUM_SLOTS],
    /// Bumped whenever a buffer moves (graphs captured before then are stale).
    pub generation: u64,
}

impl Scratch {
    /// The device address of `slot`'s buffer, grown to at least `bytes`.
    pub fn get(&mut self, dev: &Device, slot: Slot, bytes: usize) -> Result<u64> {
        let buf = &mut self.bufs[slot as usize];
        if buf.as_ref().is_none_or(|b| b.bytes() < bytes) {
            let grown = bytes + bytes / 4;
            // Free first: the old contents are not needed, and cuMemFree waits for work
            // still using them.
            *buf = None;
            *buf = Some(dev.alloc_zeroed(grown)?);
            self.generation += 1;
        }
        Ok(buf.as_ref().expect("allocated above").ptr())
    }
}
