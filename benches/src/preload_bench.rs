//! The pieces of `bench-preload` (see that binary's docs): the modes
//! compared, one run of each benchmark program, and the tables.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::preload::{Driver, compile_c, record_of};
use anyhow::{Context, Result, bail};

use crate::{percentiles, profile_dir};

const MIB: f64 = 1048576.0;

fn median(mut v: Vec<f64>) -> f64 {
    percentiles(&mut v).0
}

/// The libraries compared.
#[derive(Debug, Clone)]
pub struct Libs {
    /// `libamm_preload.so` (jemalloc).
    pub amm: PathBuf,
    /// `libamm_preload_glibc.so` (glibc observed).
    pub amm_glibc: PathBuf,
    /// Debian's `libjemalloc.so.2`, if installed (`apt-get install libjemalloc2`).
    pub debian: Option<PathBuf>,
}

impl Libs {
    /// Finds the libraries in `dir` (default: this build's) and Debian's
    /// jemalloc.
    pub fn find(dir: Option<&Path>) -> Result<Libs> {
        let dir = dir.map_or_else(profile_dir, Path::to_path_buf);
        let lib = |n: &str| {
            let p = dir.join(n);
            if p.exists() {
                Ok(p)
            } else {
                bail!(
                    "{} is not built: run `cargo xtask bench preload`",
                    p.display()
                )
            }
        };
        let debian = PathBuf::from(format!(
            "/usr/lib/{}-linux-gnu/libjemalloc.so.2",
            std::env::consts::ARCH
        ));
        if !debian.exists() {
            eprintln!(
                "Debian's jemalloc is not installed (apt-get install libjemalloc2): its modes are skipped"
            );
        }
        Ok(Libs {
            amm: lib("libamm_preload.so")?,
            amm_glibc: lib("libamm_preload_glibc.so")?,
            debian: debian.exists().then_some(debian),
        })
    }
}

/// How a churn job's hoard is given back at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// The job calls glibc's `malloc_trim(0)` itself (Dask's `trim_memory`).
    Trim,
    /// The harness requests a purge through the allocator record.
    Record,
    /// Nothing can be asked (Debian's jemalloc).
    Nothing,
}

/// One configuration compared.
#[derive(Debug, Clone)]
pub struct Mode {
    /// Its name in the tables.
    pub name: String,
    /// The library preloaded, if any.
    pub preload: Option<PathBuf>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// How its hoard is given back at the end of a churn job.
    pub purge: Purge,
}

fn mode(name: &str, preload: Option<&Path>, env: &[(&str, &str)], purge: Purge) -> Mode {
    Mode {
        name: name.to_string(),
        preload: preload.map(Path::to_path_buf),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        purge,
    }
}

fn select(modes: Vec<Mode>, only: Option<&[String]>) -> Vec<Mode> {
    match only {
        Some(names) => modes
            .into_iter()
            .filter(|m| names.contains(&m.name))
            .collect(),
        None => modes,
    }
}

