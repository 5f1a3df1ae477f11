//! Parsing of the sizes and durations that users type (flags, the config file):
//! `4096`, `64KiB`, `1GiB`; `500ms`, `30s`, `7d`.

/// Parses durations like `100us`, `500ms`, `3s`, `2m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (e.g. 500ms, 3s, 2m)"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{unit}' (us, ms, s, m, h, d)"
            ))
        }
    };
    // Also keeps `from_secs_f64` from panicking on absurd values.
    if !seconds.is_finite() || !(0.0..=1e12).contains(&seconds) {
        return Err(format!("'{text}' is not a valid duration"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// Parses sizes like `4096`, `64KiB`, `32MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 10).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 4096, 64KiB, 1GiB)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("'{text}': unknown unit '{other}' (KiB, MiB, GiB)")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses a duration into whole milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    parse_duration(text).map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("7d"), Ok(7 * 86_400_000));
        assert_eq!(
            parse_duration("250us"),
            Ok(std::time::Duration::from_micros(250))
        );
        assert!(parse_duration("999999999999999999999d").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
