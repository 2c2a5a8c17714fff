//! `amm-agent run --http ADDR`: `/metrics` for Prometheus and the live page
//! at `/`, on a thread of their own.
//!
//! The relay of kernel events runs under `SCHED_FIFO` on the agent's main
//! thread; nothing here may delay it. So the HTTP server runs on its own
//! thread under the normal scheduler, with its own current-thread runtime,
//! and learns what happens only from the relay's never-blocking
//! [`observe`](crate::observe) channel and from the probe's maps read
//! through handles of its own ([`ProbeView`]): it takes no lock the relay
//! takes. A report (`/report/PID`) is the one thing it asks the relay for,
//! as any client would, over the agent's own socket.
//!
//! Abuse it must survive: GET and HEAD only, no write endpoint; request
//! heads capped at [`MAX_REQUEST_BYTES`] and [`HEADER_TIMEOUT`]; at most
//! `max_connections` at once (more are answered 503 and closed); a plain
//! connection lives at most [`PLAIN_LIFETIME`], a live stream is dropped
//! when its reader has taken nothing for [`STALL_TIMEOUT`]; a `Host` that is
//! not loopback is refused (DNS rebinding) unless remote access was asked
//! for. The page shows what `amm-agent status` shows root, so every route
//! first asks [`http_auth`](crate::http_auth) whether the request carries
//! the agent's token (401 saying where the token file is, or a 303 that
//! turns a `?token=` into a cookie); `--http-public` switches that off.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tracing::{debug, info, warn};

use crate::clock::monotonic_ns;
use crate::http_auth::{self, Access, Verdict};
use crate::live::Live;
use crate::observe::{self, Observations, Observer};
use crate::probe::{Probe, ProbeView};

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Time a request head may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of a connection that is not a live stream.
pub const PLAIN_LIFETIME: Duration = Duration::from_secs(30);
/// A live stream whose reader took no frame for this long is dropped.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the page gets a frame when nothing happens (an event sends
/// one at once).
pub const FRAME_INTERVAL: Duration = Duration::from_millis(100);
/// Time a report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// Settings of the listener.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Serve on a non-loopback address (behind an authenticating proxy).
    pub allow_remote: bool,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Who may read it: the token's holders, or everyone who can connect.
    pub access: Access,
    /// Group that may read the token file, when not the agent's own.
    pub token_group: Option<u32>,
}

impl HttpConfig {
    /// `addr` admitting `access`, the default connection cap.
    pub fn new(addr: SocketAddr, access: Access) -> Self {
        HttpConfig {
            addr,
            allow_remote: false,
            max_connections: 32,
            access,
            token_group: None,
        }
    }
}

/// Parses `--http`: `PORT` (on 127.0.0.1), `IP:PORT`, `[IPv6]:PORT` or
/// `localhost:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Some(port) = t.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    t.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address; give PORT, 127.0.0.1:PORT or [::1]:PORT"))
}

/// Most HTTP connections `--http-max-connections` may allow: one fd each,
/// far beyond any sane limit, and within what a semaphore can count.
pub const MAX_HTTP_CONNECTIONS: usize = 65_536;

/// Refuses a non-loopback address unless remote access was asked for, and
/// a connection limit of 0 or beyond [`MAX_HTTP_CONNECTIONS`].
pub fn check(config: &HttpConfig) -> Result<()> {
    if config.max_connections == 0 {
        bail!("--http-max-connections must be at least 1");
    }
    if config.max_connections > MAX_HTTP_CONNECTIONS {
        bail!(
            "--http-max-connections {} is more than the {MAX_HTTP_CONNECTIONS} connections the agent can hold open; give at most {MAX_HTTP_CONNECTIONS}",
            config.max_connections
        );
    }
    if !config.addr.ip().is_loopback() && !config.allow_remote {
        bail!(
            "refusing to serve /metrics and the live page on {}: it is not a loopback address, and \
             the page shows every watched process of every user (what `amm-agent status` shows \
             root). Listen on 127.0.0.1, or put it behind an authenticating proxy and pass \
             --http-allow-remote",
            config.addr
        );
    }
    Ok(())
}

