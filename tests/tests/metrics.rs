//! `amm-agent run --http`: `/metrics` scraped while a real amm-worker runs
//! on the agent's events, checked against the worker's own summary and
//! timeline; the abuse the listener must refuse. Runs the real binaries as
//! root.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::http::{http_request, token_file};
use amm_integration_tests::{
    Agent, Faulter, HttpListener, TestUser, bin, http_get, require_root, spill_then_hold,
};
use serde_json::Value;

/// One sample line of the exposition: name, labels, value.
struct Series {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some(Series {
                name: name.to_string(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

fn value(all: &[Series], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    all.iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn scrape(http: &HttpListener) -> Vec<Series> {
    let (status, body) = http.get("/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics: {body}");
    parse(&body)
}

#[test]
fn metrics_during_a_real_run_match_the_workers_own_numbers() {
    if !require_root("metrics_during_a_real_run_match_the_workers_own_numbers") {
        return;
    }
    let (agent, http) = Agent::start_http(&[]).expect("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("w.toml");
    std::fs::write(&w, spill_then_hold("3s")).expect("workload");
    let timeline = dir.path().join("timeline.jsonl");
    let mut child = Command::new(bin("amm-worker"))
        .arg("run")
        .arg(&w)
        .args(["--memory-limit", "512MiB", "--max-restarts", "0"])
        .arg("--agent")
        .arg(agent.socket())
        .arg("--local-directory")
        .arg(dir.path())
        .arg("--timeline")
        .arg(&timeline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("amm-worker");
    // scrape all along; keep the last scrape that shows the worker
    let mut last_with_worker = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the worker did not finish");
        let all = scrape(&http);
        if all.iter().any(|s| s.name == "amm_process_rss_bytes") {
            last_with_worker = Some(all);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let summary: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(summary["result_ok"], true, "{summary}");
    let during = last_with_worker.expect("no scrape showed the worker");
    let pid = during
        .iter()
        .find(|s| s.name == "amm_process_rss_bytes")
        .and_then(|s| s.labels.get("pid").cloned())
        .expect("pid label");
    let p = [("pid", pid.as_str())];
    let get = |name: &str| value(&during, name, &p).unwrap_or_else(|| panic!("no {name}"));
    let name = during
        .iter()
        .find(|s| s.name == "amm_process_rss_bytes")
        .and_then(|s| s.labels.get("name").cloned());
    assert_eq!(name.as_deref(), Some("amm-worker"));

    // the kernel's numbers against the worker's own
    assert_eq!(
        get("amm_process_limit_bytes"),
        summary["limit_bytes"].as_f64().expect("limit")
    );
    // VmHWM is the kernel's approximate per-CPU RSS counter at its last
    // update, the probe's peak the exact sum at every page: they agree to
    // the counters' per-CPU slack, far under 1 MiB
    let peak = summary["peak_rss_bytes"].as_f64().expect("peak");
    let metric_peak = get("amm_process_peak_rss_bytes");
    assert!(
        (metric_peak - peak).abs() <= 1048576.0,
        "peak: metrics {metric_peak}, worker's VmHWM {peak}"
    );
    // the worker's split, as its timeline's last tick had it
    let ticks: Vec<Value> = std::fs::read_to_string(&timeline)
        .expect("timeline")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "tick")
        .collect();
    let last = ticks.last().expect("a tick");
    let part = |p2: &str| {
        value(&during, "amm_process_memory_bytes", &[p[0], ("part", p2)])
            .unwrap_or_else(|| panic!("no part {p2}"))
    };
    assert_eq!(part("managed"), last["managed"].as_f64().expect("managed"));
    assert_eq!(
        get("amm_process_spilled_bytes"),
        last["spilled"].as_f64().expect("spilled")
    );
    assert!(get("amm_process_spilled_bytes") > 0.0, "nothing spilled");
    assert_eq!(
        get("amm_process_spilled_bytes"),
        summary["spilled_bytes_total"]
            .as_f64()
            .expect("spilled total")
    );
    // the split is one the worker computed, to the byte
    let parts = ["managed", "unmanaged_live", "hoarded", "non_heap"];
    let exported: Vec<f64> = parts.iter().map(|x| part(x)).collect();
    assert!(
        ticks.iter().any(|t| parts
            .iter()
            .zip(&exported)
            .all(|(k, v)| t[*k].as_f64() == Some(*v))),
        "the exported split {exported:?} is none of the worker's ticks"
    );
    // every kernel event the worker got is counted
    let crossings: f64 = ["spill", "pause", "terminate", "below"]
        .iter()
        .map(|to| {
            value(
                &during,
                "amm_process_level_crossings_total",
                &[p[0], ("to", to)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    let events = crossings + get("amm_process_spike_alarms_total");
    assert!(crossings >= 1.0, "no crossing counted");
    assert_eq!(events, summary["agent_events"].as_f64().expect("events"));
    assert_eq!(get("amm_process_terminate_kills_total"), 0.0);
    let latency_count = value(
        &during,
        "amm_agent_event_latency_seconds_count",
        &[("stage", "read"), ("delivery", "direct")],
    );
    assert_eq!(latency_count, Some(events));
    assert_eq!(value(&during, "amm_agent_watches", &[]), Some(1.0));
    assert_eq!(value(&during, "amm_agent_probe_attached", &[]), Some(1.0));

    // once the watch ended its series are gone
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = scrape(&http);
        if value(&after, "amm_agent_watches", &[]) == Some(0.0) {
            assert!(after.iter().all(|s| s.labels.get("pid") != Some(&pid)));
            assert_eq!(value(&after, "amm_agent_probe_attached", &[]), Some(0.0));
            break;
        }
        assert!(Instant::now() < deadline, "the watch never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_listener_refuses_writes_big_heads_strangers_and_floods() {
    if !require_root("the_listener_refuses_writes_big_heads_strangers_and_floods") {
        return;
    }
    let (mut agent, http) = Agent::start_http(&["--http-max-connections", "4"]).expect("agent");
    let addr = http.addr;
    // no write endpoint
    for method in ["POST", "PUT", "DELETE"] {
        let r = raw(
            addr,
            format!("{method} /metrics HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 405"), "{method}: {r}");
    }
    // a body on a GET
    let r = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\n\r\nhello").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // a page of another site reaching loopback through DNS rebinding
    let r = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // a head larger than the cap: refused, not buffered
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(addr, big.as_bytes());
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    // four idle connections hold every slot: the fifth is told so
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    // a head never finished is dropped (5 s), freeing its slot
    let started = Instant::now();
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http.get("/metrics") {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\n").expect("half a head");
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a half head held its slot"
    );
    // the agent is still serving its socket
    assert!(agent.running());
    let mut c = agent.client().expect("client");
    c.status().expect("status");
}

/// Every route of the listener, as the page, Prometheus and a browser use
/// them; `/report/PID` of a process the agent watches.
fn routes(watched: u32) -> Vec<String> {
    [
        "/",
        "/app.js",
        "/metrics",
        "/events",
        "/api/state",
        "/no-such-page",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain([format!("/report/{watched}")])
    .collect()
}

/// A child of this test watched by the agent, so `/report/PID` has a report.
fn watched_child(agent: &Agent) -> (Faulter, amm_protocol::Client) {
    let mut client = agent.client().expect("client");
    let f = Faulter::spawn().expect("child");
    let mut reg = amm_protocol::Registration::new(f.pid(), 1 << 30);
    reg.start_time = Some(
        amm_agent::identity::ProcInfo::read(f.pid())
            .expect("proc info")
            .start_time,
    );
    client.register(&reg).expect("register our child");
    (f, client)
}

/// The status and answer of a GET; of a live stream (never ending) only
/// the head.
fn head_of(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, _)) = text.split_once("\r\n\r\n")
            && head.contains("text/event-stream")
        {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{path}: {e} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    let r = String::from_utf8_lossy(&got).into_owned();
    let status = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status in {r:?}"));
    (status, r)
}

#[test]
fn the_listener_serves_only_the_holders_of_its_token() {
    if !require_root("the_listener_serves_only_the_holders_of_its_token") {
        return;
    }
    let reader = TestUser::create("tokr").expect("user");
    let stranger = TestUser::create("toks").expect("user");
    // the token file's path holds a link to a file the agent must not touch
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    let file = dir.path().join("agent.http-token");
    std::os::unix::fs::symlink(&victim, &file).expect("plant a link");
    let gid = reader.gid.to_string();
    let file_arg = file.to_str().expect("utf-8 path");
    let args = ["--http-token-file", file_arg, "--http-group", gid.as_str()];
    let (agent, http) = Agent::start_http(&args).expect("agent");
    let addr = http.addr;
    assert_eq!(
        token_file(agent.socket(), &args).as_deref(),
        Some(file.as_path())
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let meta = std::fs::symlink_metadata(&file).expect("token file");
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by a file"
    );
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o640, 0, reader.gid)
    );
    let token = http.token.clone().expect("token");
    assert_eq!(token.len(), 64);
    // the group it was given reads it; another user does not
    for (user, readable) in [(&reader, true), (&stranger, false)] {
        let cat = Command::new("cat")
            .arg(&file)
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .expect("cat");
        assert_eq!(cat.status.success(), readable, "{}: {cat:?}", user.name);
    }

    let (_child, _client) = watched_child(&agent);
    let pid = _child.pid();
    let wrong = "0".repeat(64);
    let refusals = [
        String::new(),
        format!("Authorization: Bearer {wrong}\r\n"),
        format!("Authorization: Basic {token}\r\n"),
        format!("Cookie: amm_token_{}={wrong}\r\n", addr.port()),
        format!("Cookie: amm_token_{}={token}\r\n", addr.port() ^ 1),
    ];
    for path in routes(pid) {
        for headers in &refusals {
            let (status, r) = head_of(addr, &path, headers);
            assert_eq!(status, 401, "{path} with {headers:?}: {r}");
            assert!(
                r.contains(file_arg),
                "the refusal names the token file: {r}"
            );
            assert!(!r.contains(&token), "a refusal never shows the token: {r}");
            assert!(r.to_lowercase().contains("www-authenticate: bearer"), "{r}");
        }
        let (status, r) = head_of(addr, &format!("{path}?token={wrong}"), "");
        assert_eq!(status, 401, "{path}?token=wrong: {r}");
        // with the token: served (the unknown page is a 404, not a 401)
        let (status, r) = head_of(addr, &path, &http.auth_header());
        let expected = if path == "/no-such-page" { 404 } else { 200 };
        assert_eq!(status, expected, "{path} with the token: {r}");
    }

    // a browser: ?token= once, a cookie, the address without the token
    let login = http_request(addr, &format!("/report/{pid}?token={token}"), "").expect("login");
    assert_eq!(login.status, 303, "{login:?}");
    assert_eq!(
        login.header("location"),
        Some(format!("/report/{pid}").as_str())
    );
    let cookie = login.header("set-cookie").expect("cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    let page = http_request(
        addr,
        &format!("/report/{pid}"),
        &format!("Cookie: {pair}\r\n"),
    )
    .expect("report");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<title>amm report"));

    // stopped, the agent leaves no token behind
    drop(agent);
    assert!(!file.exists(), "the token file outlived its agent");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
}

#[test]
fn a_public_listener_serves_without_a_token_and_writes_none() {
    if !require_root("a_public_listener_serves_without_a_token_and_writes_none") {
        return;
    }
    let (agent, http) = Agent::start_http(&["--http-public"]).expect("agent");
    assert!(http.token.is_none());
    let (_child, _client) = watched_child(&agent);
    for path in routes(_child.pid()) {
        let (status, r) = head_of(http.addr, &path, "");
        let expected = if path == "/no-such-page" { 404 } else { 200 };
        assert_eq!(status, expected, "{path}: {r}");
    }
    assert!(
        !agent.socket().with_extension("http-token").exists(),
        "a public listener writes no token file"
    );
    let (status, body) = http_get(http.addr, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
}
