//! The worker's memory limit: `--memory-limit auto|available|SIZE|FRACTION|0`.
//!
//! * `auto`: the smallest of total RAM, the cgroup limits of the process's own
//!   memory cgroup and its ancestors (v2 `memory.max`/`memory.high`, v1
//!   `memory.limit_in_bytes`/`memory.soft_limit_in_bytes`) and `RLIMIT_RSS`.
//! * `available`: `MemAvailable` at start (what Coiled sets as the limit).
//! * `SIZE` (`4GiB`, `512MB`, `1073741824`): that many bytes; more than the
//!   machine's RAM is an error, and so is less than [`MIN_LIMIT`] (a worker
//!   cannot live in less, and `1`, `0.4B` or `2e-9` are typos, not limits).
//! * `FRACTION` (`0.5`, `1.0`: written with a decimal point, in (0, 1]):
//!   that part of the `auto` limit. A bare `1` is one byte, refused as too
//!   small, with a hint to write `1.0`.
//! * `0` (or `none`, `false`): no limit (every threshold is then off). This
//!   is the only way to ask for no limit: nothing else silently means it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

use crate::proc::kb_field;
use crate::units::{format_bytes, parse_bytes};
use amm_cgroup::{self as cgroup, CgroupLimit};

/// The least memory limit a worker accepts: below it the worker itself
/// (~10 MiB of code, threads and allocator metadata) does not fit.
pub const MIN_LIMIT: u64 = 16 << 20;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitSpec {
    /// The minimum of what the host and cgroups allow.
    Auto,
    /// `MemAvailable` at start.
    Available,
    /// A size in bytes.
    Bytes(u64),
    /// A fraction of the `auto` limit.
    Fraction(f64),
    /// No limit.
    Unlimited,
}

/// Why a limit could not be set.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitError {
    /// The text is neither a keyword, a size nor a fraction.
    #[error(
        "invalid memory limit {0:?}: expected `auto`, `available`, a size such as `4GiB`, a fraction in (0, 1] such as `0.5`, or `0` for no limit"
    )]
    Invalid(String),
    /// A negative number.
    #[error("invalid memory limit {0:?}: a memory limit cannot be negative")]
    Negative(String),
    /// A fraction above 1.
    #[error(
        "invalid memory limit {0:?}: a fraction must be in (0, 1]; for a size give a unit (e.g. `2GiB`)"
    )]
    FractionTooLarge(String),
    /// Less than a worker needs (or a typo for a fraction or a unit).
    #[error(
        "memory limit {text:?} is {bytes} bytes, less than the {min} a worker needs; write a fraction with a decimal point (1.0 is the whole auto limit, 0.5 half of it), a size with a unit (2GiB), or 0 for no limit",
        min = format_bytes(MIN_LIMIT)
    )]
    TooSmall {
        /// What was written.
        text: String,
        /// What it came to.
        bytes: u64,
    },
    /// More than the machine has.
    #[error("memory limit {asked} is more than this machine's RAM ({ram})")]
    OverRam {
        /// The limit asked for, formatted.
        asked: String,
        /// Total RAM, formatted.
        ram: String,
    },
    /// The host's memory could not be read.
    #[error("cannot read the host's memory: {0}")]
    Host(String),
}

impl FromStr for LimitSpec {
    type Err = LimitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        match s.to_ascii_lowercase().as_str() {
            "auto" => return Ok(LimitSpec::Auto),
            "available" => return Ok(LimitSpec::Available),
            "0" | "none" | "false" => return Ok(LimitSpec::Unlimited),
            _ => {}
        }
        if s.starts_with('-') {
            return Err(LimitError::Negative(text.to_string()));
        }
        // A fraction is written as one: digits and a decimal point only.
        let fraction_like =
            !s.is_empty() && s.contains('.') && s.chars().all(|c| c.is_ascii_digit() || c == '.');
        if fraction_like {
            let f: f64 = s
                .parse()
                .map_err(|_| LimitError::Invalid(text.to_string()))?;
            if f == 0.0 {
                // 0.0, 0.000: a fraction of nothing is not "no limit"
                return Err(LimitError::TooSmall {
                    text: text.to_string(),
                    bytes: 0,
                });
            }
            if f > 1.0 {
                return Err(LimitError::FractionTooLarge(text.to_string()));
            }
            return Ok(LimitSpec::Fraction(f));
        }
        match parse_bytes(s) {
            Ok(b) if b < MIN_LIMIT => Err(LimitError::TooSmall {
                text: text.to_string(),
                bytes: b,
            }),
            Ok(b) => Ok(LimitSpec::Bytes(b)),
            Err(_) => Err(LimitError::Invalid(text.to_string())),
        }
    }
}

/// The facts `auto` and `available` are made of.
#[derive(Debug, Clone, Serialize)]
pub struct HostMemory {
    /// `MemTotal`.
    pub total_ram: u64,
    /// `MemAvailable` now.
    pub available: u64,
    /// The cgroup limits that apply (may be empty).
    pub cgroup: Vec<CgroupLimit>,
    /// `RLIMIT_RSS` if set.
    pub rlimit_rss: Option<u64>,
}

