//! Where, inside the allocator, memory sits: jemalloc size classes (which
//! grow, which hold slab slack) and arenas (dirty pages), glibc arenas
//! (`malloc_info`: free chunks, system bytes).

use std::collections::BTreeMap;

use crate::report::{ArenaRow, ClassRow};
use amm_timeline::{Heap, JemallocStats, Tick};

/// Rows each list keeps.
const TOP: usize = 5;

fn je(t: &Tick) -> Option<&JemallocStats> {
    match &t.heap {
        Some(Heap::Jemalloc(h)) => Some(h),
        _ => None,
    }
}

/// jemalloc: purgeable pages (dirty + muzzy) and slab slack (active −
/// allocated) at one tick.
pub fn je_parts(t: &Tick) -> Option<(u64, u64)> {
    je(t).map(|h| {
        (
            h.dirty_bytes + h.muzzy_bytes,
            h.active.saturating_sub(h.allocated),
        )
    })
}

/// jemalloc size classes whose live bytes grew most from `a` to `b`.
pub fn class_growth(a: &Tick, b: &Tick) -> Vec<ClassRow> {
    let (Some(ha), Some(hb)) = (je(a), je(b)) else {
        return Vec::new();
    };
    let mut by: BTreeMap<(u64, &'static str), (u64, u64)> = BTreeMap::new();
    for (h, after) in [(ha, false), (hb, true)] {
        for (list, class) in [(&h.bins, "small"), (&h.large, "large")] {
            for c in list {
                let e = by.entry((c.size, class)).or_default();
                if after {
                    e.1 = c.count;
                } else {
                    e.0 = c.count;
                }
            }
        }
    }
    let mut rows: Vec<ClassRow> = by
        .into_iter()
        .map(|((size, class), (before, after))| ClassRow {
            size,
            class,
            count_before: before,
            count_after: after,
            live_delta_bytes: (after as i64 - before as i64) * size as i64,
            slack_bytes: 0,
            utilisation: 1.0,
        })
        .filter(|r| r.live_delta_bytes > 0)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.live_delta_bytes));
    rows.truncate(TOP);
    rows
}

/// jemalloc small size classes with the most slab slack at `t`.
pub fn class_slack(t: &Tick) -> Vec<ClassRow> {
    let Some(h) = je(t) else {
        return Vec::new();
    };
    let mut rows: Vec<ClassRow> = h
        .bins
        .iter()
        .map(|c| {
            let slab_total = c.slabs * c.slab();
            let live = c.count * c.size;
            ClassRow {
                size: c.size,
                class: "small",
                count_before: c.count,
                count_after: c.count,
                live_delta_bytes: 0,
                slack_bytes: slab_total.saturating_sub(live),
                utilisation: if slab_total > 0 {
                    live as f64 / slab_total as f64
                } else {
                    1.0
                },
            }
        })
        .filter(|r| r.slack_bytes > 0)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.slack_bytes));
    rows.truncate(TOP);
    rows
}

/// The arenas holding the most unused memory at `t`: jemalloc dirty +
/// muzzy pages, glibc free chunks; `delta` against `before` when given.
pub fn arenas(t: &Tick, before: Option<&Tick>) -> Vec<ArenaRow> {
    let mut rows: Vec<ArenaRow> = match &t.heap {
        Some(Heap::Jemalloc(h)) => h
            .arenas
            .iter()
            .map(|a| {
                let free = a.dirty_bytes + a.muzzy_bytes;
                let prev = before.and_then(je).and_then(|b| {
                    b.arenas
                        .iter()
                        .find(|x| x.arena == a.arena)
                        .map(|x| x.dirty_bytes + x.muzzy_bytes)
                });
                ArenaRow {
                    arena: a.arena,
                    free_bytes: free,
                    system_bytes: 0,
                    delta_bytes: prev.map(|p| free as i64 - p as i64),
                }
            })
            .filter(|r| r.free_bytes > 0)
            .collect(),
        Some(Heap::System(h)) => h
            .arenas
            .iter()
            .map(|a| {
                let prev = match before.and_then(|b| b.heap.as_ref()) {
                    Some(Heap::System(b)) => b
                        .arenas
                        .iter()
                        .find(|x| x.nr == a.nr)
                        .map(|x| x.system_bytes),
                    _ => None,
                };
                ArenaRow {
                    arena: a.nr,
                    free_bytes: a.fast_bytes + a.rest_bytes,
                    system_bytes: a.system_bytes,
                    delta_bytes: prev.map(|p| a.system_bytes as i64 - p as i64),
                }
            })
            .collect(),
        None => Vec::new(),
    };
    rows.sort_by_key(|r| std::cmp::Reverse(r.free_bytes));
    rows.truncate(TOP);
    rows
}

/// glibc arenas whose system bytes grew most from `a` to `b` (where a
/// glibc leak lives).
pub fn glibc_growth(a: &Tick, b: &Tick) -> Vec<ArenaRow> {
    let mut rows = arenas(b, Some(a));
    if !matches!(b.heap, Some(Heap::System(_))) {
        return Vec::new();
    }
    rows.retain(|r| r.delta_bytes.is_some_and(|d| d > 0));
    rows.sort_by_key(|r| std::cmp::Reverse(r.delta_bytes));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_timeline::SizeClass;

    fn tick(bins: Vec<SizeClass>) -> Tick {
        Tick {
            heap: Some(Heap::Jemalloc(JemallocStats {
                bins,
                ..JemallocStats::default()
            })),
            ..Tick::default()
        }
    }

    #[test]
    fn growth_and_slack_by_class() {
        let c = |size, count, slabs| SizeClass {
            size,
            count,
            slabs,
            slab_bytes: 0,
        };
        let a = tick(vec![c(64, 100, 2), c(1024, 10, 3)]);
        let b = tick(vec![c(64, 100, 2), c(1024, 1010, 300)]);
        let g = class_growth(&a, &b);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].size, 1024);
        assert_eq!(g[0].live_delta_bytes, 1000 * 1024);
        let s = class_slack(&a);
        // 3 slabs of 4 KiB for 10 KiB live; 2 slabs of 4 KiB for 6.4 KiB live
        assert_eq!(s[0].size, 1024);
        assert_eq!(s[0].slack_bytes, 3 * 4096 - 10 * 1024);
        assert!((s[0].utilisation - 10240.0 / 12288.0).abs() < 1e-9);
    }
}
