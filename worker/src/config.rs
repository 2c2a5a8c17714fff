//! Memory configuration with Dask's keys, from a TOML file, `AMM_`
//! environment variables and flags (flag > env > file > default).
//!
//! ```toml
//! [worker.memory]
//! target = 0.6              # fraction of the limit, or false
//! spill = 0.7
//! pause = 0.8
//! terminate = 0.95
//! monitor-interval = "200ms"
//! recent-to-old-time = "30s"
//! max-spill = false         # or a size: "10GiB"
//! trim-threshold = 65536    # MALLOC_TRIM_THRESHOLD_ / jemalloc purge threshold, or false
//! purge-interval = "1s"     # least time between two threshold purges
//! probe-purge = false       # or "5s": purge on purpose to tell a hoard from a leak
//! spill-fsync = false       # fdatasync every spilled value
//! spill-drop-cache = true   # write back and drop spilled bytes from the page cache
//!
//! [worker.agent]
//! socket = "/run/amm/agent.sock"  # register with amm-agent (absent: poll only)
//! terminate-signal = "SIGKILL"    # the kernel sends it at the page crossing
//!                                 # terminate; false: the worker's own tick terminates
//! observe-only = false            # record the kernel's events, act only on polls
//!                                 # (for measuring a polling worker)
//! ```
//!
//! A key may also be written with Dask's `distributed.` prefix. In the
//! environment, `AMM_WORKER__MEMORY__TARGET=0.5` sets `worker.memory.target`
//! (`__` separates levels, `_` stands for `-`). Unknown keys and malformed
//! values are errors that name the key and where it came from.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::units::{parse_bytes, parse_duration};

/// All keys this module knows.
pub const KEYS: &[&str] = &[
    "worker.memory.target",
    "worker.memory.spill",
    "worker.memory.pause",
    "worker.memory.terminate",
    "worker.memory.monitor-interval",
    "worker.memory.recent-to-old-time",
    "worker.memory.max-spill",
    "worker.memory.trim-threshold",
    "worker.memory.purge-interval",
    "worker.memory.probe-purge",
    "worker.memory.spill-fsync",
    "worker.memory.spill-drop-cache",
    "worker.agent.socket",
    "worker.agent.terminate-signal",
    "worker.agent.observe-only",
];

/// The effective memory settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryConfig {
    /// Managed memory fraction above which LRU values are spilled.
    pub target: Option<f64>,
    /// Process memory fraction above which values are spilled down to target.
    pub spill: Option<f64>,
    /// Process memory fraction above which no new task starts.
    pub pause: Option<f64>,
    /// Process memory fraction above which the worker exits.
    pub terminate: Option<f64>,
    /// How often the manager measures.
    #[serde(with = "millis")]
    pub monitor_interval: Duration,
    /// How long unmanaged memory counts as recent.
    #[serde(with = "millis")]
    pub recent_to_old_time: Duration,
    /// Most bytes the spill directory may hold.
    pub max_spill: Option<u64>,
    /// `MALLOC_TRIM_THRESHOLD_` for a system-allocator worker; the hoard size
    /// above which a jemalloc worker purges. `None` disables both.
    pub trim_threshold: Option<u64>,
    /// Least time between two purges triggered by the threshold.
    #[serde(with = "millis")]
    pub purge_interval: Duration,
    /// `--probe-purge`: purge on purpose, at most this often, when memory is
    /// hoarded or unmanaged memory grew since the last purge, so that the
    /// report can tell a hoard (returned) from a leak or fragmentation (not
    /// returned). `None`: never.
    #[serde(with = "opt_millis")]
    pub probe_purge: Option<Duration>,
    /// `fdatasync` each spilled value.
    pub spill_fsync: bool,
    /// Write back spilled bytes and drop them from the page cache.
    pub spill_drop_cache: bool,
    /// The amm-agent socket to register with (`None`: poll only).
    pub agent_socket: Option<std::path::PathBuf>,
    /// Signal the kernel sends at the page that crosses terminate when the
    /// agent watches this worker (`None`: the worker's own tick terminates).
    pub agent_terminate_signal: Option<i32>,
    /// Register with the agent only to record its events; act on polls
    /// alone, with no kernel terminate signal (to measure a polling worker).
    pub agent_observe_only: bool,
}

