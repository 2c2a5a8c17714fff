//! The allocator's own statistics at one tick: jemalloc's `mallctl` totals
//! and detail, or glibc's `mallinfo2`, arena residency and `malloc_info`.
//! amm-worker reads them in-process (`worker/src/alloc/`); a program amm
//! did not write publishes them through the preload library's record
//! (`amm-record`), and whoever reads that record writes them here.

use serde::{Deserialize, Serialize};

/// The two allocators a worker can run on: the allocator record's type
/// (`amm-record`), so the record, the worker and the timeline name them
/// the same way.
pub use amm_record::Allocator;

/// What the allocator holds right now. In JSON, an object whose
/// `allocator` field (`system` or `jemalloc`) says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "allocator", rename_all = "lowercase")]
pub enum Heap {
    /// glibc malloc.
    System(GlibcStats),
    /// jemalloc.
    Jemalloc(JemallocStats),
}

impl Heap {
    /// Which allocator.
    pub fn allocator(&self) -> Allocator {
        match self {
            Heap::System(_) => Allocator::System,
            Heap::Jemalloc(_) => Allocator::Jemalloc,
        }
    }

    /// Bytes handed out and not yet freed (`heap_live`).
    pub fn live(&self) -> u64 {
        match self {
            Heap::System(s) => s.live(),
            Heap::Jemalloc(s) => s.allocated,
        }
    }

    /// Bytes the allocator holds in physically resident pages: live data,
    /// free-but-resident space, and its metadata.
    pub fn resident(&self) -> u64 {
        match self {
            Heap::System(s) => s.resident(),
            Heap::Jemalloc(s) => s.resident,
        }
    }

    /// Resident bytes holding no live allocation (`hoarded`).
    pub fn hoarded(&self) -> u64 {
        self.resident().saturating_sub(self.live())
    }

    /// What a purge can return right now: jemalloc's dirty and muzzy pages
    /// (its slab slack and metadata, also hoarded, stay); for glibc all of
    /// what is hoarded (only a trim tells how much comes back).
    pub fn purgeable(&self) -> u64 {
        match self {
            Heap::Jemalloc(s) => s.dirty_bytes.saturating_add(s.muzzy_bytes),
            Heap::System(_) => self.hoarded(),
        }
    }
}

/// jemalloc's view of the heap after an `epoch` advance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JemallocStats {
    /// `stats.allocated`: bytes in live allocations.
    pub allocated: u64,
    /// `stats.active`: bytes in active pages (allocated + slab slack).
    pub active: u64,
    /// `stats.resident`: bytes in physically resident pages the allocator maps
    /// (active + dirty + metadata).
    pub resident: u64,
    /// `stats.mapped`: bytes in active extents mapped by the allocator.
    pub mapped: u64,
    /// `stats.retained`: virtual memory kept mapped but returned to the OS.
    pub retained: u64,
    /// `stats.metadata`: bytes of allocator metadata.
    pub metadata: u64,
    /// Dirty pages of all arenas, in bytes (freed, still resident, purgeable).
    pub dirty_bytes: u64,
    /// Muzzy pages of all arenas, in bytes (`MADV_FREE`d, may still be resident).
    pub muzzy_bytes: u64,
    /// Per-arena dirty/muzzy pages (empty unless full detail was read).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arenas: Vec<ArenaPages>,
    /// Small size classes holding live regions (full detail only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bins: Vec<SizeClass>,
    /// Large size classes holding live extents (full detail only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub large: Vec<SizeClass>,
}

/// Unused pages of one jemalloc arena.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArenaPages {
    /// Arena index.
    pub arena: u32,
    /// Dirty bytes (`stats.arenas.<i>.pdirty` pages).
    pub dirty_bytes: u64,
    /// Muzzy bytes (`stats.arenas.<i>.pmuzzy` pages).
    pub muzzy_bytes: u64,
}

/// Live allocations of one jemalloc size class, merged over all arenas.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SizeClass {
    /// The class's allocation size in bytes.
    pub size: u64,
    /// Live regions (bins: `curregs`) or extents (large: `curlextents`).
    pub count: u64,
    /// Slabs currently holding regions (bins only; 0 for large classes).
    pub slabs: u64,
    /// Bytes of one slab of this class (`arenas.bin.<i>.slab_size`; bins
    /// only, 0 for large classes and in timelines that predate it).
    pub slab_bytes: u64,
}

