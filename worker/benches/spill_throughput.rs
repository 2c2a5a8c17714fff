//! Spill write and read-back throughput of the SpillBuffer against `dd` on
//! the same directory, as ratios measured side by side in one run.
//!
//! `dd` write, the faster of `bs=1M conv=fdatasync` and `bs=<value size>
//! oflag=direct`; `dd` read, the faster of `bs=<value size> iflag=direct`
//! and a buffered `bs=1M` read after `iflag=nocache` dropped the file from
//! the page cache. Both sides move the same bytes through the same device:
//! the SpillBuffer writes every value back and drops it from the page cache
//! before it counts as spilled, and reads it back from the device. Round 0 is a warm-up (fresh
//! memory is much slower to fault in on this VM the first time) and is not
//! counted; the median of the next rounds is reported.
//!
//! Settings (environment): `AMM_BENCH_DIR` (default: the temp dir),
//! `AMM_BENCH_MIB` total MiB per round (default 1024), `AMM_BENCH_VALUE_MIB`
//! value size (default 64), `AMM_BENCH_ROUNDS` counted rounds (default 3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use amm_worker::spill::{SpillBuffer, SpillDir, SpillOptions, Value, WriteOptions};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn dd(args: &[String]) {
    let st = Command::new("dd")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run dd");
    assert!(st.success(), "dd {args:?} failed");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Round {
    dd_write: f64,
    dd_read: f64,
    spill_write: f64,
    spill_read: f64,
}

fn round(dir: &Path, buffer: &SpillBuffer, total_mib: u64, value_mib: u64) -> Round {
    let n = total_mib / value_mib;
    let mib = total_mib as f64;
    // dd, same directory, same bytes; the faster of two ways for each
    // direction is the baseline (the conservative ratio).
    let f = dir.join("dd.bin");
    let of = format!("of={}", f.display());
    let inf = format!("if={}", f.display());
    let count = |bs: u64| format!("count={}", total_mib / bs);
    let w_sync = mib
        / secs(|| {
            dd(&[
                "if=/dev/zero".into(),
                of.clone(),
                "bs=1M".into(),
                count(1),
                "conv=fdatasync".into(),
            ])
        });
    let w_direct = mib
        / secs(|| {
            dd(&[
                "if=/dev/zero".into(),
                of.clone(),
                format!("bs={value_mib}M"),
                count(value_mib),
                "oflag=direct".into(),
            ])
        });
    let r_direct = mib
        / secs(|| {
            dd(&[
                inf.clone(),
                "of=/dev/null".into(),
                format!("bs={value_mib}M"),
                "iflag=direct".into(),
            ])
        });
    // Drop the file from the page cache, then a buffered read (read-ahead).
    dd(&[inf.clone(), "iflag=nocache".into(), "count=0".into()]);
    let r_buffered = mib / secs(|| dd(&[inf.clone(), "of=/dev/null".into(), "bs=1M".into()]));
    let _ = std::fs::remove_file(&f);
    let (dd_write, dd_read) = (w_sync.max(w_direct), r_direct.max(r_buffered));
    // The SpillBuffer: values already in memory (faulted in), spill them all,
    // then read them all back.
    let keys: Vec<String> = (0..n).map(|i| format!("v{i:04}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let mut data = vec![0u8; (value_mib << 20) as usize];
        amm_worker::rng::fill_pattern(&mut data, i as u64);
        buffer.put(k, Value::bytes(data));
    }
    let spill_write = mib / secs(|| while buffer.evict().expect("evict").is_some() {});
    let spill_read = mib
        / secs(|| {
            for k in &keys {
                let v = buffer.get(k).expect("get");
                std::hint::black_box(&v);
            }
        });
    for k in &keys {
        buffer.delete(k);
    }
    Round {
        dd_write,
        dd_read,
        spill_write,
        spill_read,
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let base: PathBuf = std::env::var_os("AMM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let total = env_u64("AMM_BENCH_MIB", 1024);
    let value = env_u64("AMM_BENCH_VALUE_MIB", 64).max(1);
    let rounds = env_u64("AMM_BENCH_ROUNDS", 3).max(1);
    // Keep freed value memory in the heap, so that each round reuses pages
    // that are already faulted in instead of mapping fresh ones.
    // SAFETY: mallopt only changes glibc's tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let dir = SpillDir::open(&base, &format!("bench-{}", std::process::id())).expect("spill dir");
    let path = dir.path().to_path_buf();
    let buffer = SpillBuffer::new(
        dir,
        SpillOptions {
            target: None,
            max_spill: None,
            write: WriteOptions {
                fsync: false,
                drop_cache: true,
            },
        },
    );
    println!(
        "spill throughput: {total} MiB per round in {value} MiB values, directory {}",
        path.display()
    );
    println!(
        "{:>6} {:>12} {:>12} {:>8} {:>12} {:>12} {:>8}",
        "round", "dd write", "spill write", "ratio", "dd read", "spill read", "ratio"
    );
    let mut wr = Vec::new();
    let mut rr = Vec::new();
    for r in 0..=rounds {
        let x = round(&path, &buffer, total, value);
        let (w, rd) = (x.spill_write / x.dd_write, x.spill_read / x.dd_read);
        println!(
            "{:>6} {:>8.0} MB/s {:>8.0} MB/s {:>8.2} {:>8.0} MB/s {:>8.0} MB/s {:>8.2}{}",
            r,
            x.dd_write * 1.048576,
            x.spill_write * 1.048576,
            w,
            x.dd_read * 1.048576,
            x.spill_read * 1.048576,
            rd,
            if r == 0 {
                "  (warm-up, not counted)"
            } else {
                ""
            }
        );
        if r > 0 {
            wr.push(w);
            rr.push(rd);
        }
    }
    let (w, r) = (median(wr), median(rr));
    println!("median ratio over {rounds} rounds: write {w:.2}, read-back {r:.2} (goal >= 0.8)");
    println!(
        "{}",
        serde_json::json!({"bench": "spill_throughput", "total_mib": total, "value_mib": value,
                           "rounds": rounds, "write_ratio": w, "read_ratio": r})
    );
}
