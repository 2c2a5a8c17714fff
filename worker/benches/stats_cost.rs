//! What the allocator statistics cost per monitor tick, as a fraction of a
//! 200 ms tick, while 8 threads allocate and free as fast as they can.
//!
//! ```sh
//! cargo bench -p amm-worker --bench stats_cost     # both allocators, one after the other
//! AMM_ALLOCATOR=system cargo bench -p amm-worker --bench stats_cost -- glibc/totals
//! ```
//!
//! Each allocator runs in its own process (the global allocator is chosen
//! once, at the first allocation): without `AMM_ALLOCATOR` the bench runs
//! itself twice. Per allocator and heap (`plain`: 256 MiB of 16 B–64 KiB
//! objects, a quarter freed; `fragmented`: 192 MiB of 16–256 B objects,
//! 90 % freed at random, the suite's fragmentation case), criterion times:
//!
//! * jemalloc `totals` (`epoch` + the totals a tick without a timeline
//!   reads) and `full` (+ per-arena pages and every size class, what a
//!   tick with `--timeline` reads);
//! * glibc `mallinfo2` alone, `totals` (+ the arenas' residency from
//!   `/proc/self/maps` and `mincore`) and `full` (+ `malloc_info`): every
//!   part read fresh, what each monitor tick did before;
//! * `tick-totals` and `tick-full`: what a monitor tick does now, one
//!   `HeapReader` kept from tick to tick (on glibc: the live bytes from
//!   `Dispatch`'s counts, residency with `mincore` over kept ranges, the
//!   expensive parts only within a 0.1 % CPU budget).
//!
//! Then it prints, for each, the mean wall time and the mean CPU time of the
//! calling thread as a percentage of 200 ms: over 50 reads back to back
//! for the fresh reads; for the `tick-*` reads over 150 ticks 200 ms apart
//! (30 s, so the budgeted reads count as often as they really run), after
//! a first read that is shown apart. On glibc it also times the allocation
//! path: a `malloc`+`free` pair through `Dispatch` (counted) against the
//! same pair called directly (not counted).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amm_alloc::HeapReader;
use amm_worker::alloc::{self, Allocator, Detail};
use criterion::Criterion;

#[global_allocator]
static GLOBAL: amm_worker::alloc::Dispatch = amm_worker::alloc::Dispatch;

const TICK: Duration = Duration::from_millis(200);
const BUSY_THREADS: usize = 8;

/// A tiny xorshift, so the bench needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// Fills a heap: `bytes` of objects of `lo..=hi` bytes, then frees
/// `fraction` of them at random. Returns the survivors (keep them alive).
fn heap(bytes: usize, lo: usize, hi: usize, fraction: f64, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    let mut v = Vec::new();
    let mut total = 0;
    while total < bytes {
        let n = rng.range(lo, hi);
        v.push(vec![1u8; n]);
        total += n;
    }
    let cut = (fraction * u64::MAX as f64) as u64;
    v.retain(|_| rng.next() >= cut);
    v
}

/// 8 threads that allocate and free objects of 16 B–16 KiB until stopped,
/// each keeping a working set of 1024 objects.
fn busy(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..BUSY_THREADS)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
                let mut set: Vec<Vec<u8>> = (0..1024).map(|_| vec![0u8; 64]).collect();
                while !stop.load(Ordering::Relaxed) {
                    let k = rng.range(0, set.len() - 1);
                    set[k] = vec![2u8; rng.range(16, 16 << 10)];
                }
                black_box(&set);
            })
        })
        .collect()
}

fn thread_cpu() -> Duration {
    Duration::from_micros(alloc::thread_cpu_us())
}

type Read = (&'static str, fn());

fn reads(a: Allocator) -> Vec<Read> {
    match a {
        Allocator::Jemalloc => vec![
            ("totals", || {
                black_box(alloc::heap_stats(Detail::Totals).ok());
            }),
            ("full", || {
                black_box(alloc::heap_stats(Detail::Full).ok());
            }),
        ],
        Allocator::System => vec![
            ("mallinfo2", || {
                // SAFETY: mallinfo2 has no preconditions.
                black_box(unsafe { libc::mallinfo2() });
            }),
            ("totals", || {
                black_box(alloc::heap_stats(Detail::Totals).ok());
            }),
            ("full", || {
                black_box(alloc::heap_stats(Detail::Full).ok());
            }),
        ],
    }
}

/// What a monitor tick reads now: a reader kept from tick to tick.
const TICK_READS: [(&str, Detail); 2] =
    [("tick-totals", Detail::Totals), ("tick-full", Detail::Full)];

/// Mean wall and CPU of one tick's read over 150 ticks 200 ms apart, after
/// a first read (returned apart).
fn ticks(reader: &mut HeapReader, detail: Detail) -> ((Duration, Duration), (Duration, Duration)) {
    let timed = |reader: &mut HeapReader| {
        let (w0, c0) = (Instant::now(), thread_cpu());
        black_box(reader.read(detail).ok());
        (w0.elapsed(), thread_cpu().saturating_sub(c0))
    };
    let first = timed(reader);
    let n = 150u32;
    let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        std::thread::sleep(TICK);
        let (w, c) = timed(reader);
        wall += w;
        cpu += c;
    }
    (first, (wall / n, cpu / n))
}