impl SizeClass {
    /// Bytes of one slab: `slab_bytes`, else jemalloc 5's rule (the least
    /// common multiple of the size and a 4 KiB page).
    pub fn slab(&self) -> u64 {
        if self.slab_bytes > 0 {
            self.slab_bytes
        } else if self.size > 0 {
            lcm(self.size, 4096)
        } else {
            0
        }
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// glibc malloc's view of the heap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GlibcStats {
    /// `arena`: bytes obtained with brk/heap mappings (all arenas).
    pub arena: u64,
    /// `ordblks`: number of free chunks.
    pub ordblks: u64,
    /// `hblks`: number of chunks served by `mmap`.
    pub hblks: u64,
    /// `hblkhd`: bytes in chunks served by `mmap`.
    pub hblkhd: u64,
    /// `uordblks`: bytes in live chunks of the arenas.
    pub uordblks: u64,
    /// `fordblks`: bytes in free chunks of the arenas (resident or not).
    pub fordblks: u64,
    /// `fsmblks`: bytes in free fastbin chunks.
    pub fsmblks: u64,
    /// `keepcost`: releasable bytes at the top of the main arena.
    pub keepcost: u64,
    /// Resident bytes of the arenas' heaps, counted with `mincore`.
    pub arena_resident: u64,
    /// How many arena heaps were found (the main `[heap]` plus the heaps of
    /// the other arenas).
    pub arena_heaps: u32,
    /// Whether `uordblks` and `hblkhd` come from the process's own counts
    /// (amm-worker counts its allocations) rather than from `mallinfo2`.
    pub live_counted: bool,
    /// Age of the `mallinfo2` reading the free-chunk numbers come from, ms
    /// (it runs within a CPU budget, not at every tick).
    pub mallinfo_age_ms: u64,
    /// Per-arena detail from `malloc_info` (full detail only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arenas: Vec<GlibcArena>,
}

impl GlibcStats {
    /// Live bytes: `uordblks + hblkhd`.
    pub fn live(&self) -> u64 {
        self.uordblks.saturating_add(self.hblkhd)
    }

    /// Allocator-resident bytes: resident arena pages plus mmapped chunks
    /// (never less than what is live).
    pub fn resident(&self) -> u64 {
        self.arena_resident
            .saturating_add(self.hblkhd)
            .max(self.live())
    }
}

/// One glibc arena as `malloc_info` describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GlibcArena {
    /// Arena number (0 is the main arena).
    pub nr: u32,
    /// Bytes in fastbin chunks.
    pub fast_bytes: u64,
    /// Bytes in the other free chunks.
    pub rest_bytes: u64,
    /// Bytes the arena currently has from the system.
    pub system_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_sizes_follow_jemalloc() {
        let c = |size| SizeClass {
            size,
            ..SizeClass::default()
        };
        assert_eq!(c(48).slab(), 12288);
        assert_eq!(c(80).slab(), 20480);
        assert_eq!(c(4096).slab(), 4096);
        assert_eq!(c(5120).slab(), 20480);
        assert_eq!(c(0).slab(), 0);
    }

    #[test]
    fn a_heap_names_its_allocator_in_json() {
        let h = Heap::Jemalloc(JemallocStats {
            allocated: 10,
            resident: 30,
            dirty_bytes: 8,
            ..JemallocStats::default()
        });
        let v = serde_json::to_value(&h).expect("json");
        assert_eq!(v["allocator"], "jemalloc");
        assert_eq!(v["allocated"], 10);
        assert!(v.get("bins").is_none(), "empty detail is left out");
        let back: Heap = serde_json::from_value(v).expect("back");
        assert_eq!(back, h);
        assert_eq!((back.live(), back.hoarded(), back.purgeable()), (10, 20, 8));
        let g: Heap = serde_json::from_str(
            r#"{"allocator":"system","uordblks":5,"hblkhd":5,"arena_resident":40}"#,
        )
        .expect("glibc");
        assert_eq!((g.live(), g.resident(), g.hoarded()), (10, 45, 35));
        assert_eq!("glibc".parse::<Allocator>(), Ok(Allocator::System));
        assert!("tcmalloc".parse::<Allocator>().is_err());
    }
}
