//! What a config value is before it is checked ([`Raw`]), and the parsers
//! that check it: each turns a [`Raw`] into a key's type or says what it
//! expected. A key's declaration in [`super::keys`] names one of them.

use std::path::PathBuf;
use std::time::Duration;

use crate::units::{parse_bytes, parse_duration};

/// A value before it is checked against its key.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// `true`/`false`.
    Bool(bool),
    /// A TOML integer.
    Int(i64),
    /// A TOML float (may be NaN or infinite: the parsers refuse those).
    Float(f64),
    /// Text (sizes, durations, or anything from the environment or a flag).
    Str(String),
}

impl Raw {
    /// How the value reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Raw::Bool(b) => b.to_string(),
            Raw::Int(n) => n.to_string(),
            Raw::Float(n) => n.to_string(),
            Raw::Str(s) => format!("{s:?}"),
        }
    }

    /// Text from env or flags: `false`/`true` (and `off`/`on`, `no`/`yes`)
    /// become booleans, the rest stays text and is parsed by the key's own
    /// rules.
    pub fn from_text(s: &str) -> Raw {
        match s.trim().to_ascii_lowercase().as_str() {
            "false" | "off" | "no" => Raw::Bool(false),
            "true" | "on" | "yes" => Raw::Bool(true),
            _ => Raw::Str(s.trim().to_string()),
        }
    }

    /// A TOML value, or why it cannot be one.
    pub fn from_toml(v: toml::Value) -> Result<Raw, String> {
        match v {
            toml::Value::Boolean(b) => Ok(Raw::Bool(b)),
            toml::Value::Integer(i) => Ok(Raw::Int(i)),
            toml::Value::Float(f) => Ok(Raw::Float(f)),
            toml::Value::String(s) => Ok(Raw::Str(s)),
            other => Err(format!(
                "unsupported value {other} (give a number, text or true/false)"
            )),
        }
    }

    /// The text a number or string stands for (for the unit parsers).
    fn text(&self) -> Option<String> {
        match self {
            Raw::Int(n) => Some(n.to_string()),
            Raw::Float(n) if n.is_finite() => Some(n.to_string()),
            Raw::Str(s) => Some(s.clone()),
            _ => None,
        }
    }
}

const FRACTION: &str = "expected a fraction in (0, 1] such as 0.7, or false";

/// A fraction of the memory limit in (0, 1], or `false` for off.
pub fn fraction_or_false(raw: &Raw) -> Result<Option<f64>, String> {
    let f = match raw {
        Raw::Bool(false) => return Ok(None),
        Raw::Bool(true) => return Err(FRACTION.into()),
        Raw::Int(n) => *n as f64,
        Raw::Float(n) => *n,
        Raw::Str(s) => s.parse::<f64>().map_err(|_| FRACTION.to_string())?,
    };
    if !(f > 0.0 && f <= 1.0) {
        return Err("a fraction must be in (0, 1] (use false to switch the level off)".into());
    }
    Ok(Some(f))
}

/// A duration: `200ms`, `1.5s`, or a bare number of seconds.
pub fn duration(raw: &Raw) -> Result<Duration, String> {
    raw.text()
        .ok_or_else(|| "expected a duration such as 200ms".to_string())
        .and_then(|t| parse_duration(&t))
}