/// Binds the listener, writes the token file and starts the HTTP thread;
/// returns the relay's end of the observation channel. The caller removes
/// the token file at shutdown ([`Access::remover`]).
pub fn start(config: &HttpConfig, probe: &Probe, socket: &Path) -> Result<Observer> {
    check(config)?;
    let listener = std::net::TcpListener::bind(config.addr)
        .with_context(|| format!("cannot listen on http://{}", config.addr))?;
    listener
        .set_nonblocking(true)
        .context("cannot make the HTTP listener non-blocking")?;
    let addr = listener.local_addr().unwrap_or(config.addr);
    config.access.publish(config.token_group)?;
    let view = probe.view()?;
    let (observer, observations) = observe::channel(observe::CHANNEL_CAP);
    let owned = config.clone();
    let socket = socket.to_path_buf();
    std::thread::Builder::new()
        .name("amm-http".into())
        .spawn(move || {
            // spawned by the SCHED_FIFO relay thread: leave its policy
            if let Err(e) = crate::realtime::set_normal() {
                warn!("the HTTP thread cannot leave SCHED_FIFO ({e}); serving anyway");
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("cannot start the HTTP runtime: {e}; no /metrics, no page");
                    return;
                }
            };
            rt.block_on(serve(listener, owned, socket, view, observations));
        })
        .context("cannot start the HTTP thread")?;
    match &config.access {
        Access::Token { file, .. } => info!(
            "serving /metrics and the live page on http://{addr}/ to holders of the token in {} \
             (a browser opens http://{addr}/?token=TOKEN once)",
            file.display()
        ),
        Access::Public => warn!(
            "serving /metrics and the live page on http://{addr}/ to anyone who can connect \
             (--http-public)"
        ),
    }
    Ok(observer)
}

/// What the connections share (all on the HTTP thread).
struct Ctx {
    live: Mutex<Live>,
    frames: watch::Receiver<Bytes>,
    socket: PathBuf,
    config: HttpConfig,
    /// The port actually bound (names the login cookie).
    port: u16,
    slots: Arc<Semaphore>,
    refused: AtomicU64,
}

impl Ctx {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.slots.available_permits())
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, in ms.
fn wall_offset_ms() -> f64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (wall as f64 - monotonic_ns() as f64) / 1e6
}

/// One server-sent event carrying a frame.
fn sse_frame(live: &Live, full: bool) -> Bytes {
    let now = monotonic_ns();
    match serde_json::to_string(&live.frame(now, wall_offset_ms(), full)) {
        Ok(json) => Bytes::from(format!("event: frame\ndata: {json}\n\n")),
        Err(e) => Bytes::from(format!("event: oops\ndata: {e}\n\n")),
    }
}

async fn serve(
    listener: std::net::TcpListener,
    config: HttpConfig,
    socket: PathBuf,
    view: ProbeView,
    observations: Observations,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot serve HTTP: {e}");
            return;
        }
    };
    let port = listener
        .local_addr()
        .map_or(config.addr.port(), |a| a.port());
    let (tx, frames) = watch::channel(Bytes::new());
    let ctx = Arc::new(Ctx {
        live: Mutex::new(Live::new()),
        frames,
        socket,
        port,
        slots: Arc::new(Semaphore::new(config.max_connections)),
        config,
        refused: AtomicU64::new(0),
    });
    tokio::spawn(publish(ctx.clone(), view, observations, tx));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: let connections close, then retry
                warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match ctx.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(connection(ctx.clone(), stream, permit));
            }
            Err(_) => {
                ctx.refused.fetch_add(1, Ordering::Relaxed);
                let _ = stream.try_write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
                );
            }
        }
    }
}

/// Folds the relay's observations into the picture and publishes a frame
/// every [`FRAME_INTERVAL`], and at once after an event.
async fn publish(
    ctx: Arc<Ctx>,
    view: ProbeView,
    observations: Observations,
    tx: watch::Sender<Bytes>,
) {
    let mut every = tokio::time::interval(FRAME_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = observations.waker();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = wake.notified() => {}
        }
        let frame = {
            let mut live = ctx.live();
            live.drain(&observations);
            live.refresh(&view, monotonic_ns());
            live.set_http(ctx.open_connections(), ctx.refused.load(Ordering::Relaxed));
            sse_frame(&live, false)
        };
        tx.send_replace(frame);
    }
}