impl HostMemory {
    /// Reads `<root>/proc/meminfo` and the cgroup files below `root`;
    /// `rlimit_rss` is given by the caller (see [`rlimit_rss`]).
    pub fn read(root: &Path, rlimit_rss: Option<u64>) -> Result<HostMemory, LimitError> {
        let meminfo_path = root.join("proc/meminfo");
        let meminfo = std::fs::read_to_string(&meminfo_path)
            .map_err(|e| LimitError::Host(format!("{}: {e}", meminfo_path.display())))?;
        let total_ram = kb_field(&meminfo, "MemTotal").ok_or_else(|| {
            LimitError::Host(format!("no MemTotal in {}", meminfo_path.display()))
        })?;
        let available = kb_field(&meminfo, "MemAvailable").unwrap_or(total_ram);
        let cgroup = match cgroup::find(root).map_err(|e| LimitError::Host(e.to_string()))? {
            Some(cg) => cg.limits().map_err(LimitError::Host)?,
            None => Vec::new(),
        };
        Ok(HostMemory {
            total_ram,
            available,
            cgroup,
            rlimit_rss,
        })
    }

    /// This machine, this process.
    pub fn current() -> Result<HostMemory, LimitError> {
        HostMemory::read(Path::new("/"), rlimit_rss())
    }
}

/// `RLIMIT_RSS` of this process, `None` when unlimited.
pub fn rlimit_rss() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_RSS) {
        Ok((soft, _)) if soft != RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// The effective limit and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limit {
    /// Bytes, or `None` for no limit.
    pub bytes: Option<u64>,
    /// Where the number came from (`cgroup v1 /sys/fs/cgroup/memory/x/memory.limit_in_bytes`, ...).
    pub source: String,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bytes {
            Some(b) => write!(f, "{} ({b} bytes) from {}", format_bytes(b), self.source),
            None => write!(f, "none ({})", self.source),
        }
    }
}

/// The `auto` limit: the smallest candidate, with its source.
pub fn auto(host: &HostMemory) -> Limit {
    let mut best = (host.total_ram, "total RAM (MemTotal)".to_string());
    for c in &host.cgroup {
        if c.bytes < best.0 {
            best = (c.bytes, format!("cgroup {}", c.file.display()));
        }
    }
    if let Some(r) = host.rlimit_rss
        && r < best.0
    {
        best = (r, "RLIMIT_RSS".to_string());
    }
    Limit {
        bytes: Some(best.0),
        source: best.1,
    }
}

/// Turns a spec into the effective limit.
pub fn resolve(spec: LimitSpec, host: &HostMemory) -> Result<Limit, LimitError> {
    match spec {
        LimitSpec::Unlimited => Ok(Limit {
            bytes: None,
            source: "--memory-limit 0 (no limit)".to_string(),
        }),
        LimitSpec::Auto => Ok(auto(host)),
        LimitSpec::Available => Ok(Limit {
            bytes: Some(host.available),
            source: "MemAvailable at start".to_string(),
        }),
        LimitSpec::Bytes(b) => {
            if b > host.total_ram {
                return Err(LimitError::OverRam {
                    asked: format_bytes(b),
                    ram: format_bytes(host.total_ram),
                });
            }
            Ok(Limit {
                bytes: Some(b),
                source: "--memory-limit".to_string(),
            })
        }
        LimitSpec::Fraction(f) => {
            let base = auto(host);
            let total = base.bytes.unwrap_or(host.total_ram);
            let bytes = (total as f64 * f) as u64;
            if bytes < MIN_LIMIT {
                return Err(LimitError::TooSmall {
                    text: f.to_string(),
                    bytes,
                });
            }
            Ok(Limit {
                bytes: Some(bytes),
                source: format!("{f} x auto limit, which is {base}"),
            })
        }
    }
}

