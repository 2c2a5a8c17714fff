//! Byte amounts and rates as people read them.

/// `-1536` → `-1.5 KiB`, `0` → `+0 B`: a change of bytes.
pub fn signed(v: i64) -> String {
    if v < 0 {
        format!("-{}", bytes(v.unsigned_abs()))
    } else {
        format!("+{}", bytes(v as u64))
    }
}

/// `1536` → `1.5 KiB`; binary units, three significant digits.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Bytes per second, signed.
pub fn rate(bps: f64) -> String {
    if bps < 0.0 {
        format!("-{}/s", bytes((-bps) as u64))
    } else {
        format!("{}/s", bytes(bps as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(12 << 20), "12.0 MiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
        assert_eq!(rate(-1048576.0), "-1.00 MiB/s");
    }
}
