//! Host (CPU) KV blocks for swap preemption. The scheduler only tracks which host block holds
//! which request's data; the executor performs the copies it is told about. A plain free stack:
//! host blocks are never shared or cached.

use crate::ids::HostBlockId;

/// A pool of host blocks.
#[derive(Debug, Clone)]
pub struct HostBlockPool {
    free: Vec<HostBlockId>,
    total: u32,
}

impl HostBlockPool {
    /// `n` free host blocks.
    pub fn new(n: u32) -> Self {
        HostBlockPool {
            free: (0..n).rev().map(HostBlockId).collect(),
            total: n,
        }
    }

    /// Free host blocks.
    pub fn num_free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Total host blocks.
    pub fn num_blocks(&self) -> u32 {
        self.total
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: u32) -> Option<Vec<HostBlockId>> {
        let n = n as usize;
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn free(&mut self, blocks: &[HostBlockId]) {
        self.free.extend_from_slice(blocks);
        debug_assert!(
            self.free.len() <= self.total as usize,
            "host block double free"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_blocks_are_all_or_nothing_and_come_back() {
        let mut h = HostBlockPool::new(3);
        assert!(h.allocate(4).is_none());
        let a = h.allocate(2).unwrap();
        assert_eq!(h.num_free(), 1);
        h.free(&a);
        assert_eq!(h.num_free(), 3);
    }
}
