//! The BPF probe against the real kernel: load, attach, watch real child
//! processes, and check what it reports against /proc. Needs root.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use amm_agent::probe::{EventReader, Probe};
use amm_ebpf::{EventKind, Level, WatchConfig};
use amm_integration_tests::{Faulter, TestUser, bpf_object, require_root, spawn_at_pid};
use amm_protocol::{EventMessage, Fractions};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::uio::{RemoteIoVec, process_vm_writev};
use nix::unistd::Pid;

const MIB: u64 = 1 << 20;

fn page() -> u64 {
    amm_protocol::sys::page_size() as u64
}

/// A watch of `pid` (bound to the process running now) with Dask's
/// thresholds of `limit`.
fn config(pid: u32, limit: u64) -> WatchConfig {
    let t = Fractions::default()
        .to_bytes(limit)
        .expect("valid thresholds");
    let pinned = amm_agent::identity::pin(pid).expect("the process runs");
    amm_agent::probe::watch_config(&t, Duration::ZERO, 0, 0, &pinned.binding())
}

fn load() -> (Probe, EventReader) {
    let mut p = Probe::load(Some(&bpf_object())).expect("load and attach the probe");
    let r = p.take_events().expect("ring buffer");
    (p, r)
}

/// Events for `pid` until `done` says stop or `timeout` passes.
fn collect(
    reader: &mut EventReader,
    pid: u32,
    timeout: Duration,
    mut done: impl FnMut(&[EventMessage]) -> bool,
) -> Vec<EventMessage> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        while let Some(raw) = reader.next_event() {
            if let Some(m) = EventMessage::from_kernel(&raw)
                && m.pid == pid
            {
                out.push(m);
            }
        }
        if done(&out) || Instant::now() > deadline {
            return out;
        }
        // a wait, not a check: an error or a timeout reads the ring again
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(50u8));
    }
}

fn levels(events: &[EventMessage]) -> Vec<(Level, Level)> {
    events
        .iter()
        .filter(|e| e.event == EventKind::Level)
        .map(|e| (e.prev_level, e.level))
        .collect()
}

#[test]
fn events_carry_the_right_rss_and_the_peak_is_vmhwm() {
    if !require_root("events_carry_the_right_rss_and_the_peak_is_vmhwm") {
        return;
    }
    let (mut probe, mut reader) = load();
    let mut f = Faulter::spawn().expect("amm-fault");
    let pid = f.pid();
    let (_, rss0) = f.hwm_rss().expect("status");
    let limit = rss0 + 400 * MIB;
    let cfg = config(pid, limit);
    probe.watch(pid, cfg).expect("watch");

    // 300 MiB more: past spill (70 % = 280 MiB above the base), below pause
    f.cmd("touch 300").expect("touch");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Below, Level::Spill)], "{ev:#?}");
    let up = &ev[0];
    assert!(
        up.rss_bytes >= cfg.spill_bytes && up.rss_bytes < cfg.spill_bytes + 16 * page(),
        "the spill event came at {} bytes, threshold {}: not at page resolution",
        up.rss_bytes,
        cfg.spill_bytes
    );
    assert!(!up.foreign);
    // the kernel's amm_level_of (C) and amm-protocol's agree at the crossing
    let t = Fractions::default().to_bytes(limit).expect("valid");
    assert_eq!(t.level_of(up.rss_bytes), up.level);
    assert_eq!(t.level_of(up.rss_bytes - page()), Level::Below);

    f.cmd("touch 50").expect("touch");
    let (hwm, rss) = f.hwm_rss().expect("status");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Spill, Level::Pause)], "{ev:#?}");
    let state = probe.watch_of(pid).expect("still watched").state;
    assert!(
        state.rss_bytes.abs_diff(rss) <= 4 * page(),
        "map says rss {} but /proc says VmRSS {rss}",
        state.rss_bytes
    );
    assert!(
        state.peak_rss_bytes.abs_diff(hwm) <= 4 * page(),
        "map says peak {} but /proc says VmHWM {hwm}",
        state.peak_rss_bytes
    );

    f.exit().expect("exit");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| {
        e.iter().any(|x| x.event == EventKind::Exit)
    });
    let exit = ev
        .iter()
        .find(|e| e.event == EventKind::Exit)
        .expect("an exit event");
    // the exit path itself may fault a few more pages (code of the exit
    // handlers) after the last VmHWM reading, never fewer
    assert!(
        exit.peak_rss_bytes >= state.peak_rss_bytes
            && exit.peak_rss_bytes - state.peak_rss_bytes <= 64 * page(),
        "exit peak {} vs peak {} when VmHWM was {hwm}",
        exit.peak_rss_bytes,
        state.peak_rss_bytes
    );
    // one fault per touched page at least
    let faults = exit.faults.expect("an exit carries the fault count");
    assert!(
        faults >= 350 * MIB / page(),
        "only {faults} faults counted for 350 MiB of pages"
    );
    // the program removed its entries itself at exit
    assert!(probe.watch_of(pid).is_none());
    probe.unwatch(pid).expect("clear the bit");
    assert_eq!(probe.entry_counts().expect("counts"), (0, 0, 0, 0));
}