/// Nanoseconds per `malloc`+`free` pair of 16 B–4 KiB blocks: through the
/// global allocator (`Dispatch`, counted on glibc) and calling glibc
/// directly (not counted), interleaved rounds, medians.
fn alloc_path() -> (f64, f64) {
    const N: usize = 2_000_000;
    let sizes: Vec<usize> = {
        let mut rng = Rng(7);
        (0..1024).map(|_| rng.range(16, 4096)).collect()
    };
    let via_dispatch = || {
        let t = Instant::now();
        for i in 0..N {
            let layout = std::alloc::Layout::from_size_align(sizes[i % 1024], 8).expect("layout");
            // SAFETY: a non-zero layout; the block is freed with it at once.
            unsafe {
                let p = std::alloc::alloc(layout);
                black_box(p);
                std::alloc::dealloc(p, layout);
            }
        }
        t.elapsed().as_nanos() as f64 / N as f64
    };
    let direct = || {
        let t = Instant::now();
        for i in 0..N {
            // SAFETY: malloc's block is freed at once with free.
            unsafe {
                let p = libc::malloc(sizes[i % 1024]);
                black_box(p);
                libc::free(p);
            }
        }
        t.elapsed().as_nanos() as f64 / N as f64
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        a.push(via_dispatch());
        b.push(direct());
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (med(a), med(b))
}

/// Without `AMM_ALLOCATOR`: runs this bench once per allocator, each in its
/// own process (the global allocator is chosen at the first allocation).
fn run_per_allocator() -> ! {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find the bench binary to run it per allocator: {e}");
            std::process::exit(1);
        }
    };
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let mut failed = false;
    for a in ["jemalloc", "system"] {
        let status = std::process::Command::new(&exe)
            .args(&args)
            .env(alloc::ALLOCATOR_ENV, a)
            .status();
        failed |= !status.is_ok_and(|s| s.success());
    }
    std::process::exit(i32::from(failed));
}

/// One summary row: heap, read, mean wall time, mean CPU time.
type Row = (&'static str, &'static str, Duration, Duration);

/// Times every read on one heap while the busy threads run: criterion's
/// samples, and our own rows (`summary`) and first tick reads (`firsts`).
fn measure_heap(
    c: &mut Criterion,
    a: Allocator,
    group: &str,
    heap_name: &'static str,
    (summary, firsts): (&mut Vec<Row>, &mut Vec<Row>),
) {
    for (read_name, f) in reads(a) {
        c.bench_function(&format!("{group}/{heap_name}/{read_name}"), |b| b.iter(f));
        // our own summary: wall and this thread's CPU over 50 reads
        let n = 50;
        let (w0, c0) = (Instant::now(), thread_cpu());
        for _ in 0..n {
            f();
        }
        let wall = w0.elapsed() / n;
        let cpu = thread_cpu().saturating_sub(c0) / n;
        summary.push((heap_name, read_name, wall, cpu));
    }
    for (read_name, detail) in TICK_READS {
        let mut reader = HeapReader::new(a, TICK);
        c.bench_function(&format!("{group}/{heap_name}/{read_name}"), |b| {
            b.iter(|| black_box(reader.read(detail).ok()))
        });
        let mut reader = HeapReader::new(a, TICK);
        let (first, (wall, cpu)) = ticks(&mut reader, detail);
        firsts.push((heap_name, read_name, first.0, first.1));
        summary.push((heap_name, read_name, wall, cpu));
    }
}

/// Prints the rows as shares of a 200 ms tick, then the first reads.
fn print_summary(group: &str, summary: &[Row], firsts: &[Row]) {
    println!();
    println!("{group}, {BUSY_THREADS} threads busy: cost of one read, share of a 200 ms tick");
    println!(
        "{:<11} {:<10} {:>12} {:>8} {:>12} {:>8}",
        "heap", "read", "wall", "% tick", "cpu", "% tick"
    );
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / TICK.as_secs_f64();
    for (h, r, wall, cpu) in summary {
        println!(
            "{h:<11} {r:<12} {:>10.1}µs {:>7.3}% {:>10.1}µs {:>7.3}%",
            wall.as_secs_f64() * 1e6,
            pct(*wall),
            cpu.as_secs_f64() * 1e6,
            pct(*cpu)
        );
    }
    println!("first read of a new tick reader (once per worker):");
    for (h, r, wall, cpu) in firsts {
        println!(
            "{h:<11} {r:<12} {:>10.1}µs {:>10.1}µs cpu",
            wall.as_secs_f64() * 1e6,
            cpu.as_secs_f64() * 1e6
        );
    }
}

fn main() {
    let Some(name) = std::env::var_os(alloc::ALLOCATOR_ENV) else {
        run_per_allocator();
    };
    let a = alloc::active();
    let group = match a {
        Allocator::Jemalloc => "jemalloc",
        Allocator::System => "glibc",
    };
    eprintln!("allocator: {} ({name:?})", a.name());
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .configure_from_args();
    let (mut summary, mut firsts) = (Vec::new(), Vec::new());
    for (heap_name, build) in [
        ("plain", (256usize << 20, 16usize, 64usize << 10, 0.25f64)),
        ("fragmented", (192 << 20, 16, 256, 0.9)),
    ] {
        let keep = heap(build.0, build.1, build.2, build.3, 42);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = busy(stop.clone());
        std::thread::sleep(Duration::from_millis(200));
        measure_heap(&mut c, a, group, heap_name, (&mut summary, &mut firsts));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        drop(keep);
    }
    c.final_summary();
    print_summary(group, &summary, &firsts);
    if a == Allocator::System {
        let (counted, direct) = alloc_path();
        println!(
            "malloc+free pair, 16 B-4 KiB, one thread: {counted:.1} ns through Dispatch (counted), \
             {direct:.1} ns calling glibc directly ({:+.1} %)",
            100.0 * (counted / direct - 1.0)
        );
    }
}
