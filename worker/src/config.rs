//! The worker's settings, with Dask's keys, from a TOML file, `AMM_`
//! environment variables and flags (flag > env > file > default).
//!
//! **Every key is declared once**, in the [`config_keys!`] table below: its
//! field in [`MemoryConfig`], its dotted name, its flag, its value syntax,
//! its default (written as a user would write it, and parsed by the same
//! parser) and its doc. The file layer, the environment layer
//! (`AMM_WORKER__MEMORY__TARGET=0.5` sets `worker.memory.target`: `__`
//! separates levels, `_` stands for `-`), the flags of `amm-worker run`
//! (with their `--help`) and the defaults are all derived from that table;
//! adding a knob is one entry there (see CONTRIBUTING.md, "A config key").
//!
//! ```toml
//! [worker.memory]
//! target = 0.6              # fraction of the limit, or false
//! spill = 0.7
//! pause = 0.8
//! terminate = 0.95
//! monitor-interval = "200ms"
//! max-spill = false         # or a size: "10GiB"
//!
//! [worker.agent]
//! socket = "/run/amm/agent.sock"  # register with amm-agent (absent: poll only)
//! ```
//!
//! A key may also be written with Dask's `distributed.` prefix. Unknown
//! keys and malformed values are errors that name the key and where it came
//! from; the four level fractions are checked together by
//! [`amm_protocol::Fractions::validate`] (the agent's own check), so that
//! `target <= spill <= pause <= terminate` holds wherever they are read.

mod flags;
mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use flags::ConfigFlags;
pub use values::Raw;
use values::{
    boolean, bytes_or_false, fraction_or_false, path_or_false, positive_duration,
    priority_or_false, probe_interval, signal_or_false, timeout_or_false,
};

/// How a key is given on the command line of `amm-worker run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `--NAME VALUE`.
    Value(&'static str),
    /// `--NAME [VALUE]`: bare, it means the given text.
    Optional(&'static str, &'static str),
    /// `--NAME` alone, meaning the given text (e.g. `--no-drop-cache` is
    /// `spill-drop-cache = false`).
    Switch(&'static str, &'static str),
}

impl Flag {
    /// The flag's long name, without `--`.
    pub fn long(&self) -> &'static str {
        match *self {
            Flag::Value(l) | Flag::Optional(l, _) | Flag::Switch(l, _) => l,
        }
    }
}

/// One configuration key: everything the layers need to know about it.
#[derive(Debug)]
pub struct Key {
    /// Dotted name, as in the TOML file (`worker.memory.target`).
    pub name: &'static str,
    /// Its flag.
    pub flag: Flag,
    /// What a value looks like (`FRACTION|false`).
    pub value: &'static str,
    /// The default, written as a user would write it.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
    apply: fn(&mut MemoryConfig, &Raw) -> Result<(), String>,
}

impl Key {
    /// The environment variable that sets it (`AMM_WORKER__MEMORY__TARGET`).
    pub fn env(&self) -> String {
        format!(
            "AMM_{}",
            self.name
                .to_ascii_uppercase()
                .replace('.', "__")
                .replace('-', "_")
        )
    }

    /// Checks `raw` against this key's parser without keeping it.
    pub fn check(&self, raw: &Raw) -> Result<(), String> {
        (self.apply)(&mut MemoryConfig::default(), raw)
    }
}

