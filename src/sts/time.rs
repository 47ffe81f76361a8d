//! The two timestamp forms STS uses: `X-Amz-Date` (`20150830T123600Z`) and ISO 8601
//! (`2015-08-30T12:36:00Z`), formatted from and parsed to Unix seconds with the `time`
//! crate. Pure.

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

const ISO8601: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
const AMZ_DATE: &[BorrowedFormatItem<'_>] =
    format_description!("[year][month][day]T[hour][minute][second]Z");

/// `unix` formatted with `format`. Times outside the years 1–9999 (never a clock reading)
/// are formatted as the nearest end of that range.
fn format(unix: i64, format: &[BorrowedFormatItem<'_>]) -> String {
    let t = OffsetDateTime::from_unix_timestamp(unix).unwrap_or(if unix < 0 {
        time::macros::datetime!(0001-01-01 0:00 UTC)
    } else {
        time::macros::datetime!(9999-12-31 23:59:59 UTC)
    });
    // Cannot fail: the format has only calendar fields, and the year is four digits.
    t.format(format).unwrap_or_default()
}

/// `2015-08-30T12:36:00Z`.
pub fn iso8601(unix: i64) -> String {
    format(unix, ISO8601)
}

/// `20150830T123600Z`.
pub fn amz_date(unix: i64) -> String {
    format(unix, AMZ_DATE)
}

/// Parses `YYYYMMDDTHHMMSSZ` into Unix seconds; `None` unless exactly that form and a real
/// date and time.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let t = PrimitiveDateTime::parse(s, AMZ_DATE).ok()?;
    Some(t.assume_utc().unix_timestamp())
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
        // Every day from 1600 to 2400 (at a time of day that moves), both ways.
        let (from, to) = (-11_676_096_000_i64, 13_569_465_600_i64);
        for (i, t) in (from..to).step_by(86_400).enumerate() {
            let t = t + (i as i64 * 3_607) % 86_400;
            let text = amz_date(t);
            assert_eq!(parse_amz_date(&text), Some(t), "{text}");
            assert_eq!(
                iso8601(t).replace(['-', ':'], ""),
                text,
                "the two forms agree"
            );
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
