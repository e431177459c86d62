//! The one parser of sizes and durations that every command line and
//! configuration file of chanio uses: `4096`, `4k`, `64KiB`, `1GiB`;
//! `30s`, `250ms`, `2m`, `1.5`.

use std::time::Duration;

/// Why a size or duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// No number where one was expected.
    #[error("{0:?} is not a size (try 4k, 64MiB or 1GiB)")]
    NotASize(String),
    /// No number where one was expected.
    #[error("{0:?} is not a duration (try 30s, 250ms or 2m)")]
    NotADuration(String),
    /// A unit this parser does not know.
    #[error("unknown unit {unit:?} in {text:?} (use {known})")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The unit found.
        unit: String,
        /// The units that are known.
        known: &'static str,
    },
    /// The value overflows.
    #[error("{0:?} is too large")]
    TooLarge(String),
    /// A duration of zero, or below.
    #[error("{0:?} must be more than zero")]
    NotPositive(String),
}

/// Parses a size in bytes: a whole number with an optional binary unit,
/// case-insensitive: `b`, `k`/`kb`/`kib`, `m`/`mb`/`mib`, `g`/`gb`/`gib`,
/// `t`/`tb`/`tib` (all powers of 1024).
///
/// # Errors
/// [`UnitError`] naming the text.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::NotASize(text.into()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(UnitError::UnknownUnit {
                text: text.into(),
                unit: unit.trim().into(),
                known: "B, KiB, MiB, GiB, TiB",
            })
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| UnitError::TooLarge(text.into()))
}

/// Parses a duration: a number (fractions allowed) with an optional unit,
/// `us`, `ms`, `s` (the default), `m`/`min` or `h`. It must be more than
/// zero.
///
/// # Errors
/// [`UnitError`] naming the text.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| UnitError::NotADuration(text.into()))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(UnitError::UnknownUnit {
                text: text.into(),
                unit: other.into(),
                known: "us, ms, s, m, h",
            })
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(UnitError::TooLarge(text.into()));
    }
    if secs <= 0.0 {
        return Err(UnitError::NotPositive(text.into()));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
        assert_eq!(parse_size("1TB"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("k"), Err(UnitError::NotASize("k".into())));
        assert!(matches!(parse_size("5 furlongs"), Err(UnitError::UnknownUnit { .. })));
        assert_eq!(
            parse_size("99999999999999g"),
            Err(UnitError::TooLarge("99999999999999g".into()))
        );
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("0s"), Err(UnitError::NotPositive("0s".into())));
        assert!(parse_duration("-1s").is_err());
        assert!(matches!(
            parse_duration("5 fortnights"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(parse_duration("1e300h").is_err());
    }
}
