//! The limit a watch computes its levels from: `--limit auto` takes the
//! hard limit of the target's memory cgroup (v1 `memory.limit_in_bytes`,
//! v2 `memory.max`, the lowest on the way up the hierarchy; `amm-cgroup`),
//! and a given size above what the cgroup allows is warned about: the
//! kernel would OOM-kill the process before amm's levels above it.

use amm_cgroup::MemoryCgroup;
use anyhow::{Result, bail};
use bytesize::ByteSize;

/// `--limit`: `auto` or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitArg {
    /// The target's cgroup's hard limit.
    Auto,
    /// This many bytes.
    Bytes(u64),
}

impl std::str::FromStr for LimitArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        let b = crate::cli::parse_size(s).map_err(|e| format!("{e}, or auto (the cgroup's)"))?;
        if b == 0 {
            return Err("a limit of 0 bytes leaves no room; give auto or a size".into());
        }
        Ok(Self::Bytes(b))
    }
}

/// The limit decided, where it came from, and a warning to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Bytes.
    pub bytes: u64,
    /// Where from (`--limit`, or the cgroup file).
    pub source: String,
    /// Set when the given limit is above the cgroup's hard limit.
    pub warning: Option<String>,
}

fn iec(b: u64) -> String {
    ByteSize(b).display().iec().to_string()
}

/// Resolves `arg` for `who` (`pid 123`, `cgroup /x`) in `cgroup` (`None`:
/// in no memory cgroup that is mounted).
pub fn resolve(arg: LimitArg, cgroup: Option<&MemoryCgroup>, who: &str) -> Result<Resolved> {
    let hard = match cgroup {
        Some(cg) => cg
            .hard_limit()
            .map_err(|e| anyhow::anyhow!("cannot read the cgroup limits of {who}: {e}"))?,
        None => None,
    };
    match (arg, hard) {
        (LimitArg::Auto, Some(h)) => Ok(Resolved {
            bytes: h.bytes,
            source: format!("cgroup {}", h.file.display()),
            warning: None,
        }),
        (LimitArg::Auto, None) => {
            let place = match cgroup {
                Some(cg) => format!(
                    "its memory cgroup {} and every ancestor up to {} are unlimited \
                     (memory.max \"max\" / memory.limit_in_bytes at the kernel's maximum)",
                    cg.dir.display(),
                    cg.mount.display()
                ),
                None => "it is in no mounted memory cgroup".to_string(),
            };
            bail!("--limit auto: {who} has no memory limit (unlimited): {place}; give --limit SIZE")
        }
        (LimitArg::Bytes(b), hard) => Ok(Resolved {
            bytes: b,
            source: "--limit".into(),
            warning: hard.filter(|h| h.bytes < b).map(|h| {
                format!(
                    "--limit {} is above what the cgroup of {who} allows: {} ({}). The kernel \
                     will OOM-kill it at {:.1} % of this limit, before amm's levels above that \
                     (terminate at 95 %); give --limit auto or at most {}",
                    iec(b),
                    iec(h.bytes),
                    h.file.display(),
                    100.0 * h.bytes as f64 / b as f64,
                    iec(h.bytes)
                )
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_arguments_parse() {
        assert_eq!("auto".parse::<LimitArg>(), Ok(LimitArg::Auto));
        assert_eq!("AUTO".parse::<LimitArg>(), Ok(LimitArg::Auto));
        assert_eq!("2GiB".parse::<LimitArg>(), Ok(LimitArg::Bytes(2 << 30)));
        assert!("0".parse::<LimitArg>().is_err());
        assert!(
            "lots"
                .parse::<LimitArg>()
                .expect_err("lots")
                .contains("auto")
        );
    }

    #[test]
    fn no_cgroup_is_an_unlimited_error_and_a_size_stands() {
        let e = resolve(LimitArg::Auto, None, "pid 1").expect_err("unlimited");
        assert!(e.to_string().contains("unlimited"), "{e}");
        let r = resolve(LimitArg::Bytes(1 << 30), None, "pid 1").expect("size");
        assert_eq!(r.bytes, 1 << 30);
        assert_eq!(r.warning, None);
    }
}