/// A connection's progress, for the watchdog.
#[derive(Default)]
struct Progress {
    /// It became a live stream.
    streaming: AtomicBool,
    /// Its reader last took a frame (CLOCK_MONOTONIC ns).
    last_ns: AtomicU64,
}

impl Progress {
    fn touch(&self) {
        self.last_ns.store(monotonic_ns(), Ordering::Relaxed);
    }
}

async fn connection(ctx: Arc<Ctx>, stream: TcpStream, _slot: OwnedSemaphorePermit) {
    let _ = stream.set_nodelay(true);
    let progress = Arc::new(Progress::default());
    let service = {
        let (ctx, progress) = (ctx.clone(), progress.clone());
        service_fn(move |req| {
            let (ctx, progress) = (ctx.clone(), progress.clone());
            async move { Ok::<_, Infallible>(route(&ctx, &req, &progress).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!("HTTP connection ended: {e}");
        },
        why = watchdog(&progress) => debug!("closing an HTTP connection: {why}"),
    }
}

/// Resolves when the connection must go.
async fn watchdog(progress: &Progress) -> &'static str {
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if progress.streaming.load(Ordering::Relaxed) {
            let idle = monotonic_ns().saturating_sub(progress.last_ns.load(Ordering::Relaxed));
            if idle > STALL_TIMEOUT.as_nanos() as u64 {
                return "its reader stopped reading the live stream";
            }
        } else if start.elapsed() > PLAIN_LIFETIME {
            return "it outlived the connection lifetime";
        }
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// The Content-Security-Policy of the page: its own assets, nothing else.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";
/// The report's: it inlines its script and styles.
const REPORT_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn respond(status: StatusCode, content_type: &str, csp: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    let mut set = |name: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(name, v);
        }
    };
    set("content-type", content_type);
    set("content-security-policy", csp);
    set("x-content-type-options", "nosniff");
    set("referrer-policy", "no-referrer");
    set("cache-control", "no-store");
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut m = msg.into();
    m.push('\n');
    respond(status, "text/plain; charset=utf-8", PAGE_CSP, full(m))
}

/// True when `Host` names this machine's loopback (or is absent: only
/// browsers need the check, and they always send it).
fn host_is_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) else {
        return headers.get(HOST).is_none();
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key("transfer-encoding")
        || headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// The answer to a request that is not served: a wrong method, a foreign
/// `Host`, a body, or no token (401) or a token to turn into a cookie (303).
fn gate(ctx: &Ctx, req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "amm-agent serves GET and HEAD only: it has no write endpoint",
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    if !ctx.config.allow_remote && !host_is_loopback(req.headers()) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "this Host is not loopback: open the page as http://127.0.0.1:PORT/ (a page of \
             another site cannot read it through DNS rebinding)",
        ));
    }
    if has_body(req.headers()) {
        return Some(text(
            StatusCode::BAD_REQUEST,
            "a GET request carries no body",
        ));
    }
    match http_auth::check(&ctx.config.access, ctx.port, req.headers(), req.uri()) {
        Verdict::Allowed => None,
        Verdict::Login { location, cookie } => Some(login(&location, &cookie)),
        Verdict::Refused(why) => {
            debug!("HTTP request for {} refused: {why}", req.uri().path());
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                http_auth::refusal(&ctx.config.access, why),
            );
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"amm-agent\""),
            );
            Some(r)
        }
    }
}

/// 303 to `location` (the token left the address), keeping the token in a
/// cookie.
fn login(location: &str, cookie: &str) -> Response<Body> {
    let mut r = text(
        StatusCode::SEE_OTHER,
        format!("logged in; go to {location}"),
    );
    for (name, value) in [("location", location), ("set-cookie", cookie)] {
        match HeaderValue::from_str(value) {
            Ok(v) => {
                r.headers_mut().insert(name, v);
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "the address cannot be sent back"),
        }
    }
    r
}