mod millis {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

mod opt_millis {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            target: Some(0.6),
            spill: Some(0.7),
            pause: Some(0.8),
            terminate: Some(0.95),
            monitor_interval: Duration::from_millis(200),
            recent_to_old_time: Duration::from_secs(30),
            max_spill: None,
            trim_threshold: Some(65536),
            purge_interval: Duration::from_secs(1),
            probe_purge: None,
            spill_fsync: false,
            spill_drop_cache: true,
            agent_socket: None,
            agent_terminate_signal: Some(libc::SIGKILL),
            agent_observe_only: false,
        }
    }
}

/// A value before it is checked against its key.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// `true`/`false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// Text (sizes, durations, or anything from the environment or a flag).
    Str(String),
}

impl Raw {
    fn describe(&self) -> String {
        match self {
            Raw::Bool(b) => b.to_string(),
            Raw::Num(n) => n.to_string(),
            Raw::Str(s) => format!("{s:?}"),
        }
    }

    /// Text from env or flags: `false`/`true` become booleans, the rest stays
    /// text and is parsed by the key's own rules.
    pub fn from_text(s: &str) -> Raw {
        match s.trim().to_ascii_lowercase().as_str() {
            "false" | "off" | "no" => Raw::Bool(false),
            "true" | "on" | "yes" => Raw::Bool(true),
            _ => Raw::Str(s.trim().to_string()),
        }
    }
}

/// Collects layers and builds a [`MemoryConfig`].
#[derive(Debug, Default)]
pub struct Loader {
    values: BTreeMap<&'static str, (Raw, String)>,
}

fn known(key: &str) -> Option<&'static str> {
    let key = key.strip_prefix("distributed.").unwrap_or(key);
    KEYS.iter().copied().find(|k| *k == key)
}

fn unknown(key: &str, origin: &str) -> String {
    format!(
        "unknown config key `{key}` in {origin}; known keys: {}",
        KEYS.join(", ")
    )
}

impl Loader {
    /// An empty loader (defaults only).
    pub fn new() -> Loader {
        Loader::default()
    }

    /// Sets one key from a given origin (later calls win).
    pub fn set(&mut self, key: &str, raw: Raw, origin: &str) -> Result<(), String> {
        let k = known(key).ok_or_else(|| unknown(key, origin))?;
        self.values.insert(k, (raw, origin.to_string()));
        Ok(())
    }