#[test]
fn a_downward_crossing_rearms_the_levels() {
    if !require_root("a_downward_crossing_rearms_the_levels") {
        return;
    }
    let (mut probe, mut reader) = load();
    let mut f = Faulter::spawn().expect("amm-fault");
    let pid = f.pid();
    let (_, rss0) = f.hwm_rss().expect("status");
    let cfg = config(pid, rss0 + 200 * MIB);
    probe.watch(pid, cfg).expect("watch");

    f.cmd("touch 150").expect("touch");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Below, Level::Spill)], "{ev:#?}");
    f.cmd("free").expect("free");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Spill, Level::Below)], "{ev:#?}");
    assert!(
        ev[0].rss_bytes < cfg.rearm_bytes,
        "fell back at {} which is not below re-arm {}",
        ev[0].rss_bytes,
        cfg.rearm_bytes
    );
    // re-armed: the same crossing is reported again
    f.cmd("touch 150").expect("touch");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Below, Level::Spill)], "{ev:#?}");
    // between re-arm and spill nothing is reported: hysteresis
    f.cmd("free").expect("free");
    f.cmd("touch 130").expect("touch");
    let ev = collect(&mut reader, pid, Duration::from_millis(500), |_| false);
    assert_eq!(
        levels(&ev),
        vec![(Level::Spill, Level::Below)],
        "only the fall below re-arm, no crossing under spill: {ev:#?}"
    );
    f.exit().expect("exit");
}

fn pidfd(pid: u32) -> std::os::fd::OwnedFd {
    amm_agent::identity::pidfd_open(pid).expect("pidfd")
}

/// Writes `len` bytes into another process's memory at `addr` (faulting
/// its pages from this task, so the kernel reports `curr == 0`).
fn write_into(pid: u32, addr: usize, len: usize) {
    let buf = vec![7u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = buf.len().min(len - done);
        let remote = RemoteIoVec {
            base: addr + done,
            len: n,
        };
        let w = process_vm_writev(
            Pid::from_raw(pid as i32),
            &[IoSlice::new(&buf[..n])],
            &[remote],
        );
        match w {
            Ok(w) if w > 0 => done += w,
            other => panic!("process_vm_writev: {other:?}"),
        }
    }
}

/// Asks the kernel to reclaim a range of another process's memory.
fn page_out(pid: u32, addr: usize, len: usize) {
    let fd = pidfd(pid);
    let iov = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: valid pidfd and iovec; MADV_PAGEOUT (21) only hints reclaim.
    let r = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            fd.as_raw_fd(),
            &iov as *const libc::iovec,
            1usize,
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    assert!(
        r >= 0,
        "process_madvise: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn updates_by_other_tasks_are_attributed_to_the_watched_process() {
    if !require_root("updates_by_other_tasks_are_attributed_to_the_watched_process") {
        return;
    }
    let (mut probe, mut reader) = load();
    let mut f = Faulter::spawn().expect("amm-fault");
    let pid = f.pid();
    let (_, rss0) = f.hwm_rss().expect("status");
    let cfg = config(pid, rss0 + 100 * MIB);
    // untouched memory, then the watch, then pages faulted by *this* task:
    // the child makes no RSS update of its own, so the watch must be found
    // through the mm alone
    let addr: usize = f.cmd("reserve 75").expect("reserve").parse().expect("addr");
    probe.watch(pid, cfg).expect("watch");
    write_into(pid, addr, 75 << 20);
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Below, Level::Spill)], "{ev:#?}");
    assert!(
        ev[0].foreign,
        "the crossing came from process_vm_writev: {ev:#?}"
    );
    let state = probe.watch_of(pid).expect("watched").state;
    assert!(state.foreign_updates > 0);

    // a file the child maps and reads (FILE pages), then reclaimed by this
    // task with process_madvise(MADV_PAGEOUT): RSS goes down with curr == 0
    f.cmd("free").expect("free");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Spill, Level::Below)], "{ev:#?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pages");
    std::fs::write(&path, vec![1u8; 75 << 20]).expect("write the file");
    let reply = f
        .cmd(&format!("file {} 75", path.display()))
        .expect("map the file");
    let mut it = reply.split_whitespace().map(str::parse::<usize>);
    let (Some(Ok(faddr)), Some(Ok(flen))) = (it.next(), it.next()) else {
        panic!("bad reply {reply:?}");
    };
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Below, Level::Spill)], "{ev:#?}");
    assert!(!ev[0].foreign, "the child read the file itself");
    page_out(pid, faddr, flen);
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(levels(&ev), vec![(Level::Spill, Level::Below)], "{ev:#?}");
    assert!(
        ev[0].foreign,
        "reclaim by another task is curr == 0: {ev:#?}"
    );
    let (_, rss) = f.hwm_rss().expect("status");
    let state = probe.watch_of(pid).expect("watched").state;
    assert!(
        state.rss_bytes.abs_diff(rss) <= 16 * page(),
        "map rss {} vs VmRSS {rss} after reclaim",
        state.rss_bytes
    );
    f.exit().expect("exit");
}

