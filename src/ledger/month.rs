//! Calendar months (UTC): the unit of the refill and of its ledger key.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// The prefix of every monthly refill's ledger key.
pub(crate) const REFILL_KEY_PREFIX: &str = "MONTHLY-CREDIT-TOP-UP-";

/// A calendar month (UTC), written `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(NaiveDate);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("month: expected YYYY-MM (e.g. 2026-12), got {0:?}")]
pub struct MonthError(pub String);

impl Month {
    pub fn of(at: DateTime<Utc>) -> Self {
        Month(NaiveDate::from_ymd_opt(at.year(), at.month(), 1).unwrap_or(NaiveDate::MIN))
    }

    /// The month a day is in.
    pub(crate) fn of_day(day: NaiveDate) -> Self {
        Month(day.with_day(1).unwrap_or(day))
    }

    pub fn first_day(self) -> NaiveDate {
        self.0
    }

    /// The month after this one.
    pub(crate) fn next(self) -> Self {
        Month(
            self.0
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(NaiveDate::MAX),
        )
    }

    /// The ledger key of this month's refill grant.
    pub fn refill_key(self) -> String {
        format!("{REFILL_KEY_PREFIX}{self}")
    }
}

impl FromStr for Month {
    type Err = MonthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MonthError(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        // Digits only: `i32`'s parse would also take a sign ("+999-01", "2026-+1").
        let digits =
            |part: &str, n: usize| part.len() == n && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(y, 4) || !digits(m, 2) {
            return Err(err());
        }
        let y: i32 = y.parse().map_err(|_| err())?;
        // Year 0 (1 BC) is a date, but not one the ledger's dates may hold (migration 0020).
        if y == 0 {
            return Err(err());
        }
        let m: u32 = m.parse().map_err(|_| err())?;
        NaiveDate::from_ymd_opt(y, m, 1).map(Month).ok_or_else(err)
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.0.year(), self.0.month())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn months_parse_and_print() {
        assert_eq!("2026-12".parse::<Month>().unwrap().to_string(), "2026-12");
        for edge in ["0001-01", "9999-12"] {
            assert_eq!(edge.parse::<Month>().unwrap().to_string(), edge);
        }
        assert_eq!(
            "2026-01".parse::<Month>().unwrap().refill_key(),
            "MONTHLY-CREDIT-TOP-UP-2026-01"
        );
        for bad in [
            "2026-13",
            "2026-1",
            "26-01",
            "2026/01",
            "",
            "2026-00",
            "abcd-ef",
            "+999-01",
            "2026-+1",
            "-999-01",
            "2026-01-01",
            "0000-01",
        ] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap();
        assert_eq!(Month::of(at).to_string(), "2026-11");
    }
}
