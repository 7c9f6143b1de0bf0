//! Fixed-size blocks of the paged latent cache: a free list, reference counts and
//! prefix caching.
//!
//! A *full* block whose tokens are all computed is keyed by the hash of (the previous
//! block's key, its token ids), so equal prefixes of different requests map to the same
//! physical blocks (DeepSeek's context caching). Blocks are reference counted: a cached
//! block may be shared by several sequences. A block whose count drops to zero goes back
//! to the free list but keeps its contents and its key, so a later request can still hit
//! it; allocation takes free blocks least recently used first, evicting their keys.
//! Blocks that were never keyed go to the front of the free list (they hold nothing
//! worth keeping), keyed blocks to the back.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::sequence::Sequence;

/// Key of a full block: a hash of the previous block's key and the block's token ids.
pub type BlockHash = u64;

/// Sentinel for "no block" in the free list's links.
const NIL: u32 = u32::MAX;

/// The key of a full block after the block keyed `parent` (`None` for the first block).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed zero keys: the same key for the same content across requests.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What a keyed block holds, kept to rule out hash collisions on a hit.
#[derive(Debug, Clone)]
struct BlockKey {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    key: Option<BlockKey>,
    /// Free-list links (meaningful while `ref_count == 0`).
    prev: u32,
    next: u32,
}

/// Counters of the prefix cache, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up on admission.
    pub queries: u64,
    /// Of those, tokens found in the cache.
    pub hits: u64,
}