    /// Reads a TOML file.
    pub fn file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        self.toml_text(&text, &path.display().to_string())
    }

    /// Reads TOML text (`origin` names it in errors).
    pub fn toml_text(&mut self, text: &str, origin: &str) -> Result<(), String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("malformed config file {origin}: {e}"))?;
        let mut flat = Vec::new();
        flatten("", &toml::Value::Table(table), &mut flat);
        for (key, value) in flat {
            let raw = match value {
                toml::Value::Boolean(b) => Raw::Bool(b),
                toml::Value::Integer(i) => Raw::Num(i as f64),
                toml::Value::Float(f) => Raw::Num(f),
                toml::Value::String(s) => Raw::Str(s),
                other => {
                    return Err(format!(
                        "config key `{key}` in {origin}: unsupported value {other}"
                    ));
                }
            };
            self.set(&key, raw, &format!("config file {origin}"))?;
        }
        Ok(())
    }

    /// Reads `AMM_A__B__C_D=value` variables (only names with `__`).
    pub fn env<I: IntoIterator<Item = (String, String)>>(&mut self, vars: I) -> Result<(), String> {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("AMM_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let key = rest
                .split("__")
                .map(|p| p.to_ascii_lowercase().replace('_', "-"))
                .collect::<Vec<_>>()
                .join(".");
            let origin = format!("environment variable {name}");
            if known(&key).is_none() {
                return Err(unknown(&key, &origin));
            }
            self.set(&key, Raw::from_text(&value), &origin)?;
        }
        Ok(())
    }

    /// Checks every value and builds the configuration.
    pub fn build(&self) -> Result<MemoryConfig, String> {
        let mut c = MemoryConfig::default();
        for (key, (raw, origin)) in &self.values {
            let bad = |why: String| {
                format!(
                    "invalid value {} for `{key}` (from {origin}): {why}",
                    raw.describe()
                )
            };
            match *key {
                "worker.memory.target" => c.target = fraction(raw).map_err(bad)?,
                "worker.memory.spill" => c.spill = fraction(raw).map_err(bad)?,
                "worker.memory.pause" => c.pause = fraction(raw).map_err(bad)?,
                "worker.memory.terminate" => c.terminate = fraction(raw).map_err(bad)?,
                "worker.memory.monitor-interval" => {
                    c.monitor_interval = duration(raw).map_err(bad)?;
                    if c.monitor_interval.is_zero() {
                        return Err(bad("must be more than 0".into()));
                    }
                }
                "worker.memory.recent-to-old-time" => {
                    c.recent_to_old_time = duration(raw).map_err(bad)?
                }
                "worker.memory.max-spill" => c.max_spill = bytes_or_false(raw).map_err(bad)?,
                "worker.memory.trim-threshold" => {
                    c.trim_threshold = bytes_or_false(raw).map_err(bad)?
                }
                "worker.memory.purge-interval" => c.purge_interval = duration(raw).map_err(bad)?,
                "worker.memory.probe-purge" => {
                    c.probe_purge = match raw {
                        Raw::Bool(false) => None,
                        Raw::Bool(true) => Some(Duration::from_secs(5)),
                        other => Some(duration(other).map_err(bad)?),
                    };
                    if c.probe_purge.is_some_and(|d| d.is_zero()) {
                        return Err(bad("must be more than 0 (or false)".into()));
                    }
                }
                "worker.memory.spill-fsync" => c.spill_fsync = boolean(raw).map_err(bad)?,
                "worker.memory.spill-drop-cache" => {
                    c.spill_drop_cache = boolean(raw).map_err(bad)?
                }
                "worker.agent.socket" => c.agent_socket = path_or_false(raw).map_err(bad)?,
                "worker.agent.terminate-signal" => {
                    c.agent_terminate_signal = signal_or_false(raw).map_err(bad)?
                }
                "worker.agent.observe-only" => c.agent_observe_only = boolean(raw).map_err(bad)?,
                _ => return Err(unknown(key, origin)),
            }
        }
        Ok(c)
    }
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

fn fraction(raw: &Raw) -> Result<Option<f64>, String> {
    let f = match raw {
        Raw::Bool(false) => return Ok(None),
        Raw::Bool(true) => return Err("expected a fraction in (0, 1] or false".into()),
        Raw::Num(n) => *n,
        Raw::Str(s) => s
            .parse::<f64>()
            .map_err(|_| "expected a fraction in (0, 1] or false".to_string())?,
    };
    if !(f > 0.0 && f <= 1.0) {
        return Err("a fraction must be in (0, 1] (use false to disable)".into());
    }
    Ok(Some(f))
}

fn duration(raw: &Raw) -> Result<Duration, String> {
    match raw {
        Raw::Num(n) => parse_duration(&n.to_string()),
        Raw::Str(s) => parse_duration(s),
        Raw::Bool(_) => Err("expected a duration such as 200ms".into()),
    }
}

fn bytes_or_false(raw: &Raw) -> Result<Option<u64>, String> {
    match raw {
        Raw::Bool(false) => Ok(None),
        Raw::Bool(true) => Err("expected a size or false".into()),
        Raw::Num(n) if *n < 0.0 => Err("a size cannot be negative".into()),
        Raw::Num(n) => Ok(Some(*n as u64)),
        Raw::Str(s) => parse_bytes(s).map(Some),
    }
}

fn path_or_false(raw: &Raw) -> Result<Option<std::path::PathBuf>, String> {
    match raw {
        Raw::Bool(false) => Ok(None),
        Raw::Str(s) if !s.trim().is_empty() => Ok(Some(std::path::PathBuf::from(s.trim()))),
        _ => Err("expected a socket path, or false".into()),
    }
}

