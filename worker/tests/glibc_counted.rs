//! On glibc, amm-worker's global allocator counts live bytes itself (so a
//! monitor tick needs no `mallinfo2`): the counts must say what glibc's own
//! `mallinfo2` says, for small blocks in the arenas, large mmapped ones,
//! reallocations, and blocks freed by another thread; and a tick's reader
//! must agree with a fresh full read without calling `mallinfo2` again.
//!
//! The global allocator is chosen at the process's first allocation, so
//! each test re-runs this binary with `AMM_ALLOCATOR=system` and checks in
//! that child.

use std::process::Command;
use std::time::Duration;

use amm_worker::alloc::{self, Allocator, Detail, glibc};

#[global_allocator]
static GLOBAL: amm_worker::alloc::Dispatch = amm_worker::alloc::Dispatch;

const CHILD: &str = "AMM_TEST_COUNTED_CHILD";

/// Runs `name` in a child on glibc; true when this is that child.
fn in_glibc_child(name: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        assert_eq!(alloc::active(), Allocator::System);
        return true;
    }
    let exe = std::env::current_exe().expect("this test binary");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(alloc::ALLOCATOR_ENV, "system")
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    false
}

/// `(uordblks, hblkhd)` from glibc and from the counts.
fn both() -> ((i64, i64), (i64, i64)) {
    let m = glibc::mallinfo();
    let c = glibc::counted::totals().expect("Dispatch counts on glibc");
    ((m.uordblks as i64, m.hblkhd as i64), (c.arena, c.mmapped))
}

/// The change of glibc's and of the counted bytes across `f`, arenas and
/// mmapped chunks.
fn deltas(f: impl FnOnce()) -> [(i64, i64); 2] {
    let (m0, c0) = both();
    f();
    let (m1, c1) = both();
    [(m1.0 - m0.0, c1.0 - c0.0), (m1.1 - m0.1, c1.1 - c0.1)]
}

/// glibc's thread cache holds up to 7 freed chunks of each of its 64 small
/// sizes (16 B to 1 KiB) per thread, about 230 KiB, which `mallinfo2`
/// still counts as in use and the counts (rightly) as freed.
const TCACHE: i64 = 7 * 16 * (64 * 65 / 2);

fn close(what: &str, (glibc, counted): (i64, i64), expect: i64) {
    let slack = TCACHE + (16 << 10);
    assert!(
        (glibc - counted).abs() <= slack + glibc.abs() / 100,
        "{what}: mallinfo2 moved {glibc}, the counts {counted}"
    );
    assert!(
        (glibc - expect).abs() <= slack + expect.abs() / 20,
        "{what}: mallinfo2 moved {glibc}, expected about {expect}"
    );
}

#[test]
fn counts_match_mallinfo2_for_small_large_and_reallocated_blocks() {
    if !in_glibc_child("counts_match_mallinfo2_for_small_large_and_reallocated_blocks") {
        return;
    }
    let mut small: Vec<Vec<u8>> = Vec::new();
    let mut large: Vec<Vec<u8>> = Vec::new();
    let [arena, mmapped] = deltas(|| {
        small = (0..20_000).map(|i| vec![1u8; 200 + i % 1800]).collect();
        // far above the mmap threshold (at most 32 MiB even once raised)
        large = (0..4).map(|_| vec![2u8; 40 << 20]).collect();
    });
    let small_bytes: i64 = small.iter().map(|v| v.len() as i64 + 8).sum();
    close("20k small blocks", arena, small_bytes);
    close("4 x 40 MiB blocks", mmapped, 4 * (40 << 20));

    let [arena, _] = deltas(|| {
        // grown by realloc, step by step, across the size classes
        for v in small.iter_mut().take(5000) {
            for _ in 0..4 {
                v.extend_from_slice(&[3u8; 300]);
            }
            v.shrink_to_fit();
        }
    });
    close("5000 blocks grown by realloc", arena, 5000 * 1200);

    let [arena, mmapped] = deltas(|| {
        // freed by another thread than the one that allocated them
        let moved = std::mem::take(&mut small);
        let big = std::mem::take(&mut large);
        std::thread::spawn(move || drop((moved, big)))
            .join()
            .expect("thread");
    });
    assert!(arena.0 < -(20 << 20), "nothing was freed: {arena:?}");
    close("all small blocks freed elsewhere", arena, arena.0);
    close("large blocks freed elsewhere", mmapped, -4 * (40 << 20));
}

