//! Iteration-level continuous batching with chunked prefill.
//!
//! Every step, [`Scheduler::schedule`] picks the work of one forward pass within a token
//! budget: first each running sequence's next tokens (one decode token, or the next chunk
//! of a prompt being prefilled), in admission order; then waiting sequences, first come
//! first served, each starting with the part of its prompt found in the prefix cache.
//! When the cache has no free block for a running sequence, the most recently admitted
//! running sequence is preempted: its blocks are freed and it goes back to the head of
//! the queue, to be recomputed (cheaply, when its blocks are still cached) later. A
//! sequence is never failed for lack of blocks: a single sequence of the maximum length
//! always fits the cache.
//!
//! Batch invariance: a token's row is computed by the expanded attention path when it is
//! part of a multi-token chunk and by the absorbed path when alone; the two agree only
//! to rounding. So that a request's result does not depend on how its prompt happened to
//! be chunked or cached, the scheduler never splits a prompt into a 1-token chunk and
//! never lets the prefix cache leave exactly one prompt token to compute: every token of
//! a prompt longer than one runs in a multi-token chunk, as it does alone. Each chunk
//! also carries its prompt's whole length (`SeqSlice::prompt_len`, set by the engine), by
//! which a backend may choose a prompt row's arithmetic (the CPU's q8 prompt rows) the
//! same way for every chunking.

use std::collections::VecDeque;

use crate::block_manager::BlockManager;
use crate::sequence::{FinishReason, SeqId, Sequence, SequenceStatus};

/// Limits of one step and of the running set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running (holding blocks) at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// Index of the sequence in [`Scheduler::running`].
    pub index: usize,
    /// The sequence's id.
    pub seq_id: SeqId,
    /// Tokens computed this step, starting at the sequence's `num_computed_tokens`.
    pub num_new_tokens: usize,
    /// True when this step completes the sequence's tokens: the next token is sampled
    /// from the logits of its last row.
    pub wants_logits: bool,
    /// True on the sequence's first admission (not a resumption after preemption).
    pub is_first_admission: bool,
}

/// Waiting and running sequences and the blocks they hold.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    num_preemptions: u64,
}

/// Tokens of a run of `remaining` uncomputed tokens to compute with `budget` tokens left:
/// all of them if they fit, else a chunk of at least 2 that leaves at least 2 (see the
/// module docs); 0 when no such chunk fits.
fn chunk_len(remaining: usize, budget: usize) -> usize {
    if remaining <= budget {
        return remaining;
    }
    let mut n = budget;
    if remaining - n == 1 {
        n -= 1;
    }
    if n < 2 {
        0
    } else {
        n
    }
}

