//! Fixed-size blocks of the paged latent cache: a free list of physical block ids.

/// Hands out and takes back physical cache blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so blocks are handed out in increasing order.
        BlockAllocator {
            free: (0..num_blocks as u32).rev().collect(),
            num_blocks,
        }
    }

    /// Takes `n` blocks, or none if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(
            self.free
                .split_off(self.free.len() - n)
                .into_iter()
                .rev()
                .collect(),
        )
    }

    /// Returns blocks to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            assert!((b as usize) < self.num_blocks, "block {b} out of range");
            debug_assert!(!self.free.contains(&b), "block {b} released twice");
            self.free.push(b);
        }
    }

    /// Blocks currently free.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in total.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_and_releases() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.num_free(), 1);
        a.release(&x);
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.allocate(4).unwrap().len(), 4);
    }
}