/// A duration of more than zero.
pub fn positive_duration(raw: &Raw) -> Result<Duration, String> {
    let d = duration(raw)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// A duration of more than zero, `false` for never, `true` for `when_true`.
fn duration_or_false(raw: &Raw, when_true: Duration) -> Result<Option<Duration>, String> {
    let d = match raw {
        Raw::Bool(false) => return Ok(None),
        Raw::Bool(true) => when_true,
        other => duration(other)?,
    };
    if d.is_zero() {
        return Err("must be more than 0 (or false)".into());
    }
    Ok(Some(d))
}

/// `probe-purge`: an interval, `true` (5 s) or `false`.
pub fn probe_interval(raw: &Raw) -> Result<Option<Duration>, String> {
    duration_or_false(raw, Duration::from_secs(5))
}

/// A time limit, or `false` for none (`true` is refused: say how long).
pub fn timeout_or_false(raw: &Raw) -> Result<Option<Duration>, String> {
    match raw {
        Raw::Bool(true) => Err("expected a duration such as 5m, or false".into()),
        other => duration_or_false(other, Duration::ZERO),
    }
}

/// A byte size (`10GiB`, or a whole number of bytes), or `false`. NaN,
/// infinities, negative and fractional numbers of bytes are refused.
pub fn bytes_or_false(raw: &Raw) -> Result<Option<u64>, String> {
    match raw {
        Raw::Bool(false) => Ok(None),
        Raw::Bool(true) => Err("expected a size such as 10GiB, or false".into()),
        Raw::Int(n) => u64::try_from(*n)
            .map(Some)
            .map_err(|_| "a size cannot be negative".into()),
        Raw::Float(n) if !n.is_finite() => {
            Err(format!("{n} is not a size (expected e.g. 10GiB, or false)"))
        }
        Raw::Float(n) if *n < 0.0 => Err("a size cannot be negative".into()),
        Raw::Float(n) if n.fract() != 0.0 => Err(format!(
            "{n} is not a whole number of bytes (give a unit, e.g. \"1.5MiB\")"
        )),
        Raw::Float(n) => parse_bytes(&format!("{n}")).map(Some),
        Raw::Str(s) => parse_bytes(s).map(Some),
    }
}

/// A path (the agent's socket), or `false`.
pub fn path_or_false(raw: &Raw) -> Result<Option<PathBuf>, String> {
    match raw {
        Raw::Bool(false) => Ok(None),
        Raw::Str(s) if !s.trim().is_empty() => Ok(Some(PathBuf::from(s.trim()))),
        _ => Err("expected a socket path, or false".into()),
    }
}

/// A signal by number (1-64) or name (`SIGKILL`, `KILL`, `SIGTERM`, ...),
/// or `false`.
pub fn signal_or_false(raw: &Raw) -> Result<Option<i32>, String> {
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
    let n = match raw {
        Raw::Bool(false) => return Ok(None),
        Raw::Int(n) => i32::try_from(*n).ok(),
        Raw::Str(s) => named(s),
        _ => None,
    };
    match n {
        Some(n) if (1..=64).contains(&n) => Ok(Some(n)),
        _ => Err("expected a signal such as SIGKILL or 9, or false".into()),
    }
}

/// A `SCHED_FIFO` priority, 1-99, or `false` (0 is `false` too).
pub fn priority_or_false(raw: &Raw) -> Result<Option<u8>, String> {
    let n = match raw {
        Raw::Bool(false) => return Ok(None),
        Raw::Int(n) => Some(*n),
        Raw::Str(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(0) => Ok(None),
        Some(n @ 1..=99) => Ok(Some(n as u8)),
        _ => Err("expected a SCHED_FIFO priority 1-99, or false".into()),
    }
}

/// `true` or `false`.
pub fn boolean(raw: &Raw) -> Result<bool, String> {
    match raw {
        Raw::Bool(b) => Ok(*b),
        _ => Err("expected true or false".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_priority_is_1_to_99_or_false() {
        assert_eq!(priority_or_false(&Raw::from_text("1")), Ok(Some(1)));
        assert_eq!(priority_or_false(&Raw::Int(99)), Ok(Some(99)));
        assert_eq!(priority_or_false(&Raw::from_text("false")), Ok(None));
        assert_eq!(priority_or_false(&Raw::Int(0)), Ok(None));
        for bad in [
            Raw::Int(100),
            Raw::Int(-1),
            Raw::from_text("true"),
            Raw::from_text("high"),
        ] {
            let e = priority_or_false(&bad).expect_err("refused");
            assert!(e.contains("1-99"), "{e}");
        }
    }

    #[test]
    fn nan_and_fractional_bytes_are_refused() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.5] {
            let e = bytes_or_false(&Raw::Float(bad)).expect_err("must fail");
            assert!(!e.contains("negative") || bad < 0.0, "{bad}: {e}");
        }
        assert_eq!(bytes_or_false(&Raw::Float(1024.0)), Ok(Some(1024)));
        assert_eq!(bytes_or_false(&Raw::Int(1 << 40)), Ok(Some(1 << 40)));
        assert!(bytes_or_false(&Raw::Int(-1)).is_err());
        assert!(fraction_or_false(&Raw::Float(f64::NAN)).is_err());
        assert!(duration(&Raw::Float(f64::NAN)).is_err());
        assert!(signal_or_false(&Raw::Int(1 << 40)).is_err());
    }
}