impl Scheduler {
    /// An empty scheduler over `blocks`.
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.status = SequenceStatus::Waiting;
        self.waiting.push_back(seq);
    }

    /// The running sequences; [`ScheduledSeq::index`] points into this.
    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// The running sequence at `index`.
    pub fn running_mut(&mut self, index: usize) -> &mut Sequence {
        &mut self.running[index]
    }

    /// The waiting sequences, in queue order.
    pub fn waiting(&self) -> impl Iterator<Item = &Sequence> {
        self.waiting.iter()
    }

    /// Running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences (new and preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// True when nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// The block manager (for statistics).
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// Plans the next step into `out` (cleared first); returns its number of tokens.
    pub fn schedule(&mut self, out: &mut Vec<ScheduledSeq>) -> usize {
        out.clear();
        let mut budget = self.config.max_num_batched_tokens;
        let preempted = self.schedule_running(out, &mut budget);
        if !preempted {
            self.schedule_waiting(out, &mut budget);
        }
        self.config.max_num_batched_tokens - budget
    }

    /// Running sequences first, in admission order; preempts from the tail when blocks
    /// run out. Returns true if anything was preempted.
    fn schedule_running(&mut self, out: &mut Vec<ScheduledSeq>, budget: &mut usize) -> bool {
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let seq = &self.running[i];
            let n = chunk_len(seq.num_uncomputed_tokens(), *budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let target = seq.num_computed_tokens + n;
            let need = self
                .blocks
                .blocks_for(target)
                .saturating_sub(seq.block_table.len());
            let mut fits = true;
            while !self.blocks.can_allocate(&[], need) {
                let victim = self.running.len() - 1;
                self.preempt(victim);
                preempted = true;
                if victim == i {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let seq = &mut self.running[i];
            self.blocks.grow(seq, target);
            out.push(ScheduledSeq {
                index: i,
                seq_id: seq.id,
                num_new_tokens: n,
                wants_logits: target == seq.len(),
                is_first_admission: false,
            });
            *budget -= n;
            i += 1;
        }
        preempted
    }

    /// Admits waiting sequences while the budget, the running limit and the free blocks
    /// allow, strictly in queue order.
    fn schedule_waiting(&mut self, out: &mut Vec<ScheduledSeq>, budget: &mut usize) {
        while let Some(seq) = self.waiting.front() {
            if self.running.len() >= self.config.max_num_seqs || *budget == 0 {
                break;
            }
            // Never let the cache cover all but one token (see the module docs).
            let prefix = self
                .blocks
                .lookup_prefix(&seq.token_ids, seq.len().saturating_sub(2));
            let computed = prefix.len() * self.blocks.block_size();
            let n = chunk_len(seq.len() - computed, *budget);
            if n == 0 {
                break;
            }
            let need = self.blocks.blocks_for(computed + n) - prefix.len();
            if !self.blocks.can_allocate(&prefix, need) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let queried = seq.len();
            self.blocks.acquire_prefix(&mut seq, &prefix, queried);
            let is_first_admission = seq.num_cached_prompt_tokens.is_none();
            if is_first_admission {
                seq.num_cached_prompt_tokens = Some(computed.min(seq.num_prompt_tokens));
            }
            self.blocks.grow(&mut seq, computed + n);
            seq.status = SequenceStatus::Running;
            out.push(ScheduledSeq {
                index: self.running.len(),
                seq_id: seq.id,
                num_new_tokens: n,
                wants_logits: computed + n == seq.len(),
                is_first_admission,
            });
            self.running.push(seq);
            *budget -= n;
        }
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.blocks.free(&mut seq);
        seq.status = SequenceStatus::Waiting;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Records that a planned step ran: its tokens are now cached, and the sequences'
    /// newly full blocks join the prefix cache.
    pub fn complete(&mut self, step: &[ScheduledSeq]) {
        for s in step {
            let seq = &mut self.running[s.index];
            seq.num_computed_tokens += s.num_new_tokens;
            debug_assert!(seq.num_computed_tokens <= seq.len());
            self.blocks.cache_full_blocks(seq);
        }
    }

    /// Marks the running sequence at `index` finished (removed by
    /// [`take_finished`](Self::take_finished)).
    pub fn finish(&mut self, index: usize, reason: FinishReason) {
        self.running[index].status = SequenceStatus::Finished(reason);
    }

    /// Moves finished running sequences to `out`, returning their blocks.
    pub fn take_finished(&mut self, out: &mut Vec<Sequence>) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_finished() {
                let mut seq = self.running.remove(i);
                self.blocks.free(&mut seq);
                out.push(seq);
            } else {
                i += 1;
            }
        }
    }

    /// Removes a sequence wherever it is, returning its blocks; `None` if unknown.
    pub fn abort(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.free(&mut seq);
        seq.status = SequenceStatus::Finished(FinishReason::Abort);
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::StopConditions;
    use std::collections::HashMap;

    const BS: usize = 4;

    fn scheduler(num_blocks: usize, max_seqs: usize, max_tokens: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: max_tokens,
            },
            BlockManager::new(num_blocks, BS, true),
        )
    }

    fn seq(id: u64, prompt_len: usize, max_tokens: usize) -> Sequence {
        let prompt = (0..prompt_len as u32).map(|i| i * 7 + id as u32).collect();
        let stop = StopConditions {
            max_tokens,
            stop_token_ids: vec![],
        };
        Sequence::new(id, prompt, stop, 10_000)
    }

    /// A stand-in model: the next token depends only on the sequence and its length,
    /// so outputs are the same however the sequence is batched or preempted.
    fn next_token(seq: &Sequence) -> u32 {
        (seq.id as u32) * 1000 + seq.len() as u32
    }

    /// Runs one step; returns the plan and the finished sequences.
    fn step(s: &mut Scheduler) -> (Vec<ScheduledSeq>, Vec<Sequence>) {
        let mut plan = Vec::new();
        s.schedule(&mut plan);
        s.complete(&plan);
        for p in &plan {
            assert!(p.num_new_tokens > 0);
            let seq = s.running_mut(p.index);
            assert_eq!(seq.id, p.seq_id);
            if p.wants_logits {
                let t = next_token(seq);
                if let Some(reason) = seq.append_token(t) {
                    s.finish(p.index, reason);
                }
            }
        }
        let mut done = Vec::new();
        s.take_finished(&mut done);
        (plan, done)
    }

    /// Steps until idle (bounded); returns every finished sequence by id.
    fn run(s: &mut Scheduler) -> HashMap<u64, Sequence> {
        let mut done = HashMap::new();
        for _ in 0..10_000 {
            if s.is_idle() {
                return done;
            }
            let (plan, finished) = step(s);
            assert!(!plan.is_empty(), "a step with work scheduled nothing");
            done.extend(finished.into_iter().map(|q| (q.id, q)));
        }
        panic!("did not finish");
    }

    #[test]
    fn chunks_never_split_off_a_single_token() {
        assert_eq!(chunk_len(5, 10), 5);
        assert_eq!(chunk_len(1, 10), 1);
        assert_eq!(chunk_len(10, 4), 4);
        assert_eq!(chunk_len(5, 4), 3);
        assert_eq!(chunk_len(10, 1), 0);
        assert_eq!(chunk_len(3, 2), 0);
    }

    #[test]
    fn decodes_and_prefill_chunks_share_a_step_within_the_budget() {
        let mut s = scheduler(100, 8, 10);
        s.add(seq(1, 4, 5));
        let (plan, _) = step(&mut s);
        assert_eq!(plan.len(), 1);
        assert!(plan[0].wants_logits && plan[0].is_first_admission);
        // A long prompt arrives: one decode token for seq 1, 9 prompt tokens for seq 2.
        s.add(seq(2, 20, 5));
        let (plan, _) = step(&mut s);
        let got: Vec<_> = plan
            .iter()
            .map(|p| (p.seq_id, p.num_new_tokens, p.wants_logits))
            .collect();
        assert_eq!(got, vec![(1, 1, true), (2, 9, false)]);
        // Next: decode + the next chunk, and so on until seq 2's prompt is done.
        let (plan, _) = step(&mut s);
        assert_eq!(plan[1].num_new_tokens, 9);
        let (plan, _) = step(&mut s);
        assert_eq!((plan[1].num_new_tokens, plan[1].wants_logits), (2, true));
    }

    #[test]
    fn respects_the_running_limit() {
        let mut s = scheduler(100, 2, 100);
        for id in 1..=3 {
            s.add(seq(id, 3, 4));
        }
        let (plan, _) = step(&mut s);
        assert_eq!(plan.len(), 2);
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 1);
        let done = run(&mut s);
        assert_eq!(done.len(), 3);
    }

    #[test]
    fn preempts_the_newest_when_blocks_run_out_and_recomputes_it() {
        // 6 blocks of 4 tokens; three sequences of 4 + 8 tokens need 3 blocks each.
        let mut s = scheduler(6, 8, 64);
        let mut alone = HashMap::new();
        for id in 1..=3 {
            let mut solo = scheduler(6, 8, 64);
            solo.add(seq(id, 4, 8));
            alone.extend(run(&mut solo));
            s.add(seq(id, 4, 8));
        }
        let done = run(&mut s);
        assert!(s.num_preemptions() > 0, "the test should force preemption");
        for id in 1..=3 {
            assert_eq!(done[&id].token_ids, alone[&id].token_ids, "sequence {id}");
        }
        assert_eq!(s.block_manager().num_used(), 0);
    }

    #[test]
    fn preemption_victim_is_the_newest_and_goes_to_the_queue_head() {
        let mut s = scheduler(4, 8, 64);
        s.add(seq(1, 4, 8));
        s.add(seq(2, 4, 8));
        // Both prompts (1 block each) and their first tokens fit; then both grow.
        step(&mut s);
        step(&mut s);
        assert_eq!(s.num_running(), 2);
        for _ in 0..4 {
            step(&mut s);
        }
        assert_eq!(s.running()[0].id, 1);
        assert!(s
            .waiting()
            .next()
            .is_some_and(|q| q.id == 2 && q.num_preemptions > 0));
    }

    #[test]
    fn admission_starts_after_the_cached_prefix() {
        let mut s = scheduler(100, 8, 100);
        s.add(seq(1, 10, 1));
        run(&mut s);
        // Same 10-token prompt: 2 full blocks cached, the 2 remaining computed.
        s.add(seq(1, 10, 1));
        let (plan, _) = step(&mut s);
        assert_eq!(plan[0].num_new_tokens, 2);
        let stats = s.block_manager().stats();
        assert_eq!(stats.hits, 8);
        // A 9-token prompt sharing those blocks would leave one token: only 1 block hits.
        s.add(seq(1, 9, 1));
        let (plan, done) = step(&mut s);
        assert_eq!(plan[0].num_new_tokens, 5);
        assert_eq!(done[0].num_cached_prompt_tokens, Some(4));
    }

    #[test]
    fn abort_frees_blocks_wherever_the_sequence_is() {
        let mut s = scheduler(100, 1, 100);
        s.add(seq(1, 10, 50));
        s.add(seq(2, 10, 50));
        step(&mut s);
        assert!(s.block_manager().num_used() > 0);
        assert!(s.abort(1).is_some());
        assert!(s.abort(2).is_some());
        assert!(s.abort(3).is_none());
        assert!(s.is_idle());
        assert_eq!(s.block_manager().num_used(), 0);
    }

    #[test]
    fn many_sequences_under_pressure_all_finish_as_if_alone() {
        let mut s = scheduler(24, 6, 16);
        let mut alone = HashMap::new();
        for id in 1..=12u64 {
            let (p, m) = (3 + (id as usize * 5) % 17, 2 + (id as usize * 3) % 19);
            let mut solo = scheduler(24, 6, 16);
            solo.add(seq(id, p, m));
            alone.extend(run(&mut solo));
            s.add(seq(id, p, m));
        }
        let done = run(&mut s);
        assert_eq!(done.len(), 12);
        for (id, d) in &done {
            assert_eq!(d.token_ids, alone[id].token_ids);
        }
        assert_eq!(s.block_manager().num_used(), 0);
    }
}