/// Declares the keys: one entry per key makes its [`MemoryConfig`] field,
/// its [`Key`] in [`KEYS`] (file, environment, flag) and its default.
macro_rules! config_keys {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $ty:ty {
            key: $key:literal,
            flag: $flag:expr,
            value: $value:literal,
            default: $default:literal,
            parse: $parse:path
            $(, serde: $with:literal)? $(,)?
        }
    )+) => {
        /// The effective settings (see the module docs for each key).
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct MemoryConfig {
            $(
                $(#[doc = $doc])+
                $(#[serde(with = $with)])?
                pub $field: $ty,
            )+
        }

        impl Default for MemoryConfig {
            fn default() -> Self {
                MemoryConfig {
                    $($field: $parse(&Raw::from_text($default))
                        .expect(concat!("the default of ", $key, " is valid")),)+
                }
            }
        }

        /// Every key, declared once.
        pub const KEYS: &[Key] = &[$(
            Key {
                name: $key,
                flag: $flag,
                value: $value,
                default: $default,
                doc: concat!($($doc, "\n"),+),
                apply: |c, raw| {
                    c.$field = $parse(raw)?;
                    Ok(())
                },
            },
        )+];
    };
}

config_keys! {
    /// Managed memory fraction above which LRU values are spilled.
    target: Option<f64> {
        key: "worker.memory.target", flag: Flag::Value("target"),
        value: "FRACTION|false", default: "0.6", parse: fraction_or_false,
    }
    /// Process memory fraction above which values are spilled down to target.
    spill: Option<f64> {
        key: "worker.memory.spill", flag: Flag::Value("spill"),
        value: "FRACTION|false", default: "0.7", parse: fraction_or_false,
    }
    /// Process memory fraction above which no new task starts.
    pause: Option<f64> {
        key: "worker.memory.pause", flag: Flag::Value("pause"),
        value: "FRACTION|false", default: "0.8", parse: fraction_or_false,
    }
    /// Process memory fraction above which the worker exits.
    terminate: Option<f64> {
        key: "worker.memory.terminate", flag: Flag::Value("terminate"),
        value: "FRACTION|false", default: "0.95", parse: fraction_or_false,
    }
    /// How often the manager measures.
    monitor_interval: Duration {
        key: "worker.memory.monitor-interval", flag: Flag::Value("monitor-interval"),
        value: "DURATION", default: "200ms", parse: positive_duration, serde: "millis",
    }
    /// How long unmanaged memory counts as recent.
    recent_to_old_time: Duration {
        key: "worker.memory.recent-to-old-time", flag: Flag::Value("recent-to-old-time"),
        value: "DURATION", default: "30s", parse: values::duration, serde: "millis",
    }
    /// Most bytes the spill directory may hold.
    max_spill: Option<u64> {
        key: "worker.memory.max-spill", flag: Flag::Value("max-spill"),
        value: "SIZE|false", default: "false", parse: bytes_or_false,
    }
    /// How long tasks may be held back by a pause while spilling fails (a
    /// full disk, max-spill) before they fail with an error naming the
    /// spill directory and its free space; false: wait for ever, as Dask
    /// does.
    spill_full_timeout: Option<Duration> {
        key: "worker.memory.spill-full-timeout", flag: Flag::Value("spill-full-timeout"),
        value: "DURATION|false", default: "5m", parse: timeout_or_false, serde: "opt_millis",
    }
    /// `MALLOC_TRIM_THRESHOLD_` for a system-allocator worker; the hoard
    /// size above which a jemalloc worker purges; false disables both.
    trim_threshold: Option<u64> {
        key: "worker.memory.trim-threshold", flag: Flag::Value("trim-threshold"),
        value: "SIZE|false", default: "65536", parse: bytes_or_false,
    }
    /// Least time between two purges triggered by the threshold.
    purge_interval: Duration {
        key: "worker.memory.purge-interval", flag: Flag::Value("purge-interval"),
        value: "DURATION", default: "1s", parse: values::duration, serde: "millis",
    }
    /// Purge on purpose, at most this often, when memory is hoarded or
    /// unmanaged memory grew since the last purge, so that
    /// `amm-worker report` can tell a hoard (returned) from a leak or
    /// fragmentation (not returned); false: never.
    probe_purge: Option<Duration> {
        key: "worker.memory.probe-purge", flag: Flag::Optional("probe-purge", "5s"),
        value: "INTERVAL", default: "false", parse: probe_interval, serde: "opt_millis",
    }
    /// `fdatasync` each spilled value.
    spill_fsync: bool {
        key: "worker.memory.spill-fsync", flag: Flag::Switch("spill-fsync", "true"),
        value: "BOOL", default: "false", parse: boolean,
    }
    /// Write back spilled bytes and drop them from the page cache
    /// (`--no-drop-cache` leaves them there, for comparison only).
    spill_drop_cache: bool {
        key: "worker.memory.spill-drop-cache", flag: Flag::Switch("no-drop-cache", "false"),
        value: "BOOL", default: "true", parse: boolean,
    }
    /// The amm-agent socket to register with, so the kernel's events reach
    /// the worker between polls; false: poll only.
    agent_socket: Option<PathBuf> {
        key: "worker.agent.socket", flag: Flag::Value("agent"),
        value: "SOCKET", default: "false", parse: path_or_false,
    }
    /// Signal the kernel sends at the page that crosses terminate when the
    /// agent watches this worker (SIGKILL, SIGTERM, a number); false: the
    /// worker's own tick terminates.
    agent_terminate_signal: Option<i32> {
        key: "worker.agent.terminate-signal", flag: Flag::Value("agent-terminate-signal"),
        value: "SIGNAL|false", default: "SIGKILL", parse: signal_or_false,
    }
    /// Register with the agent only to record its events in the timeline;
    /// act on polls alone, with no kernel terminate signal (to measure a
    /// polling worker).
    agent_observe_only: bool {
        key: "worker.agent.observe-only", flag: Flag::Switch("agent-observe-only", "true"),
        value: "BOOL", default: "false", parse: boolean,
    }
    /// `SCHED_FIFO` priority of the thread that reads the kernel's events,
    /// where permitted (root, CAP_SYS_NICE or RLIMIT_RTPRIO), so an event
    /// is read at once even when every CPU is busy; refused or false: a
    /// short EEVDF slice (the log says which is in force).
    agent_reader_priority: Option<u8> {
        key: "worker.agent.reader-priority", flag: Flag::Value("agent-reader-priority"),
        value: "PRIORITY|false", default: "1", parse: priority_or_false,
    }
    /// After the kernel's spike alarm, the event thread busy-reads its ring
    /// for at most this long (until the next level event or the predicted
    /// terminate crossing, if sooner; at most 1s) instead of sleeping:
    /// the crossing is read within µs, for one CPU during the window;
    /// never on a single CPU. false: always sleep until woken.
    agent_reader_spin: Option<Duration> {
        key: "worker.agent.reader-spin", flag: Flag::Value("agent-reader-spin"),
        value: "DURATION|false", default: "100ms", parse: timeout_or_false, serde: "opt_millis",
    }
}

impl MemoryConfig {
    /// The four level fractions, as the agent and the BPF program take them.
    pub fn fractions(&self) -> amm_protocol::Fractions {
        amm_protocol::Fractions {
            target: self.target,
            spill: self.spill,
            pause: self.pause,
            terminate: self.terminate,
        }
    }
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

/// The key called `name` (with or without Dask's `distributed.` prefix).
pub fn key(name: &str) -> Option<&'static Key> {
    let name = name.strip_prefix("distributed.").unwrap_or(name);
    KEYS.iter().find(|k| k.name == name)
}

fn unknown(key: &str, origin: &str) -> String {
    let names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    format!(
        "unknown config key `{key}` in {origin}; known keys: {}",
        names.join(", ")
    )
}

/// Collects layers and builds a [`MemoryConfig`].
#[derive(Debug, Default)]
pub struct Loader {
    values: BTreeMap<&'static str, (Raw, String)>,
}

impl Loader {
    /// An empty loader (defaults only).
    pub fn new() -> Loader {
        Loader::default()
    }

    /// Sets one key from a given origin (later calls win).
    pub fn set(&mut self, name: &str, raw: Raw, origin: &str) -> Result<(), String> {
        let k = key(name).ok_or_else(|| unknown(name, origin))?;
        self.values.insert(k.name, (raw, origin.to_string()));
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
        flatten("", toml::Value::Table(table), &mut flat);
        for (name, value) in flat {
            let raw = Raw::from_toml(value)
                .map_err(|e| format!("config key `{name}` in {origin}: {e}"))?;
            self.set(&name, raw, &format!("config file {origin}"))?;
        }
        Ok(())
    }

    /// Reads `AMM_A__B__C_D=value` variables (only names with `__`).
    pub fn env<I: IntoIterator<Item = (String, String)>>(&mut self, vars: I) -> Result<(), String> {
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix("AMM_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let name = rest
                .split("__")
                .map(|p| p.to_ascii_lowercase().replace('_', "-"))
                .collect::<Vec<_>>()
                .join(".");
            let origin = format!("environment variable {var}");
            if key(&name).is_none() {
                let vars: Vec<String> = KEYS.iter().map(Key::env).collect();
                return Err(format!(
                    "unknown config key `{name}` in {origin}; known variables: {}",
                    vars.join(", ")
                ));
            }
            self.set(&name, Raw::from_text(&value), &origin)?;
        }
        Ok(())
    }

    /// Takes the flags given on the command line.
    pub fn flags(&mut self, flags: &ConfigFlags) -> Result<(), String> {
        for (k, text) in flags.given() {
            self.set(
                k.name,
                Raw::from_text(text),
                &format!("flag --{}", k.flag.long()),
            )?;
        }
        Ok(())
    }

    /// Where `name`'s value comes from (`None`: its default).
    fn origin(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|(_, o)| o.as_str())
    }

    /// Checks every value, then the level fractions together, and builds
    /// the configuration.
    pub fn build(&self) -> Result<MemoryConfig, String> {
        let mut c = MemoryConfig::default();
        for (name, (raw, origin)) in &self.values {
            let k = key(name).ok_or_else(|| unknown(name, origin))?;
            (k.apply)(&mut c, raw).map_err(|why| {
                format!(
                    "invalid value {} for `{name}` (from {origin}): {why}",
                    raw.describe()
                )
            })?;
        }
        c.fractions().validate().map_err(|e| {
            let from: Vec<String> = ["target", "spill", "pause", "terminate"]
                .iter()
                .map(|l| {
                    let name = format!("worker.memory.{l}");
                    format!("{l} from {}", self.origin(&name).unwrap_or("the default"))
                })
                .collect();
            format!("{e} ({})", from.join(", "))
        })?;
        Ok(c)
    }
}

