//! The live page in a real browser: the agent (`--http`), two real
//! amm-workers (one spilling, one killed by the kernel at the terminate
//! page) and headless Chromium looking at `/`. It checks what a person
//! would see: the rows appear without a reload, the bar's segments are the
//! worker's own numbers at the right widths, the kill is in the event feed,
//! the report opens from the row. Runs as root (BPF, real cgroups are not
//! needed: the kill is the agent's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use amm_integration_tests::browser::{self, Browser};
use amm_integration_tests::{Agent, bin, require_root, signal_child, spill_then_hold};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Task memory past its limit, faulted at full speed: the kernel kills it
/// at the page that crosses terminate.
const KILLED: &str = r#"
[[phase]]
name = "spike"
[[phase.op]]
op = "allocate"
bytes = "600MiB"
chunk = "32MiB"
keep = "task"
"#;

struct Worker {
    child: Child,
    timeline: PathBuf,
}

impl Worker {
    fn start(dir: &Path, name: &str, toml: &str, limit: &str, agent: &Agent) -> Worker {
        let w = dir.join(format!("{name}.toml"));
        std::fs::write(&w, toml).expect("workload");
        let timeline = dir.join(format!("{name}.jsonl"));
        let child = Command::new(bin("amm-worker"))
            .arg("run")
            .arg(&w)
            .args([
                "--memory-limit",
                limit,
                "--max-restarts",
                "0",
                "--name",
                name,
            ])
            .arg("--agent")
            .arg(agent.socket())
            .arg("--local-directory")
            .arg(dir)
            .arg("--timeline")
            .arg(&timeline)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("amm-worker");
        Worker { child, timeline }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.timeline)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The worker process's pid (the nanny's child), from its timeline.
    fn pid(&self) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(pid) = self
                .lines()
                .iter()
                .find(|v| v["event"] == "start")
                .and_then(|v| v["pid"].as_u64())
            {
                return pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SIGTERM to the nanny: it stops its worker and cleans up
        signal_child(&self.child, Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn row_js(pid: u64, body: &str) -> String {
    format!(
        "const r = document.querySelector('.row[data-pid=\"{pid}\"]'); if (!r) return null; {body}"
    )
}

#[test]
fn the_page_shows_live_rows_true_bars_a_kill_and_opens_reports() {
    if !require_root("the_page_shows_live_rows_true_bars_a_kill_and_opens_reports") {
        return;
    }
    assert!(
        browser::available() || std::env::var_os("AMM_REQUIRE_BPF").is_none(),
        "AMM_REQUIRE_BPF=1: the browser test must run; install chromium and chromium-driver"
    );
    if !browser::available() {
        eprintln!("SKIPPED the browser test: chromium and chromium-driver are not installed");
        return;
    }
    let (agent, http) = Agent::start_http(&[]).expect("agent");
    let b = Browser::start(1400, 700).expect("browser");
    // as a person does: the address with the token once, then the cookie
    b.goto(&http.login_url("/")).expect("page");
    let address = b.eval("return location.href;").expect("href");
    assert_eq!(
        address.as_str(),
        Some(format!("http://{}/", http.addr).as_str()),
        "the token left the address bar"
    );
    let wait = Duration::from_secs(60);
    b.wait_for(
        "the live stream",
        "return document.getElementById('conn').textContent === 'live' && window.ammLive.frames > 0;",
        wait,
    )
    .expect("live");
    // no rows yet; a mark that a reload would wipe
    let empty = b
        .eval("return getComputedStyle(document.getElementById('empty')).display;")
        .expect("eval");
    assert_ne!(empty, "none", "the empty page says nothing is watched");
    b.eval("window.notReloaded = 42; return 1;").expect("mark");

    let dir = tempfile::tempdir().expect("tempdir");
    let spiller = Worker::start(
        dir.path(),
        "spiller",
        &spill_then_hold("60s"),
        "512MiB",
        &agent,
    );
    let killed = Worker::start(dir.path(), "killed", KILLED, "384MiB", &agent);
    let (sp, kp) = (spiller.pid(), killed.pid());

    // the killed worker's row ends as killed, and the feed says so
    b.wait_for(
        "the killed worker's row",
        &row_js(
            kp,
            "return r.dataset.level === 'ended' && r.textContent.includes('killed at terminate');",
        ),
        wait,
    )
    .expect("killed row");
    b.wait_for(
        "the kill in the feed",
        &format!(
            "return [...document.querySelectorAll('#feed li')].some(li => li.dataset.pid === '{kp}' \
             && li.dataset.signalled === 'true' && li.textContent.includes('killed at the terminate page'));"
        ),
        wait,
    )
    .expect("feed");

    // the spilling worker holds: its bar shows what it pushed last
    let segs = b
        .wait_for(
            "the spilling worker's split with spilled data",
            &row_js(
                sp,
                "const s = {}; for (const e of r.querySelectorAll('.seg')) \
                 s[e.dataset.part] = {bytes: Number(e.dataset.bytes), w: e.getBoundingClientRect().width}; \
                 const bar = r.querySelector('.bar').getBoundingClientRect().width; \
                 if (!(s.spilled.bytes > 0) || s.managed.bytes === 0) return null; \
                 return {s, bar, limit: Number(r.querySelector('.barbox').dataset.limit)};",
            ),
            wait,
        )
        .expect("split");
    let part = |k: &str| segs["s"][k]["bytes"].as_f64().expect("bytes");
    let limit = segs["limit"].as_f64().expect("limit");
    assert_eq!(limit, 512.0 * 1048576.0);
    // the numbers are one of the worker's own ticks, to the byte
    let keys = [
        ("managed", "managed"),
        ("unmanaged", "unmanaged_live"),
        ("hoarded", "hoarded"),
        ("nonheap", "non_heap"),
        ("spilled", "spilled"),
    ];
    let ticks: Vec<Value> = spiller
        .lines()
        .into_iter()
        .filter(|v| v["kind"] == "tick")
        .collect();
    assert!(
        ticks.iter().any(|t| keys
            .iter()
            .all(|(page, worker)| t[*worker].as_f64() == Some(part(page)))),
        "the bar's numbers {segs} are none of the worker's ticks"
    );
    // and each segment is as wide as its share of the limit (to a pixel)
    let bar = segs["bar"].as_f64().expect("bar");
    for (page, _) in keys {
        let w = segs["s"][page]["w"].as_f64().expect("width");
        let want = bar * part(page) / limit;
        assert!(
            (w - want.min(bar)).abs() <= 1.0,
            "{page}: {w} px wide, {want} px is its share"
        );
    }

    // still the same page, and frames keep coming
    assert_eq!(b.eval("return window.notReloaded;").expect("eval"), 42);
    let frames = b.eval("return window.ammLive.frames;").expect("eval");
    b.wait_for(
        "more frames",
        &format!("return window.ammLive.frames > {frames} + 5;"),
        wait,
    )
    .expect("frames");
    // every feed item knows how long kernel → pixel took
    let delays = b
        .eval("return [...document.querySelectorAll('#feed li[data-pixel-ms]')].map(li => Number(li.dataset.pixelMs));")
        .expect("delays");
    let delays = delays.as_array().expect("array");
    assert!(!delays.is_empty(), "no feed item was timed");
    assert!(delays.iter().all(|d| d.as_f64().is_some_and(|d| d >= 0.0)));

    let shot = amm_integration_tests::profile_dir().join("dashboard-test.png");
    b.screenshot(&shot).expect("screenshot");
    eprintln!("screenshot: {}", shot.display());

    // the report opens from the row, for the running and the killed worker
    let hrefs: Vec<String> = [sp, kp]
        .iter()
        .map(|pid| {
            let href = b
                .eval(&row_js(
                    *pid,
                    "return r.querySelector('a[href^=\"/report/\"]').getAttribute('href');",
                ))
                .expect("link");
            href.as_str()
                .unwrap_or_else(|| panic!("no report link in row {pid}: {href}"))
                .to_string()
        })
        .collect();
    for href in hrefs {
        let (status, body) = http.get(&href).expect("report");
        assert_eq!(status, 200, "{href}: {body}");
        assert!(body.contains("<title>amm report"), "{href}: not a report");
        b.goto(&format!("http://{}{href}", http.addr))
            .expect("report page");
        let title = b.eval("return document.title;").expect("title");
        assert!(
            title.as_str().unwrap_or("").starts_with("amm report"),
            "{href}: the browser shows {title}"
        );
    }
    let shot = amm_integration_tests::profile_dir().join("dashboard-report-test.png");
    b.screenshot(&shot).expect("screenshot");
    eprintln!("report screenshot: {}", shot.display());
}
