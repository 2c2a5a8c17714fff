//! A minimal publisher of an allocator record, for trying readers (and for
//! the crate's tests): publishes a counter every interval and answers purge
//! requests, until its standard input closes.
//!
//! ```text
//! publish [--interval-ms N] [--hammer] [--forge KIND]
//! ```
//!
//! `--hammer` publishes without pause, every word of the statistics equal
//! to the publication number (a reader that sees two different words has
//! read a torn publication). `--forge KIND` publishes a record that a
//! reader must refuse: `magic`, `version`, `pid`, `start-time`, `unsealed`,
//! `unmapped`, `owner` (root only: the memfd belongs to uid 12345),
//! `stuck` (valid, but left mid-write). `--absurd` publishes a valid
//! record whose every statistic is `u64::MAX` (a broken or hostile
//! publisher a reader must survive) and says on its standard output who
//! asked each purge (`purge requested by PID`).

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use amm_record::layout::{MAGIC, RECORD_LEN, RawRecord, STATE_LIVE, STATS_WORDS, VERSION};
use amm_record::{Allocator, PurgeOutcome, PurgeReason, Stats, Writer};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// What the command line asked for.
struct Args {
    interval: Duration,
    hammer: bool,
    absurd: bool,
    forge: Option<String>,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        interval: Duration::from_millis(20),
        hammer: false,
        absurd: false,
        forge: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--interval-ms" => {
                args.interval = Duration::from_millis(it.next().ok_or("N?")?.parse()?)
            }
            "--hammer" => args.hammer = true,
            "--absurd" => args.absurd = true,
            "--forge" => args.forge = Some(it.next().ok_or("KIND?")?.clone()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // runs until stdin closes: the parent ends us by dropping it
            for _ in std::io::stdin().lock().lines() {}
            stop.store(true, Ordering::SeqCst);
        });
    }
    if let Some(kind) = &args.forge {
        let _keep = forged(kind)?;
        ready()?;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        return Ok(());
    }
    let mut w = Writer::create(Some(Allocator::Jemalloc), args.interval)?;
    ready()?;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        publish_once(&mut w, &args, n);
    }
    Ok(())
}

/// Publication `n`'s statistics: the counter, every word `n` (`--hammer`)
/// or every word `u64::MAX` (`--absurd`).
fn statistics(args: &Args, n: u64) -> Stats {
    if args.hammer {
        return bytemuck::cast([n; STATS_WORDS]);
    }
    let mut s: Stats = if args.absurd {
        bytemuck::cast([u64::MAX; STATS_WORDS])
    } else {
        let mut s = Stats::default();
        s.publication.count = n;
        s
    };
    s.publication.mono_ns = amm_record::sys::monotonic_ns();
    s
}

/// One publication, answering a purge request if one came.
fn publish_once(w: &mut Writer, args: &Args, n: u64) {
    let mut stats = statistics(args, n);
    let request = if args.hammer {
        w.pending_request()
    } else {
        w.wait_for_request(args.interval)
    };
    if args.hammer {
        // short, irregular pauses: reads overlap writes and still finish
        let us = if n.is_multiple_of(64) {
            1000
        } else {
            (n % 16) * 5
        };
        let until = std::time::Instant::now() + Duration::from_micros(us);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    let Some(r) = request else {
        w.publish(&stats);
        return;
    };
    if args.absurd {
        println!("purge requested by {}", r.requester_pid);
    }
    stats.purge.count = stats.purge.count.wrapping_add(1);
    stats.purge.last = PurgeOutcome {
        ticket: u64::from(r.ticket),
        reason: PurgeReason::Request.code(),
        requested_by_pid: u64::from(r.requester_pid),
        ..PurgeOutcome::default()
    };
    w.publish(&stats);
    w.answer(&r);
}

fn ready() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", std::process::id())?;
    out.flush()
}

/// A hand-made record with one thing wrong. Returns what must stay open.
fn forged(kind: &str) -> Result<(OwnedFd, Option<usize>), Box<dyn std::error::Error>> {
    let fd = memfd_create(
        amm_record::MEMFD_NAME,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    nix::unistd::ftruncate(&fd, RECORD_LEN as libc::off_t)?;
    if kind != "unsealed" {
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )?;
    }
    if kind == "owner" {
        nix::unistd::fchown(&fd, Some(nix::unistd::Uid::from_raw(12345)), None)?;
    }
    let len = std::num::NonZeroUsize::new(RECORD_LEN).ok_or("len")?;
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: a new shared mapping of a RECORD_LEN-byte memfd.
    let ptr = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, fd.as_fd(), 0) }?;
    // SAFETY: the mapping is RECORD_LEN bytes, page aligned, only atomics.
    let r: &RawRecord = unsafe { ptr.cast::<RawRecord>().as_ref() };
    let me = procfs::process::Process::myself()?;
    let start = me.stat()?.starttime;
    let h = &r.header;
    h.version.store(
        if kind == "version" { 99 } else { VERSION },
        Ordering::Relaxed,
    );
    h.size
        .store(size_of::<RawRecord>() as u32, Ordering::Relaxed);
    let pid = std::process::id() + u32::from(kind == "pid");
    h.pid.store(pid, Ordering::Relaxed);
    let start = start + u64::from(kind == "start-time");
    h.start_time.store(start, Ordering::Relaxed);
    h.allocator.store(2, Ordering::Relaxed);
    h.state.store(STATE_LIVE, Ordering::Relaxed);
    h.interval_ns.store(20_000_000, Ordering::Relaxed);
    if kind == "stuck" {
        r.seq.store(1, Ordering::Release);
    }
    let magic = if kind == "magic" { MAGIC ^ 1 } else { MAGIC };
    h.magic.store(magic, Ordering::Release);
    if kind == "unmapped" {
        // SAFETY: unmapping the mapping made above; r is not used after.
        unsafe { munmap(ptr, RECORD_LEN)? };
        return Ok((fd, None));
    }
    Ok((fd, Some(ptr.as_ptr() as usize)))
}