#[test]
fn a_tick_reader_follows_the_heap_without_mallinfo2() {
    if !in_glibc_child("a_tick_reader_follows_the_heap_without_mallinfo2") {
        return;
    }
    let mut reader = glibc::Sampler::new(glibc::DEFAULT_BUDGET, Duration::from_secs(3600));
    let first = reader.stats(Detail::Totals).expect("first read");
    assert!(first.live_counted);
    let (_, at) = reader.last_mallinfo();
    let kept: Vec<Vec<u8>> = (0..50_000).map(|_| vec![5u8; 1000]).collect();
    let tick = reader.stats(Detail::Totals).expect("tick");
    assert_eq!(reader.last_mallinfo().1, at, "a tick read mallinfo2 again");
    let fresh = glibc::stats(Detail::Totals).expect("full read");
    let grew = tick.live() as i64 - first.live() as i64;
    assert!(grew >= 50_000 * 1000, "the tick missed the growth: {grew}");
    let off = tick.live() as i64 - fresh.live() as i64;
    assert!(
        off.abs() <= (256 << 10) + fresh.live() as i64 / 100,
        "tick live {} vs fresh mallinfo2 {}",
        tick.live(),
        fresh.live()
    );
    assert!(
        tick.arena_resident >= tick.uordblks * 9 / 10,
        "residency {} below what is live {}",
        tick.arena_resident,
        tick.uordblks
    );
    drop(kept);
}

#[test]
fn a_new_arena_is_found_at_the_next_tick() {
    if !in_glibc_child("a_new_arena_is_found_at_the_next_tick") {
        return;
    }
    // no budget limit, no floor: only the periodic rescan (every second)
    // is out of reach, so the heap is found because the counts say more is
    // live than the known heaps hold
    let mut reader = glibc::Sampler::new(1.0, Duration::ZERO);
    let first = reader.stats(Detail::Totals).expect("first read");
    let kept = std::thread::spawn(|| (0..40_000).map(|_| vec![6u8; 1000]).collect::<Vec<_>>())
        .join()
        .expect("thread");
    let tick = reader.stats(Detail::Totals).expect("tick");
    assert!(
        tick.arena_heaps > first.arena_heaps,
        "the thread's arena was not found: {} heaps before, {} after",
        first.arena_heaps,
        tick.arena_heaps
    );
    assert!(
        tick.arena_resident >= first.arena_resident + 35_000_000,
        "residency {} -> {}",
        first.arena_resident,
        tick.arena_resident
    );
    drop(kept);
}

/// Three threads allocating and freeing blocks of 64 KiB to 4 MiB (arena
/// and mmapped) until `stop`.
fn churn(stop: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kept: Vec<Vec<u8>> = Vec::new();
                let mut i = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    kept.push(vec![7u8; (64 << 10) << (i % 7)]);
                    if kept.len() > 4 {
                        kept.remove(i % 4);
                    }
                }
            })
        })
        .collect()
}

#[test]
fn reads_taken_while_other_threads_allocate_leave_the_live_bytes_true() {
    if !in_glibc_child("reads_taken_while_other_threads_allocate_leave_the_live_bytes_true") {
        return;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // mallinfo2 at every read, so many of them run while other threads
    // allocate and free; after each round, with nothing allocating, the
    // live bytes from the counts and the last quiet estimate (no new
    // mallinfo2) must be what a fresh mallinfo2 says
    let mut reader = glibc::Sampler::new(f64::INFINITY, Duration::ZERO);
    reader.stats(Detail::Totals).expect("first read");
    for round in 0..5 {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = churn(&stop);
        for _ in 0..100 {
            reader.stats(Detail::Totals).expect("read");
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("churn thread");
        }
        let u = reader.uncounted();
        eprintln!("round {round}: what the counts miss: {u:?}");
        let (arena, mmapped) = reader.live();
        let m = glibc::mallinfo();
        close(
            &format!("round {round}: live arena bytes"),
            (m.uordblks as i64, arena as i64),
            m.uordblks as i64,
        );
        close(
            &format!("round {round}: live mmapped bytes"),
            (m.hblkhd as i64, mmapped as i64),
            m.hblkhd as i64,
        );
    }
    let u = reader.uncounted();
    assert!(u.busy_reads > 0, "no read overlapped an allocation: {u:?}");
}