impl Mode {
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        if let Some(p) = &self.preload {
            c.env("LD_PRELOAD", p);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// `uptime` and the kernel, for the results' heading.
pub fn machine_line() -> String {
    let up = Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    format!(
        "machine: {} cpus, load: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        up.unwrap_or_default()
    )
}

/// The malloc benchmark's modes.
fn malloc_modes(l: &Libs) -> Vec<Mode> {
    let mut m = vec![
        mode("glibc", None, &[], Purge::Nothing),
        mode(
            "glibc+amm-observer",
            Some(&l.amm_glibc),
            &[],
            Purge::Nothing,
        ),
    ];
    if let Some(d) = &l.debian {
        m.push(mode("debian-jemalloc", Some(d), &[], Purge::Nothing));
        let bg = [("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000")];
        m.push(mode("debian-jemalloc-bg-1s", Some(d), &bg, Purge::Nothing));
    }
    m.push(mode("amm", Some(&l.amm), &[], Purge::Record));
    let bg = [
        ("MALLOC_CONF", "background_thread:true"),
        ("AMM_PRELOAD_DECAY", "0"),
    ];
    m.push(mode("amm-bg-thread", Some(&l.amm), &bg, Purge::Record));
    m.push(mode(
        "amm-decay-10s",
        Some(&l.amm),
        &[("MALLOC_CONF", "dirty_decay_ms:10000")],
        Purge::Record,
    ));
    m.push(mode(
        "amm-narenas-2",
        Some(&l.amm),
        &[("MALLOC_CONF", "narenas:2")],
        Purge::Record,
    ));
    m
}

/// One mallocbench run: wall ms, then peak, live, freed, idle RSS in KiB.
fn mallocbench(exe: &Path, m: &Mode) -> Result<[f64; 5]> {
    let out = m
        .command(exe)
        .args(["2", "3000000", "100000", "65536", "3"])
        .output()
        .context("mallocbench")?;
    if !out.status.success() {
        bail!(
            "{}: mallocbench failed: {}",
            m.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b, c, d, e] => Ok([*a, *b, *c, *d, *e]),
        _ => bail!("{}: mallocbench said {text:?}", m.name),
    }
}

/// Runs the malloc benchmark and prints its table.
pub fn malloc_part(l: &Libs, trials: usize, only: Option<&[String]>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = compile_bench_c("mallocbench", dir.path())?;
    let modes = select(malloc_modes(l), only);
    for m in &modes {
        mallocbench(&exe, m)?; // warm-up
    }
    let mut runs: Vec<Vec<[f64; 5]>> = vec![Vec::new(); modes.len()];
    for _ in 0..trials {
        for (i, m) in modes.iter().enumerate() {
            runs[i].push(mallocbench(&exe, m)?);
        }
    }
    println!(
        "\n### malloc-heavy: mallocbench 2 threads x 3M ops, 100k live slots, 16 B-64 KiB (medians of {trials})\n"
    );
    println!(
        "| mode | wall ms | wall vs glibc | peak MiB | live MiB | just freed MiB | after 3 s idle MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let base = median(runs[0].iter().map(|r| r[0]).collect());
    for (m, r) in modes.iter().zip(&runs) {
        let col = |k: usize| median(r.iter().map(|x| x[k]).collect());
        println!(
            "| {} | {:.0} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} |",
            m.name,
            col(0),
            col(0) / base,
            col(1) / 1024.0,
            col(2) / 1024.0,
            col(3) / 1024.0,
            col(4) / 1024.0
        );
    }
    Ok(())
}

fn compile_bench_c(name: &str, dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("c")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("gcc (apt-get install gcc)")?;
    if !st.success() {
        bail!("gcc failed on {}", src.display());
    }
    Ok(out)
}

/// The Python to run the churn with: `explicit`, else the project's
/// (`$AMM_PYTHON` or the venv `cargo xtask venv` builds); it must import
/// numpy and pandas.
pub fn python(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => p,
        None => amm_integration_tests::python::find()?,
    };
    let ok = Command::new(&p)
        .args(["-c", "import numpy, pandas"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "{} cannot import numpy and pandas: run `cargo xtask venv`, or pass --python \
             (or set AMM_PYTHON) to a Python that has them",
            p.display()
        );
    }
    Ok(p)
}

/// The churn's modes: Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 for
/// every one.
fn python_modes(l: &Libs) -> Vec<Mode> {
    let t = ("MALLOC_TRIM_THRESHOLD_", "65536");
    let pm = ("PYTHONMALLOC", "malloc");
    let mut m = vec![
        mode("glibc", None, &[t], Purge::Trim),
        mode("glibc+pymalloc-off", None, &[t, pm], Purge::Trim),
        mode("amm-observer", Some(&l.amm_glibc), &[t], Purge::Record),
        mode(
            "amm-observer+pymalloc-off",
            Some(&l.amm_glibc),
            &[t, pm],
            Purge::Record,
        ),
        mode("amm", Some(&l.amm), &[t], Purge::Record),
        mode("amm+pymalloc-off", Some(&l.amm), &[t, pm], Purge::Record),
    ];
    if let Some(d) = &l.debian {
        let bg = ("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000");
        m.push(mode(
            "debian-jemalloc-bg-1s",
            Some(d),
            &[t, bg],
            Purge::Nothing,
        ));
    }
    m
}

/// One churn run's phases (bytes, seconds).
#[derive(Debug, Clone, Copy, Default)]
struct Churn {
    work: f64,
    peak: f64,
    start: f64,
    held: f64,
    released: f64,
    idle: f64,
    purged: f64,
    publisher_cpu: Option<f64>,
}

fn churn(py: &Path, job: &str, idle: u64, m: &Mode) -> Result<Churn> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/churn.py");
    let began = Instant::now();
    let mut child = m
        .command(py)
        .arg(&script)
        .args([job, &idle.to_string()])
        .env("AMM_PRELOAD_INTERVAL_MS", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("python")?;
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().context("stdin")?;
    let out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut c = Churn::default();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let rss = v["rss"].as_f64().unwrap_or(0.0);
        c.peak = c.peak.max(v["hwm"].as_f64().unwrap_or(0.0));
        match v["phase"].as_str().unwrap_or("") {
            "start" => c.start = rss,
            "held" => (c.held, c.work) = (rss, v["work"].as_f64().unwrap_or(0.0)),
            "released" => c.released = rss,
            "idle" => c.idle = rss,
            "purge?" => {
                c.publisher_cpu = publisher_share(m, pid, began);
                purge_churn(m, pid, &mut stdin)?
            }
            "after_purge" => c.purged = rss,
            _ => {}
        }
    }
    drop(stdin);
    if !child.wait()?.success() {
        bail!("{job} under {} failed", m.name);
    }
    Ok(c)
}

/// The publishing thread's CPU as a share of the process's life so far.
fn publisher_share(m: &Mode, pid: i32, began: Instant) -> Option<f64> {
    m.preload.as_ref()?;
    let s = amm_record::open(pid).ok()?.snapshot().ok()?;
    Some(s.stats.publication.publisher_cpu_ns as f64 / began.elapsed().as_nanos() as f64)
}

fn purge_churn(m: &Mode, pid: i32, stdin: &mut impl Write) -> Result<()> {
    match m.purge {
        Purge::Trim => writeln!(stdin, "trim")?,
        Purge::Record => {
            let (r, t) = amm_record::request_purge(pid).context("request a purge")?;
            r.wait_purge(t, Duration::from_secs(30))?;
            writeln!(stdin, "done")?;
        }
        Purge::Nothing => writeln!(stdin, "none")?,
    }
    stdin.flush()?;
    Ok(())
}

/// Runs the churn jobs and prints one table per job.
pub fn python_part(
    l: &Libs,
    py: &Path,
    trials: usize,
    idle: u64,
    only: Option<&[String]>,
) -> Result<()> {
    let modes = select(python_modes(l), only);
    for job in ["numpy", "dicts", "pandas"] {
        for m in &modes {
            churn(py, job, 0, m)?; // warm-up (page cache, imports)
        }
        let mut runs: Vec<Vec<Churn>> = vec![Vec::new(); modes.len()];
        for _ in 0..trials {
            for (i, m) in modes.iter().enumerate() {
                runs[i].push(churn(py, job, idle, m)?);
            }
        }
        print_churn(job, idle, trials, &modes, &runs);
    }
    Ok(())
}

fn print_churn(job: &str, idle: u64, trials: usize, modes: &[Mode], runs: &[Vec<Churn>]) {
    println!(
        "\n### churn `{job}` (medians of {trials}; MiB above the process's RSS before the job)\n"
    );
    println!(
        "| mode | work s | work vs glibc | peak MiB | held | released | after {idle} s idle | after trim/purge | idle vs glibc | publisher CPU |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let med = |r: &[Churn], f: fn(&Churn) -> f64| median(r.iter().map(f).collect());
    let base_work = med(&runs[0], |c| c.work);
    let base_idle = med(&runs[0], |c| c.idle - c.start);
    for (m, r) in modes.iter().zip(runs) {
        let above = |f: fn(&Churn) -> f64| med(r, f) / MIB;
        let idle_above = med(r, |c| c.idle - c.start);
        let cpu = r
            .iter()
            .filter_map(|c| c.publisher_cpu)
            .map(|x| x * 100.0)
            .collect::<Vec<_>>();
        let cpu = if cpu.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2} %", median(cpu))
        };
        println!(
            "| {} | {:.2} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {cpu} |",
            m.name,
            med(r, |c| c.work),
            med(r, |c| c.work) / base_work,
            above(|c| c.peak - c.start),
            above(|c| c.held - c.start),
            above(|c| c.released - c.start),
            idle_above / MIB,
            above(|c| c.purged - c.start),
            idle_above / base_idle,
        );
    }
}

