//! A real headless Chromium for tests and the demo: Debian's `chromium`
//! driven over WebDriver by Debian's `chromedriver` (package
//! `chromium-driver`) through `fantoccini`. Nothing comes from the network:
//! no browser download, a fresh empty profile, background networking,
//! component updates and sync off.
//!
//! Blocking API (it owns a small tokio runtime), so tests stay plain
//! `#[test]` functions.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Where Debian puts the browser and its driver.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The flags that make Chromium run headless as root on a machine with no
/// display and no network but the loopback.
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// True when Debian's `chromium` and `chromium-driver` are installed.
pub fn available() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

/// A running headless Chromium with one window of `width` × `height`.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<fantoccini::Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

impl Browser {
    /// Starts chromedriver and a browser session, or says which package is
    /// missing.
    pub fn start(width: u32, height: u32) -> Result<Browser> {
        if !available() {
            bail!(
                "{CHROMIUM} or {CHROMEDRIVER} is missing: install Debian's packages \
                 (apt-get install chromium chromium-driver; .ci/run does)"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime for the WebDriver client")?;
        let profile = tempfile::tempdir()?;
        // a port picked now may be taken before chromedriver binds it: retry
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start chromedriver")?;
            match rt.block_on(session(port, profile.path(), width, height)) {
                Ok(client) => {
                    return Ok(Browser {
                        rt,
                        client: Some(client),
                        driver,
                        _profile: profile,
                    });
                }
                Err(e) => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no session")))
    }

    fn client(&self) -> Result<&fantoccini::Client> {
        self.client
            .as_ref()
            .context("the browser session is closed")
    }

    /// Opens `url` and waits for the page's load event.
    pub fn goto(&self, url: &str) -> Result<()> {
        let c = self.client()?;
        self.rt
            .block_on(c.goto(url))
            .with_context(|| format!("cannot open {url}"))
    }

    /// Runs `script` (a function body: `return ...;`) in the page.
    pub fn eval(&self, script: &str) -> Result<Value> {
        let c = self.client()?;
        self.rt
            .block_on(c.execute(script, Vec::new()))
            .with_context(|| format!("script failed: {script}"))
    }

    /// Waits until `script` returns something other than `null`/`false`
    /// (at most `timeout`), and returns it.
    pub fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script)?;
            if !(v.is_null() || v == Value::Bool(false)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("the page never showed {what} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Saves a PNG of the window.
    pub fn screenshot(&self, path: &Path) -> Result<PathBuf> {
        let c = self.client()?;
        let png = self
            .rt
            .block_on(c.screenshot())
            .context("cannot take a screenshot")?;
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// Resizes the window (a full-page screenshot: the page's height).
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let c = self.client()?;
        self.rt
            .block_on(c.set_window_size(width, height))
            .context("cannot resize the window")
    }
}

async fn session(port: u16, profile: &Path, width: u32, height: u32) -> Result<fantoccini::Client> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut args: Vec<String> = FLAGS.iter().map(|s| s.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push(format!("--window-size={width},{height}"));
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    let Value::Object(caps) = caps else {
        bail!("capabilities are not an object");
    };
    // chromedriver takes a moment to listen
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut b = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        );
        b.capabilities(caps.clone());
        match b.connect(&format!("http://{addr}")).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("cannot open a WebDriver session"),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