/// When a hard cgroup limit that applies is below `limit`: the warning to
/// give. The kernel OOM-kills the process at the cgroup's limit, before any
/// of amm's levels that lie above it (a Dask user lost 16 of 16 workers to
/// OOM kills at 93.6 % of their limit that way, before terminate at 95 %).
pub fn cgroup_shortfall(limit: &Limit, host: &HostMemory) -> Option<String> {
    let asked = limit.bytes?;
    let hard = host
        .cgroup
        .iter()
        .filter(|c| c.is_hard())
        .min_by_key(|c| c.bytes)?;
    if hard.bytes >= asked {
        return None;
    }
    Some(format!(
        "the cgroup allows only {} ({}), less than the memory limit {}: the kernel will \
         OOM-kill the program at {:.1} % of its limit, before amm's levels above that \
         (terminate at 95 %). Give --memory-limit auto (the cgroup's limit) or a size \
         at most {}, or raise the cgroup's limit",
        format_bytes(hard.bytes),
        hard.file.display(),
        format_bytes(asked),
        100.0 * hard.bytes as f64 / asked as f64,
        format_bytes(hard.bytes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("auto".parse(), Ok(LimitSpec::Auto));
        assert_eq!("AVAILABLE".parse(), Ok(LimitSpec::Available));
        assert_eq!("0".parse(), Ok(LimitSpec::Unlimited));
        assert_eq!("0.5".parse(), Ok(LimitSpec::Fraction(0.5)));
        assert_eq!("1.0".parse(), Ok(LimitSpec::Fraction(1.0)));
        assert_eq!("4GiB".parse(), Ok(LimitSpec::Bytes(4 << 30)));
        assert_eq!("4 GB".parse(), Ok(LimitSpec::Bytes(4_000_000_000)));
        assert_eq!("1073741824".parse(), Ok(LimitSpec::Bytes(1 << 30)));
        assert!(matches!(
            "banana".parse::<LimitSpec>(),
            Err(LimitError::Invalid(_))
        ));
        assert!(matches!(
            "-1GiB".parse::<LimitSpec>(),
            Err(LimitError::Negative(_))
        ));
        assert!(matches!(
            "-0.5".parse::<LimitSpec>(),
            Err(LimitError::Negative(_))
        ));
        assert!(matches!(
            "1.5".parse::<LimitSpec>(),
            Err(LimitError::FractionTooLarge(_))
        ));
    }

    /// Issue 9 item 10: `1` was 100 % but `2` two bytes, and `0.4B`,
    /// `1e-300`, `2e-9` silently meant no limit.
    #[test]
    fn nothing_but_0_means_no_limit_and_tiny_limits_are_refused() {
        for text in ["1", "2", "0.4B", "1e-300", "2e-9", "0.0", "1000", "15MiB"] {
            match text.parse::<LimitSpec>() {
                Err(e @ LimitError::TooSmall { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains("1.0 is the whole auto limit"), "{m}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        for text in ["0", "none", "false"] {
            assert_eq!(text.parse(), Ok(LimitSpec::Unlimited), "{text}");
        }
        assert_eq!("16MiB".parse(), Ok(LimitSpec::Bytes(MIN_LIMIT)));
        assert_eq!("1e9".parse(), Ok(LimitSpec::Bytes(1_000_000_000)));
        assert_eq!(".5".parse(), Ok(LimitSpec::Fraction(0.5)));
        // A fraction too small for this machine is refused when resolved.
        let tiny = LimitSpec::Fraction(0.000_000_1);
        assert!(matches!(
            resolve(tiny, &host()),
            Err(LimitError::TooSmall { .. })
        ));
    }

    fn host() -> HostMemory {
        HostMemory {
            total_ram: 24 << 30,
            available: 20 << 30,
            cgroup: vec![],
            rlimit_rss: None,
        }
    }

    #[test]
    fn a_cgroup_below_the_limit_is_warned_about() {
        let mut h = host();
        h.cgroup.push(CgroupLimit {
            bytes: (2 << 30) - (100 << 20),
            file: "/sys/fs/cgroup/memory/dask/memory.limit_in_bytes".into(),
        });
        let asked = resolve(LimitSpec::Bytes(2 << 30), &h).expect("limit");
        let w = cgroup_shortfall(&asked, &h).expect("a warning");
        assert!(w.contains("95.1 %") && w.contains("limit_in_bytes"), "{w}");
        // auto takes the cgroup's limit: nothing to warn about
        assert_eq!(cgroup_shortfall(&auto(&h), &h), None);
        // a soft limit (memory.high, soft_limit_in_bytes) kills nobody
        let mut h = host();
        h.cgroup.push(CgroupLimit {
            bytes: 1 << 30,
            file: "/x/memory.high".into(),
        });
        assert_eq!(cgroup_shortfall(&asked, &h), None);
        assert_eq!(
            cgroup_shortfall(&resolve(LimitSpec::Unlimited, &h).expect("none"), &h),
            None
        );
    }

    #[test]
    fn over_ram_is_an_error() {
        let e = resolve(LimitSpec::Bytes(100 << 30), &host()).expect_err("must fail");
        assert!(
            e.to_string().contains("more than this machine's RAM"),
            "{e}"
        );
    }

    #[test]
    fn auto_takes_the_minimum_and_names_it() {
        let mut h = host();
        assert_eq!(auto(&h).bytes, Some(24 << 30));
        assert!(auto(&h).source.contains("MemTotal"));
        h.cgroup.push(CgroupLimit {
            bytes: 8 << 30,
            file: "/x/memory.max".into(),
        });
        h.rlimit_rss = Some(16 << 30);
        assert_eq!(auto(&h).bytes, Some(8 << 30));
        assert!(auto(&h).source.contains("memory.max"));
        h.rlimit_rss = Some(4 << 30);
        assert_eq!(auto(&h).bytes, Some(4 << 30));
        assert_eq!(auto(&h).source, "RLIMIT_RSS");
        let half = resolve(LimitSpec::Fraction(0.5), &h).expect("fraction");
        assert_eq!(half.bytes, Some(2 << 30));
        let avail = resolve(LimitSpec::Available, &h).expect("available");
        assert_eq!(avail.bytes, Some(20 << 30));
    }
}
