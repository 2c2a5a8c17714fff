//! Byte sizes and durations as people write them (`4GiB`, `512 MB`, `200ms`),
//! with Dask's meanings: `kB`/`MB`/`GB` are powers of 1000, `KiB`/`MiB`/`GiB`
//! powers of 1024; a bare number of seconds is a duration.

use std::time::Duration;

/// Parses a byte size: an integer or decimal number with an optional unit
/// (`B`, `k`/`kB`, `M`/`MB`, `G`/`GB`, `T`/`TB`, `KiB`, `MiB`, `GiB`,
/// `TiB`, case-insensitive; spaces allowed). Rejects negative numbers,
/// non-numbers and results that do not fit in 64 bits.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty size".to_string());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(s.len());
    // `e` is only part of the number when followed by a digit (1e9).
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    let number: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (expected e.g. 4GiB, 512MB, 1073741824)"))?;
    if !number.is_finite() {
        return Err(format!("{text:?} is not a finite size"));
    }
    if number < 0.0 {
        return Err(format!("{text:?} is negative: a size must be >= 0"));
    }
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = number * mult;
    if bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: a number with `us`, `ms`, `s`, `m`, `h`, or a bare
/// number of seconds (Dask's `parse_timedelta`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let number: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (expected e.g. 200ms, 1.5s, 30)"))?;
    if !number.is_finite() || number < 0.0 {
        return Err(format!("{text:?} is not a duration >= 0"));
    }
    let secs = match unit.trim().to_ascii_lowercase().as_str() {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "" | "s" | "sec" | "secs" | "seconds" => number,
        "m" | "min" | "minutes" => number * 60.0,
        "h" | "hours" => number * 3600.0,
        u => {
            return Err(format!(
                "{text:?} has an unknown unit {u:?} (use us, ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// Formats bytes for people: `1.50 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("4 GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_bytes("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("8m"), Ok(8_000_000));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert!(parse_bytes("banana").is_err());
        assert!(
            parse_bytes("-1GiB")
                .expect_err("must fail")
                .contains("negative")
        );
        assert!(
            parse_bytes("5 parsecs")
                .expect_err("must fail")
                .contains("unit")
        );
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 fortnights").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
    }
}