/// What publishing costs: CPU share and staleness, idle, for both libraries,
/// a Python with numpy/pandas loaded (many mappings), and a fragmented
/// glibc heap.
pub fn publisher_part(l: &Libs, py: Option<&Path>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let driver = compile_c("driver", dir.path(), &[])?;
    println!(
        "\n### publisher: CPU of the publishing thread and age of the record a reader finds (20 s each)\n"
    );
    println!(
        "| process | library | interval | publisher CPU (% of one core) | age median ms | age p99 ms | age max ms | mallinfo2 ms | mallinfo2 every s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (lib, name) in [
        (&l.amm, "amm (jemalloc)"),
        (&l.amm_glibc, "amm-observer (glibc)"),
    ] {
        for ms in [100, 10] {
            let mut p = driven(&driver, lib, ms)?;
            p.cmd("alloc 64 4096")?;
            publisher_row("C, 64 MiB in 4 KiB blocks", name, ms, p.pid)?;
        }
    }
    let mut p = driven(&driver, &l.amm_glibc, 100)?;
    p.cmd("alloc 256 64")?;
    p.cmd("free_every_other")?;
    publisher_row(
        "C, glibc heap of 2M free 64 B chunks",
        "amm-observer (glibc)",
        100,
        p.pid,
    )?;
    if let Some(py) = py {
        for (lib, name) in [
            (&l.amm, "amm (jemalloc)"),
            (&l.amm_glibc, "amm-observer (glibc)"),
        ] {
            let mut c = Command::new(py);
            c.args(["-c", "import os, sys, numpy, pandas; print('ready', os.getpid(), flush=True); sys.stdin.read()"])
                .env("LD_PRELOAD", lib)
                .env("AMM_PRELOAD_INTERVAL_MS", "100");
            let p = Driver::start(c)?;
            publisher_row("Python with numpy+pandas loaded", name, 100, p.pid)?;
        }
    }
    Ok(())
}