/// Hands out cache blocks to sequences; owns the prefix cache's index.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Head (next to allocate) and tail (most recently freed keyed block) of the free list.
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, u32>,
    enable_prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl BlockManager {
    /// `num_blocks` free blocks of `block_size` tokens.
    ///
    /// # Panics
    /// If `block_size` is 0 or `num_blocks` does not fit block ids (`u32`).
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks < NIL as usize, "too many blocks");
        let blocks = (0..num_blocks as u32)
            .map(|i| Block {
                ref_count: 0,
                key: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i as usize + 1 == num_blocks {
                    NIL
                } else {
                    i + 1
                },
            })
            .collect();
        BlockManager {
            block_size,
            blocks,
            head: if num_blocks == 0 { NIL } else { 0 },
            tail: if num_blocks == 0 {
                NIL
            } else {
                num_blocks as u32 - 1
            },
            num_free: num_blocks,
            cached: HashMap::new(),
            enable_prefix_caching,
            stats: PrefixCacheStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in total.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not held by any sequence (including cached blocks that may be evicted).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    /// Blocks registered in the prefix cache (held or free).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks a table needs to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The leading full blocks of `tokens` found in the prefix cache, with their keys;
    /// at most `max_tokens` tokens' worth.
    pub fn lookup_prefix(&self, tokens: &[u32], max_tokens: usize) -> Vec<(u32, BlockHash)> {
        let mut found = Vec::new();
        if !self.enable_prefix_caching {
            return found;
        }
        let mut parent = None;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(self.block_size) {
            let hash = hash_block(parent, chunk);
            let Some(&block) = self.cached.get(&hash) else {
                break;
            };
            let key = self.blocks[block as usize].key.as_ref();
            if !key.is_some_and(|k| k.parent == parent && *k.tokens == *chunk) {
                break; // a hash collision: treat as a miss
            }
            found.push((block, hash));
            parent = Some(hash);
        }
        found
    }

    /// True if `prefix` (from [`lookup_prefix`](Self::lookup_prefix)) can be taken and
    /// `num_new_blocks` fresh blocks allocated now.
    pub fn can_allocate(&self, prefix: &[(u32, BlockHash)], num_new_blocks: usize) -> bool {
        // A hit on a free block takes it off the free list.
        let free_hits = prefix
            .iter()
            .filter(|(b, _)| self.blocks[*b as usize].ref_count == 0)
            .count();
        self.num_free >= num_new_blocks + free_hits
    }

    /// Gives a sequence with no blocks the cached `prefix` blocks, marks those tokens
    /// computed and records the lookup of its first `queried_tokens` tokens in the stats.
    pub fn acquire_prefix(
        &mut self,
        seq: &mut Sequence,
        prefix: &[(u32, BlockHash)],
        queried_tokens: usize,
    ) {
        assert!(
            seq.block_table.is_empty(),
            "sequence {} holds blocks",
            seq.id
        );
        for &(block, hash) in prefix {
            self.take_ref(block);
            seq.block_table.push(block);
            seq.block_hashes.push(hash);
        }
        let hit = prefix.len() * self.block_size;
        seq.num_computed_tokens = hit;
        if self.enable_prefix_caching {
            self.stats.queries += queried_tokens as u64;
            self.stats.hits += hit as u64;
        }
    }

    /// Appends fresh blocks to `seq`'s table so it holds `num_tokens` tokens.
    ///
    /// # Panics
    /// If fewer blocks are free than needed: check [`can_allocate`](Self::can_allocate).
    pub fn grow(&mut self, seq: &mut Sequence, num_tokens: usize) {
        let needed = self.blocks_for(num_tokens);
        while seq.block_table.len() < needed {
            let block = self.pop_free().expect("grow called without free blocks");
            seq.block_table.push(block);
        }
    }

    /// Registers the full, computed blocks of `seq` that are not keyed yet.
    pub fn cache_full_blocks(&mut self, seq: &mut Sequence) {
        let num_full = seq.num_computed_tokens / self.block_size;
        while seq.block_hashes.len() < num_full {
            let i = seq.block_hashes.len();
            let parent = seq.block_hashes.last().copied();
            let tokens = &seq.token_ids[i * self.block_size..(i + 1) * self.block_size];
            let hash = hash_block(parent, tokens);
            seq.block_hashes.push(hash);
            if !self.enable_prefix_caching {
                continue;
            }
            let block = seq.block_table[i];
            let entry = &mut self.blocks[block as usize];
            if entry.key.is_some() || self.cached.contains_key(&hash) {
                // Already keyed (a hit), or the same content lives in another block.
                continue;
            }
            entry.key = Some(BlockKey {
                hash,
                parent,
                tokens: tokens.into(),
            });
            self.cached.insert(hash, block);
        }
    }

    /// Returns all of `seq`'s blocks, last block first so that a sequence's tail is
    /// evicted before its (more shareable) head.
    pub fn free(&mut self, seq: &mut Sequence) {
        for &block in seq.block_table.iter().rev() {
            self.drop_ref(block);
        }
        seq.block_table.clear();
        seq.block_hashes.clear();
        seq.num_computed_tokens = 0;
    }

    fn take_ref(&mut self, block: u32) {
        if self.blocks[block as usize].ref_count == 0 {
            self.unlink(block);
        }
        self.blocks[block as usize].ref_count += 1;
    }

    fn drop_ref(&mut self, block: u32) {
        let b = &mut self.blocks[block as usize];
        assert!(b.ref_count > 0, "block {block} freed twice");
        b.ref_count -= 1;
        if b.ref_count == 0 {
            if b.key.is_some() {
                self.push_back(block);
            } else {
                self.push_front(block);
            }
        }
    }

    /// Takes the least recently used free block, evicting its key.
    fn pop_free(&mut self) -> Option<u32> {
        if self.head == NIL {
            return None;
        }
        let block = self.head;
        self.unlink(block);
        let b = &mut self.blocks[block as usize];
        b.ref_count = 1;
        if let Some(key) = b.key.take() {
            if self.cached.get(&key.hash) == Some(&block) {
                self.cached.remove(&key.hash);
            }
        }
        Some(block)
    }

    fn unlink(&mut self, block: u32) {
        let (prev, next) = {
            let b = &self.blocks[block as usize];
            (b.prev, b.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        let b = &mut self.blocks[block as usize];
        b.prev = NIL;
        b.next = NIL;
        self.num_free -= 1;
    }

    fn push_back(&mut self, block: u32) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[block as usize];
            b.prev = tail;
            b.next = NIL;
        }
        match tail {
            NIL => self.head = block,
            t => self.blocks[t as usize].next = block,
        }
        self.tail = block;
        self.num_free += 1;
    }

    fn push_front(&mut self, block: u32) {
        let head = self.head;
        {
            let b = &mut self.blocks[block as usize];
            b.prev = NIL;
            b.next = head;
        }
        match head {
            NIL => self.tail = block,
            h => self.blocks[h as usize].prev = block,
        }
        self.head = block;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::StopConditions;

    const BS: usize = 4;

    fn seq(id: u64, tokens: &[u32]) -> Sequence {
        let stop = StopConditions {
            max_tokens: 100,
            stop_token_ids: vec![],
        };
        Sequence::new(id, tokens.to_vec(), stop, 1000)
    }

    /// Admits `s` as the scheduler does: prefix lookup, then fresh blocks; marks all of
    /// it computed and keys its full blocks.
    fn admit(m: &mut BlockManager, s: &mut Sequence) -> usize {
        let prefix = m.lookup_prefix(&s.token_ids, s.len() - 1);
        let need = m.blocks_for(s.len()) - prefix.len();
        assert!(m.can_allocate(&prefix, need));
        m.acquire_prefix(s, &prefix, s.len());
        let hit = s.num_computed_tokens;
        m.grow(s, s.len());
        s.num_computed_tokens = s.len();
        m.cache_full_blocks(s);
        hit
    }

    #[test]
    fn allocates_and_frees_everything() {
        let mut m = BlockManager::new(4, BS, false);
        let mut a = seq(1, &[1; 10]);
        assert_eq!(admit(&mut m, &mut a), 0);
        assert_eq!(a.block_table, vec![0, 1, 2]);
        assert_eq!(m.num_free(), 1);
        assert!(!m.can_allocate(&[], 2));
        m.free(&mut a);
        assert_eq!(m.num_free(), 4);
        assert!(a.block_table.is_empty());
    }

    #[test]
    fn shares_full_prefix_blocks_and_counts_hits() {
        let mut m = BlockManager::new(8, BS, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        admit(&mut m, &mut a);
        assert_eq!(m.num_cached(), 2);
        // Same first 8 tokens, different tail: two blocks shared.
        let mut b = seq(2, &[1, 2, 3, 4, 5, 6, 7, 8, 42, 43]);
        assert_eq!(admit(&mut m, &mut b), 8);
        assert_eq!(b.block_table[..2], a.block_table[..2]);
        assert_ne!(b.block_table[2], a.block_table[2]);
        assert_eq!(m.num_used(), 4);
        assert_eq!(
            m.stats(),
            PrefixCacheStats {
                queries: 19,
                hits: 8
            }
        );
        // A different first block shares nothing, even with an equal second block.
        let mut c = seq(3, &[9, 9, 9, 9, 5, 6, 7, 8, 1]);
        assert_eq!(admit(&mut m, &mut c), 0);
        // Freeing one holder keeps the shared blocks held by the other.
        m.free(&mut a);
        // (2 shared + 1 of b) + 3 of c.
        assert_eq!(m.num_used(), 3 + 3);
    }

    #[test]
    fn never_hits_past_the_lookup_limit() {
        let mut m = BlockManager::new(8, BS, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        admit(&mut m, &mut a);
        // The same 8 tokens again: only the first block may be reused, so that the
        // last token is computed (its logits are needed).
        let b = seq(2, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(m.lookup_prefix(&b.token_ids, 7).len(), 1);
        assert_eq!(m.lookup_prefix(&b.token_ids, 8).len(), 2);
    }

    #[test]
    fn free_cached_blocks_are_reused_then_evicted_lru() {
        let mut m = BlockManager::new(4, BS, true);
        let mut a = seq(1, &[1, 1, 1, 1, 2, 2, 2, 2]);
        admit(&mut m, &mut a);
        m.free(&mut a);
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.num_cached(), 2);
        // A hit on a free cached block takes it back without recomputation.
        let mut b = seq(2, &[1, 1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(admit(&mut m, &mut b), 8);
        m.free(&mut b);
        // Unkeyed blocks are handed out before keyed ones; then keyed blocks, least
        // recently freed first. b freed its blocks tail first: [x, 2-block, 1-block].
        let mut c = seq(3, &[7; 12]);
        admit(&mut m, &mut c);
        assert_eq!(m.num_free(), 1);
        assert_eq!(m.num_cached(), 1 + 3);
        // The [1,1,1,1] block was freed last and survives; [2,2,2,2] was evicted.
        assert_eq!(m.lookup_prefix(&[1, 1, 1, 1, 2, 2, 2, 2, 3], 8).len(), 1);
    }

    #[test]
    fn eviction_removes_the_key() {
        let mut m = BlockManager::new(2, BS, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        admit(&mut m, &mut a);
        m.free(&mut a);
        let mut b = seq(2, &[8; 8]);
        admit(&mut m, &mut b);
        assert_eq!(m.lookup_prefix(&[1, 2, 3, 4, 5], 4).len(), 0);
        m.free(&mut b);
        assert_eq!(m.num_free(), 2);
    }
}
