//! The accounting split: DESIGN.md's vocabulary, one definition for the
//! worker, the agent's protocol, the timeline and the report.

use serde::{Deserialize, Serialize};

/// A process's memory at one instant, split by what holds it. For a
/// measurement taken at one instant, `process = managed + unmanaged_live +
/// hoarded + non_heap` to within the allocator's rounding and whatever
/// other threads changed while it was read ([`Split::identity_error`]).
/// `spilled` is not part of `process`; `unmanaged_recent` overlaps the
/// unmanaged parts.
///
/// A writer that cannot see managed data (a program amm did not write, read
/// through the preload library's record) puts 0 in `managed`: all live heap
/// memory is then unmanaged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Split {
    /// RSS as the kernel counts it (file + anon + shmem pages), bytes.
    pub process: u64,
    /// Sum of `sizeof` of the values held in memory (the SpillBuffer's, or
    /// Dask's managed memory), bytes.
    pub managed: u64,
    /// Live heap bytes that are not managed: task temporaries, caches,
    /// leaks.
    pub unmanaged_live: u64,
    /// Allocator-resident bytes that hold no live allocation: a purge/trim
    /// can give most of it back.
    pub hoarded: u64,
    /// RSS outside the allocator: code, stacks, mmaps made elsewhere.
    pub non_heap: u64,
    /// Managed bytes on disk (not part of `process`).
    pub spilled: u64,
    /// Unmanaged memory that appeared within `recent-to-old-time`.
    pub unmanaged_recent: u64,
}

impl Split {
    /// The split of a process of `process` RSS bytes whose allocator holds
    /// `heap_live` live and `allocator_resident` resident bytes, `managed`
    /// of them managed data (parts that would be negative are 0).
    pub fn of(process: u64, managed: u64, heap_live: u64, allocator_resident: u64) -> Split {
        Split {
            process,
            managed,
            unmanaged_live: heap_live.saturating_sub(managed),
            hoarded: allocator_resident.saturating_sub(heap_live),
            non_heap: process.saturating_sub(allocator_resident),
            spilled: 0,
            unmanaged_recent: 0,
        }
    }

    /// `(managed + unmanaged_live + hoarded + non_heap) - process`, bytes.
    pub fn identity_error(&self) -> i64 {
        let parts = [
            self.managed,
            self.unmanaged_live,
            self.hoarded,
            self.non_heap,
        ];
        let sum: i128 = parts.iter().map(|&p| i128::from(p)).sum();
        (sum - i128::from(self.process)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_of_its_parts_adds_up() {
        let s = Split::of(1000, 100, 400, 700);
        assert_eq!(
            (s.managed, s.unmanaged_live, s.hoarded, s.non_heap),
            (100, 300, 300, 300)
        );
        assert_eq!(s.identity_error(), 0);
        // managed above live (values put while the heap was read) clamps
        let s = Split::of(1000, 500, 400, 700);
        assert_eq!(s.unmanaged_live, 0);
        assert_eq!(s.identity_error(), 100);
    }
}
