//! A client of the agent's HTTP listener (`amm-agent run --http`): where it
//! listens, the bearer token it wrote, and plain HTTP/1.1 requests.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The agent's HTTP listener as a client with the token file sees it.
#[derive(Debug, Clone)]
pub struct HttpListener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The file its token was written to (`None` with `--http-public`).
    pub token_file: Option<PathBuf>,
    /// The token read from that file.
    pub token: Option<String>,
}

/// The token file `amm-agent run` writes for `args` on `socket`: the one
/// `--http-token-file` names, else beside the socket; none with
/// `--http-public`.
pub fn token_file(socket: &Path, args: &[&str]) -> Option<PathBuf> {
    if args.contains(&"--http-public") {
        return None;
    }
    let named = args
        .windows(2)
        .find(|w| w[0] == "--http-token-file")
        .map(|w| PathBuf::from(w[1]));
    Some(named.unwrap_or_else(|| socket.with_extension("http-token")))
}

impl HttpListener {
    /// Waits (at most 10 s) until the agent's log says where it serves,
    /// then reads the token from `token_file`.
    pub fn wait(log: impl Fn() -> String, token_file: Option<PathBuf>) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let text = log();
            if let Some(addr) = text
                .split("live page on http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .and_then(|a| a.parse().ok())
            {
                break addr;
            }
            if Instant::now() > deadline {
                bail!("amm-agent did not say where it serves HTTP; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let token = match &token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read the HTTP token in {}", f.display()))?,
            ),
            None => None,
        };
        Ok(HttpListener {
            addr,
            token_file,
            token,
        })
    }

    /// The `Authorization` header line (with its CRLF) that carries the
    /// token; empty when the listener is public.
    pub fn auth_header(&self) -> String {
        self.token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    }

    /// A GET of `path` carrying the token: the status and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let a = http_request(self.addr, path, &self.auth_header())?;
        Ok((a.status, a.body))
    }

    /// The address a browser opens once to log in and land on `path`.
    pub fn login_url(&self, path: &str) -> String {
        match &self.token {
            Some(t) => format!("http://{}{path}?token={t}", self.addr),
            None => format!("http://{}{path}", self.addr),
        }
    }
}

/// An answer to [`http_request`].
#[derive(Debug)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body.
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A plain HTTP/1.1 GET of `path` on `addr` (no keep-alive) with `headers`
/// (each line ending in CRLF) added.
pub fn http_request(addr: SocketAddr, path: &str, headers: &str) -> Result<HttpAnswer> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to http://{addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(HttpAnswer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// A GET of `path` on `addr` without a token: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let a = http_request(addr, path, "")?;
    Ok((a.status, a.body))
}