async fn route(ctx: &Ctx, req: &Request<Incoming>, progress: &Arc<Progress>) -> Response<Body> {
    if let Some(refused) = gate(ctx, req) {
        return refused;
    }
    let path = req.uri().path();
    use crate::dashboard as d;
    match path {
        "/" | "/index.html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            PAGE_CSP,
            full(d::INDEX_HTML),
        ),
        "/app.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            PAGE_CSP,
            full(d::APP_JS),
        ),
        "/app.css" => respond(
            StatusCode::OK,
            "text/css; charset=utf-8",
            PAGE_CSP,
            full(d::APP_CSS),
        ),
        "/metrics" => match crate::metrics::encode(&ctx.live()) {
            Ok(body) => respond(
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                PAGE_CSP,
                full(body),
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the metrics: {e}"),
            ),
        },
        "/api/state" => {
            let live = ctx.live();
            let json = serde_json::to_string(&live.frame(monotonic_ns(), wall_offset_ms(), true))
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            respond(StatusCode::OK, "application/json", PAGE_CSP, full(json))
        }
        "/events" => live_stream(ctx, progress),
        p if p.starts_with("/report/") => report(ctx, &p["/report/".len()..]).await,
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no page at {path}; the page is at /, the metrics at /metrics"),
        ),
    }
}

/// `/events`: server-sent events, a whole frame first, then each new one.
/// A reader that falls behind skips frames (only the newest waits for it).
fn live_stream(ctx: &Ctx, progress: &Arc<Progress>) -> Response<Body> {
    let first = sse_frame(&ctx.live(), true);
    progress.streaming.store(true, Ordering::Relaxed);
    progress.touch();
    let p = progress.clone();
    let mut rx = ctx.frames.clone();
    // the first frame is newer than the one published last
    rx.mark_unchanged();
    let frames = tokio_stream::once(first)
        .chain(WatchStream::from_changes(rx))
        .map(move |b| {
            p.touch();
            Ok::<_, Infallible>(Frame::data(b))
        });
    let mut r = respond(
        StatusCode::OK,
        "text/event-stream",
        PAGE_CSP,
        StreamBody::new(frames).boxed_unsync(),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r
}

/// `/report/PID`: the leak-vs-hoard report of a watched or recently ended
/// process, from the timeline the agent holds for it.
async fn report(ctx: &Ctx, pid: &str) -> Response<Body> {
    let Ok(pid) = pid.parse::<u32>() else {
        return text(StatusCode::BAD_REQUEST, format!("{pid:?} is not a pid"));
    };
    let socket = ctx.socket.clone();
    let job = tokio::task::spawn_blocking(move || crate::report_page::render(&socket, pid));
    match tokio::time::timeout(REPORT_TIMEOUT, job).await {
        Ok(Ok(Ok(html))) => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            REPORT_CSP,
            full(html),
        ),
        Ok(Ok(Err(e))) => text(StatusCode::NOT_FOUND, format!("{e:#}")),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the report failed: {e}"),
        ),
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent took too long to send the timeline",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_only_loopback_passes() {
        assert_eq!(
            parse_addr("9464"),
            Ok("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            parse_addr("localhost:80"),
            Ok("127.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(parse_addr("[::1]:9"), Ok("[::1]:9".parse().expect("addr")));
        assert!(parse_addr("banana").is_err());
        let mut c = HttpConfig::new("0.0.0.0:9464".parse().expect("addr"), Access::Public);
        let e = check(&c).expect_err("0.0.0.0 refused");
        assert!(e.to_string().contains("--http-allow-remote"), "{e}");
        c.allow_remote = true;
        assert!(check(&c).is_ok());
        assert!(
            check(&HttpConfig::new(
                "127.0.0.2:1".parse().expect("addr"),
                Access::Public
            ))
            .is_ok()
        );
    }

    #[test]
    fn hosts_that_are_not_loopback_are_refused() {
        let mut h = HeaderMap::new();
        for (host, ok) in [
            ("127.0.0.1:9464", true),
            ("localhost:9464", true),
            ("LOCALHOST", true),
            ("[::1]:9464", true),
            ("evil.example:9464", false),
            ("10.0.0.1:9464", false),
            ("127.0.0.1.evil.example", false),
        ] {
            h.insert(HOST, HeaderValue::from_static(host));
            assert_eq!(host_is_loopback(&h), ok, "{host}");
        }
        assert!(host_is_loopback(&HeaderMap::new()));
    }
}