/// A signal by number (1-64) or name (`SIGKILL`, `KILL`, `SIGTERM`, ...).
fn signal_or_false(raw: &Raw) -> Result<Option<i32>, String> {
    let named = |s: &str| -> Option<i32> {
        let s = s.trim().to_ascii_uppercase();
        let s = s.strip_prefix("SIG").unwrap_or(&s);
        Some(match s {
            "KILL" => libc::SIGKILL,
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "ABRT" => libc::SIGABRT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            other => other.parse().ok()?,
        })
    };
    match raw {
        Raw::Bool(false) => Ok(None),
        Raw::Num(n) if n.fract() == 0.0 && (1.0..=64.0).contains(n) => Ok(Some(*n as i32)),
        Raw::Str(s) => match named(s) {
            Some(n) if (1..=64).contains(&n) => Ok(Some(n)),
            _ => Err("expected a signal such as SIGKILL or 9, or false".into()),
        },
        _ => Err("expected a signal such as SIGKILL or 9, or false".into()),
    }
}

fn boolean(raw: &Raw) -> Result<bool, String> {
    match raw {
        Raw::Bool(b) => Ok(*b),
        _ => Err("expected true or false".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_dasks() {
        let c = Loader::new().build().expect("defaults");
        assert_eq!(c, MemoryConfig::default());
        assert_eq!(c.target, Some(0.6));
        assert_eq!(c.monitor_interval, Duration::from_millis(200));
        assert_eq!(c.trim_threshold, Some(65536));
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let mut l = Loader::new();
        l.toml_text(
            "[worker.memory]\ntarget = 0.4\nspill = 0.65\npause = false\nmonitor-interval = \"100ms\"\nmax-spill = \"1GiB\"\n",
            "test.toml",
        )
        .expect("file");
        l.env(vec![
            ("AMM_WORKER__MEMORY__TARGET".to_string(), "0.5".to_string()),
            (
                "AMM_WORKER__MEMORY__MONITOR_INTERVAL".to_string(),
                "50ms".to_string(),
            ),
            ("AMM_REQUIRE_ROOT".to_string(), "1".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .expect("env");
        l.set("worker.memory.target", Raw::from_text("0.55"), "--target")
            .expect("flag");
        let c = l.build().expect("build");
        assert_eq!(c.target, Some(0.55));
        assert_eq!(c.spill, Some(0.65));
        assert_eq!(c.pause, None);
        assert_eq!(c.terminate, Some(0.95));
        assert_eq!(c.monitor_interval, Duration::from_millis(50));
        assert_eq!(c.max_spill, Some(1 << 30));
    }

    #[test]
    fn dask_prefix_is_accepted() {
        let mut l = Loader::new();
        l.toml_text("[distributed.worker.memory]\nterminate = false\n", "d.toml")
            .expect("file");
        assert_eq!(l.build().expect("build").terminate, None);
    }

    #[test]
    fn malformed_config_is_a_clear_error() {
        let mut l = Loader::new();
        let e = l
            .toml_text("[worker.memory\ntarget = ", "bad.toml")
            .expect_err("must fail");
        assert!(e.contains("malformed config file bad.toml"), "{e}");

        let mut l = Loader::new();
        let e = l
            .toml_text("[worker.memory]\ntargte = 0.5\n", "typo.toml")
            .expect_err("must fail");
        assert!(
            e.contains("unknown config key `worker.memory.targte`"),
            "{e}"
        );

        let mut l = Loader::new();
        l.toml_text("[worker.memory]\ntarget = 1.5\n", "f.toml")
            .expect("parses");
        let e = l.build().expect_err("must fail");
        assert!(
            e.contains("worker.memory.target") && e.contains("f.toml"),
            "{e}"
        );

        let mut l = Loader::new();
        l.env(vec![(
            "AMM_WORKER__MEMORY__SPILL".to_string(),
            "banana".to_string(),
        )])
        .expect("env");
        let e = l.build().expect_err("must fail");
        assert!(e.contains("AMM_WORKER__MEMORY__SPILL"), "{e}");

        let mut l = Loader::new();
        let e = l
            .env(vec![(
                "AMM_WORKER__MEMORY__TARGT".to_string(),
                "0.5".to_string(),
            )])
            .expect_err("must fail");
        assert!(e.contains("unknown config key"), "{e}");

        let mut l = Loader::new();
        l.set(
            "worker.memory.monitor-interval",
            Raw::from_text("0ms"),
            "--monitor-interval",
        )
        .expect("set");
        assert!(l.build().is_err());
    }
}