#[test]
fn a_spike_is_announced_before_terminate() {
    if !require_root("a_spike_is_announced_before_terminate") {
        return;
    }
    let (mut probe, mut reader) = load();
    let mut f = Faulter::spawn().expect("amm-fault");
    let pid = f.pid();
    let (_, rss0) = f.hwm_rss().expect("status");
    let mut cfg = config(pid, rss0 + 1024 * MIB);
    // any growth that would reach terminate within 10 s is a spike
    cfg.spike_horizon_ns = 10_000_000_000;
    probe.watch(pid, cfg).expect("watch");
    f.cmd("touch 600").expect("touch");
    let ev = collect(&mut reader, pid, Duration::from_secs(10), |e| {
        e.iter().any(|x| x.event == EventKind::Spike)
    });
    let spike = ev
        .iter()
        .find(|e| e.event == EventKind::Spike)
        .expect("a spike alarm");
    assert!(spike.rate_bytes_per_ms > 0);
    let eta = spike.eta_ns.expect("eta");
    assert!(eta <= cfg.spike_horizon_ns, "eta {eta} beyond the horizon");
    assert!(spike.rss_bytes < cfg.terminate_bytes);
    f.exit().expect("exit");
}

#[test]
fn a_recycled_pid_never_matches_a_watch_and_is_never_signalled() {
    if !require_root("a_recycled_pid_never_matches_a_watch_and_is_never_signalled") {
        return;
    }
    let user = TestUser::create("r").expect("user");
    let (mut probe, mut reader) = load();
    let first = Faulter::spawn().expect("amm-fault");
    let pid = first.pid();
    // terminate at 95 % of 64 MiB, with SIGKILL, on both rings
    let t = Fractions::default().to_bytes(64 * MIB).expect("valid");
    let pinned = amm_agent::identity::pin(pid).expect("running");
    let cfg = amm_agent::probe::watch_config(
        &t,
        Duration::from_millis(200),
        amm_ebpf::WATCH_SIGNAL_ON_TERMINATE,
        9,
        &pinned.binding(),
    );
    let ring_fd = probe.client_ring(pid).expect("a client ring");
    let mut ring =
        amm_protocol::ring::RingReader::new(ring_fd, amm_ebpf::CLIENT_RING_BYTES as usize)
            .expect("map the ring");
    probe.watch(pid, cfg).expect("watch");
    // the first process's exit goes unseen (as when a registration races
    // it), and its pid goes to another user's process
    probe.detach().expect("detach");
    first.kill();
    let mut second = spawn_at_pid(pid, || Faulter::spawn_as(user.uid, user.gid))
        .expect("the pid could be steered through ns_last_pid");
    probe.attach().expect("attach");
    let reply = second.cmd("touch 200");
    assert!(reply.is_ok(), "the second process was killed: {reply:?}");
    second.cmd("status").expect("and still answers");
    let ev = collect(&mut reader, pid, Duration::from_millis(500), |_| false);
    assert!(ev.is_empty(), "events for another process: {ev:#?}");
    let on_ring = ring.recv(Some(Duration::from_millis(100))).expect("ring");
    assert!(
        on_ring.is_none(),
        "a record on the direct ring: {on_ring:?}"
    );
    let w = probe.watch_of(pid).expect("the stale watch is still there");
    assert!(
        w.state.rss_bytes < t.terminate && w.state.level == 0,
        "{w:?}"
    );
    assert!(probe.stats().expect("stats").strangers > 0);
    // nor does its exit end the watch made for the first
    second.exit().expect("exit");
    let ev = collect(&mut reader, pid, Duration::from_millis(300), |_| false);
    assert!(ev.is_empty(), "{ev:#?}");
    assert!(probe.watch_of(pid).is_some());
    probe.unwatch(pid).expect("unwatch");
}
