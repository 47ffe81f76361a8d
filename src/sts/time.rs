//! The two timestamp forms STS uses: `X-Amz-Date` (`20150830T123600Z`) and ISO 8601
//! (`2015-08-30T12:36:00Z`), formatted from and parsed to Unix seconds. Pure; the calendar
//! arithmetic (proleptic Gregorian, no leap seconds, as Unix time) is [`crate::utc`]'s.

use crate::utc::{DateTime, civil_from_days, days_from_civil};

/// `2015-08-30T12:36:00Z`.
pub fn iso8601(unix: i64) -> String {
    let p = DateTime::from_unix(unix);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        p.year, p.month, p.day, p.hour, p.minute, p.second
    )
}

/// `20150830T123600Z`.
pub fn amz_date(unix: i64) -> String {
    let p = DateTime::from_unix(unix);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        p.year, p.month, p.day, p.hour, p.minute, p.second
    )
}

/// Parses `YYYYMMDDTHHMMSSZ` into Unix seconds; `None` unless exactly that form and a real
/// date and time.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&month) || day == 0 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    // Reject 31 February and friends: the day must survive the round trip.
    if civil_from_days(days) != (i64::from(year), month, day) {
        return None;
    }
    Some(days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_440_938_160), "2015-08-30T12:36:00Z");
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_and_round_trips() {
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_799] {
            assert_eq!(parse_amz_date(&amz_date(t)), Some(t));
        }
    }

    #[test]
    fn rejects_malformed_dates() {
        for s in [
            "",
            "20150830T123600",
            "20150830 123600Z",
            "2015083OT123600Z",
            "20150230T123600Z",
            "20151301T000000Z",
            "20150830T243600Z",
            "20150830T126000Z",
            "+0150830T123600Z",
            "2015-08-30T12:36:00Z",
        ] {
            assert_eq!(parse_amz_date(s), None, "{s}");
        }
    }
}