fn flatten(prefix: &str, v: toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other)),
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
        assert_eq!(c.terminate, Some(0.95));
        assert_eq!(c.monitor_interval, Duration::from_millis(200));
        assert_eq!(c.trim_threshold, Some(65536));
        assert_eq!(c.agent_terminate_signal, Some(libc::SIGKILL));
        assert!(c.spill_drop_cache && !c.spill_fsync);
    }

    #[test]
    fn every_key_is_whole_and_reachable_from_every_layer() {
        let mut flags = std::collections::HashSet::new();
        for k in KEYS {
            assert!(!k.doc.trim().is_empty(), "{} has no doc", k.name);
            assert!(flags.insert(k.flag.long()), "flag of {} twice", k.name);
            k.check(&Raw::from_text(k.default))
                .unwrap_or_else(|e| panic!("default of {}: {e}", k.name));
            // The environment variable derived from the name finds the key.
            let mut l = Loader::new();
            l.env(vec![(k.env(), k.default.to_string())])
                .unwrap_or_else(|e| panic!("{}: {e}", k.env()));
            assert!(l.origin(k.name).is_some(), "{} not set by env", k.name);
            // So does a file.
            let (table, leaf) = k.name.rsplit_once('.').expect("dotted");
            let value = match k.default {
                "true" | "false" => k.default.to_string(),
                text => format!("{text:?}"),
            };
            let text = format!("[{table}]\n{leaf} = {value}\n");
            let mut l = Loader::new();
            l.toml_text(&text, "t.toml").expect("file");
            l.build().unwrap_or_else(|e| panic!("{}: {e}", k.name));
        }
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
    fn levels_out_of_order_are_refused_naming_where_they_came_from() {
        let mut l = Loader::new();
        l.set(
            "worker.memory.spill",
            Raw::from_text("0.99"),
            "flag --spill",
        )
        .expect("set");
        l.set(
            "worker.memory.terminate",
            Raw::from_text("0.5"),
            "flag --terminate",
        )
        .expect("set");
        let e = l.build().expect_err("must fail");
        assert!(
            e.contains("must not decrease") && e.contains("spill from flag --spill"),
            "{e}"
        );
    }

    #[test]
    fn nan_sizes_and_wrong_types_are_refused() {
        for text in [
            "[worker.memory]\nmax-spill = nan\n",
            "[worker.memory]\nmax-spill = inf\n",
            "[worker.memory]\nmax-spill = -1\n",
            "[worker.memory]\nmax-spill = 0.5\n",
            "[worker.memory]\ntrim-threshold = true\n",
            "[worker.memory]\ntarget = nan\n",
            "[worker.memory]\nmonitor-interval = nan\n",
            "[worker.agent]\nterminate-signal = 4294967305\n",
        ] {
            let mut l = Loader::new();
            l.toml_text(text, "f.toml").expect("parses");
            let e = l.build().expect_err(text);
            assert!(e.contains("f.toml") && e.contains("invalid value"), "{e}");
            assert!(!e.contains("NaN is negative"), "{e}");
        }
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