fn driven(driver: &Path, lib: &Path, ms: u64) -> Result<Driver> {
    let mut c = Command::new(driver);
    c.env("LD_PRELOAD", lib)
        .env("AMM_PRELOAD_INTERVAL_MS", ms.to_string());
    Driver::start(c)
}

/// Measures one process for 20 s: publisher CPU over that time, and the
/// age of the record at 1,000 moments spread over it.
fn publisher_row(what: &str, lib: &str, ms: u64, pid: i32) -> Result<()> {
    let r = record_of(pid);
    std::thread::sleep(Duration::from_millis(500));
    let first = r.snapshot()?;
    let t0 = Instant::now();
    let mut ages = Vec::new();
    let mut refreshes = Vec::new();
    let mut last_mi = first.stats.glibc.mallinfo_mono_ns;
    while t0.elapsed() < Duration::from_secs(20) {
        let s = r.snapshot()?;
        ages.push(s.age().as_secs_f64() * 1e3);
        if s.stats.glibc.mallinfo_mono_ns != last_mi {
            refreshes.push((s.stats.glibc.mallinfo_mono_ns - last_mi) as f64 / 1e9);
            last_mi = s.stats.glibc.mallinfo_mono_ns;
        }
        std::thread::sleep(Duration::from_micros(
            20_000 + (ages.len() as u64 * 7919) % 17_000,
        ));
    }
    let last = r.snapshot()?;
    let cpu = (last.stats.publication.publisher_cpu_ns - first.stats.publication.publisher_cpu_ns)
        as f64
        / (last.stats.publication.mono_ns - first.stats.publication.mono_ns).max(1) as f64;
    let (age_med, age_p99, age_max) = percentiles(&mut ages);
    let mi = if last.stats.glibc.mallinfo_mono_ns == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", last.stats.glibc.mallinfo_cpu_ns as f64 / 1e6)
    };
    let every = if refreshes.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1}", median(refreshes))
    };
    println!(
        "| {what} | {lib} | {ms} ms | {:.3} % | {:.1} | {:.1} | {:.1} | {mi} | {every} |",
        cpu * 100.0,
        age_med,
        age_p99,
        age_max
    );
    Ok(())
}
