//! A month's report for the books: what came into the users' accounts and went out of them in
//! a calendar month (UTC, by each row's `created_at`), by type, and what the accounts held and
//! owed at its start and end. Read in one snapshot, so the movements add up to the change in
//! positions exactly.

use std::fmt;

use chrono::{DateTime, NaiveTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::total::{parse_sum, serialize_total, too_large};
use super::{LedgerError, Month};

/// The month's ledger rows by type and direction (`in`: credits added, `out`: taken), in no
/// order: [`movements`] sorts them.
const MOVEMENTS: &str = "
SELECT type::text AS type, amount > 0 AS incoming, count(*)::int8 AS rows,
       sum(amount)::text AS credits
  FROM credit.transactions
 WHERE created_at >= $1 AND created_at < $2
 GROUP BY 1, 2";

/// Each account's position at the month's start and end (the sum of its rows before each), and
/// whether it moved in the month.
const POSITIONS: &str = "
WITH account AS (
  SELECT coalesce(sum(amount) FILTER (WHERE created_at < $1), 0) AS opening,
         sum(amount) AS closing,
         bool_or(created_at >= $1) AS active
    FROM credit.transactions
   WHERE created_at < $2
   GROUP BY user_id)
SELECT coalesce(sum(opening) FILTER (WHERE opening > 0), 0)::text AS opening_held,
       coalesce(-sum(opening) FILTER (WHERE opening < 0), 0)::text AS opening_owed,
       count(*) FILTER (WHERE opening > 0)::int8 AS opening_in_credit,
       count(*) FILTER (WHERE opening < 0)::int8 AS opening_in_debt,
       coalesce(sum(closing) FILTER (WHERE closing > 0), 0)::text AS closing_held,
       coalesce(-sum(closing) FILTER (WHERE closing < 0), 0)::text AS closing_owed,
       count(*) FILTER (WHERE closing > 0)::int8 AS closing_in_credit,
       count(*) FILTER (WHERE closing < 0)::int8 AS closing_in_debt,
       count(*) FILTER (WHERE active)::int8 AS active
  FROM account";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonthReport {
    /// `YYYY-MM`.
    pub month: String,
    /// The month's first instant; rows from here on belong to it.
    pub from: DateTime<Utc>,
    /// The next month's first instant; rows before it belong to the month.
    pub until: DateTime<Utc>,
    /// The database's time of the snapshot read: before `until`, the month is not over. A
    /// row's `created_at` is when its writer got the user's account on the worker's host, so
    /// rows of the month's last moments may still commit a little after `until`.
    pub as_of: DateTime<Utc>,
    /// From when no row dated in the month can still commit: `until` plus the longest a write
    /// may take from its stamp to its commit (the stall bound of the statement timeout).
    /// None when the statement timeout is off, which bounds nothing.
    pub final_from: Option<DateTime<Utc>>,
    /// Whether the snapshot was read at or after `final_from`: these figures are the month's
    /// for good.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Ledger rows by type and direction, in the order TOP_UP, GRANT, USAGE, REFUND.
    pub movements: Vec<Movement>,
    /// Σ of the movements: `closing.net - opening.net`.
    #[serde(serialize_with = "serialize_total")]
    pub net: i128,
    pub opening: Position,
    pub closing: Position,
    /// Accounts with a ledger row in the month.
    pub active_accounts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Movement {
    #[serde(rename = "type")]
    pub tx_type: String,
    /// `in` (credits added: purchases, grants, settlements giving back) or `out`.
    pub direction: &'static str,
    pub rows: i64,
    /// Signed: negative for `out`.
    #[serde(serialize_with = "serialize_total")]
    pub credits: i128,
}

/// What the accounts held and owed at an instant. Sums are wider than a balance: many
/// accounts may together hold more than one can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Σ of the positive balances: credits the platform owes its users.
    #[serde(serialize_with = "serialize_total")]
    pub held: i128,
    /// Σ of the negative balances, as a positive number: what users owe.
    #[serde(serialize_with = "serialize_total")]
    pub owed: i128,
    /// `held - owed`.
    #[serde(serialize_with = "serialize_total")]
    pub net: i128,
    pub accounts_in_credit: i64,
    pub accounts_in_debt: i64,
}

/// For a person: the movements as a table, then the positions.
impl fmt::Display for MonthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let day = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M").to_string();
        let read = self.as_of.format("%Y-%m-%d %H:%M:%S");
        let to_date = match self.final_from {
            _ if self.as_of < self.until => ", to date".to_owned(),
            Some(at) if !self.is_final => format!(
                ", not final before {} UTC: rows dated in the month may still commit",
                at.format("%Y-%m-%d %H:%M:%S")
            ),
            None => ", final only once no batch dated in the month is in flight".to_owned(),
            Some(_) => String::new(),
        };
        writeln!(
            f,
            "{} (rows from {} to before {} UTC{to_date}), read at {read} UTC",
            self.month,
            day(&self.from),
            day(&self.until)
        )?;
        writeln!(
            f,
            "  {:<8} {:<4} {:>10} {:>20}",
            "type", "", "rows", "credits"
        )?;
        for m in &self.movements {
            writeln!(
                f,
                "  {:<8} {:<4} {:>10} {:>20}",
                m.tx_type, m.direction, m.rows, m.credits
            )?;
        }
        writeln!(f, "  {:<8} {:<4} {:>10} {:>20}", "net", "", "", self.net)?;
        writeln!(f, "  opening: {}", self.opening)?;
        writeln!(f, "  closing: {}", self.closing)?;
        write!(
            f,
            "  {} active in the month",
            accounts(self.active_accounts)
        )
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} held by {}, {} owed by {} (net {})",
            self.held,
            accounts(self.accounts_in_credit),
            self.owed,
            accounts(self.accounts_in_debt),
            self.net
        )
    }
}

fn accounts(n: i64) -> String {
    match n {
        1 => "1 account".to_owned(),
        n => format!("{n} accounts"),
    }
}

/// Refuses a month that has not begun: its report would be empty, which reads as a month
/// without business rather than as a mistyped year.
pub(crate) fn check_begun(month: Month, now: DateTime<Utc>) -> Result<(), LedgerError> {
    if start_of(month) > now {
        return Err(LedgerError::InvalidArgument {
            field: "month",
            reason: format!("{month} has not begun (now {})", now.format("%Y-%m-%d")),
        });
    }
    Ok(())
}

fn start_of(month: Month) -> DateTime<Utc> {
    month.first_day().and_time(NaiveTime::MIN).and_utc()
}

/// The month's report, read in one snapshot (it reads the ledger up to the month's end: seconds
/// on a large one). `settle`: the longest a write may take from its stamp to its commit.
pub async fn month(
    pool: &PgPool,
    month: Month,
    now: DateTime<Utc>,
    settle: Option<std::time::Duration>,
) -> Result<MonthReport, LedgerError> {
    check_begun(month, now)?;
    let (from, until) = (start_of(month), start_of(month.next()));
    let mut tx = super::store::long_read(pool).await?;
    let as_of: DateTime<Utc> = sqlx::query_scalar("SELECT transaction_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    let movements = movements(&mut tx, from, until).await?;
    let (opening, closing, active_accounts) = positions(&mut tx, from, until).await?;
    tx.rollback().await?;
    let net = movements
        .iter()
        .try_fold(0i128, |sum, m| sum.checked_add(m.credits))
        .ok_or_else(|| too_large("the month's net movement"))?;
    let month = month.to_string();
    let final_from = settle
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .and_then(|d| until.checked_add_signed(d));
    Ok(MonthReport {
        month,
        from,
        until,
        as_of,
        final_from,
        is_final: final_from.is_some_and(|t| as_of >= t),
        movements,
        net,
        opening,
        closing,
        active_accounts,
    })
}

async fn movements(
    tx: &mut PgConnection,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Movement>, LedgerError> {
    let rows: Vec<(String, bool, i64, String)> = sqlx::query_as(MOVEMENTS)
        .bind(from)
        .bind(until)
        .fetch_all(tx)
        .await?;
    let mut out = rows
        .into_iter()
        .map(|(tx_type, incoming, rows, credits)| {
            Ok(Movement {
                credits: parse_sum(&credits, &format!("{tx_type} credits"))?,
                direction: if incoming { "in" } else { "out" },
                tx_type,
                rows,
            })
        })
        .collect::<Result<Vec<_>, LedgerError>>()?;
    out.sort_by_key(|m| (type_order(&m.tx_type), m.direction != "in"));
    Ok(out)
}

/// The order a report lists the types in: money in, then what was done with it.
fn type_order(tx_type: &str) -> usize {
    ["TOP_UP", "GRANT", "USAGE", "REFUND"]
        .iter()
        .position(|t| *t == tx_type)
        .unwrap_or(usize::MAX)
}

type PositionRow = (String, String, i64, i64, String, String, i64, i64, i64);

async fn positions(
    tx: &mut PgConnection,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<(Position, Position, i64), LedgerError> {
    let (oh, oo, oc, od, ch, co, cc, cd, active): PositionRow = sqlx::query_as(POSITIONS)
        .bind(from)
        .bind(until)
        .fetch_one(tx)
        .await?;
    let opening = position(("opening", &oh, &oo), oc, od)?;
    let closing = position(("closing", &ch, &co), cc, cd)?;
    Ok((opening, closing, active))
}

fn position(
    (at, held, owed): (&str, &str, &str),
    accounts_in_credit: i64,
    accounts_in_debt: i64,
) -> Result<Position, LedgerError> {
    let held = parse_sum(held, &format!("the credits held at the {at}"))?;
    let owed = parse_sum(owed, &format!("the debt at the {at}"))?;
    let net = held
        .checked_sub(owed)
        .ok_or_else(|| too_large(&format!("the net position at the {at}")))?;
    Ok(Position {
        held,
        owed,
        net,
        accounts_in_credit,
        accounts_in_debt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_month_not_yet_begun_is_refused_and_the_current_one_is_reported() {
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 2, 0, 0).unwrap();
        let month = |s: &str| s.parse::<Month>().unwrap();
        assert!(check_begun(month("2026-12"), now).is_ok());
        assert!(check_begun(month("1999-01"), now).is_ok());
        let err = check_begun(month("2027-01"), now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "month: 2027-01 has not begun (now 2026-12-07)"
        );
        assert_eq!(
            start_of(month("2026-12").next()).to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn the_heading_says_whether_the_month_can_still_change() {
        let t = |d: u32, h: u32, m: u32| Utc.with_ymd_and_hms(2026, 12, d, h, m, 0).unwrap();
        let zero = position(("opening", "0", "0"), 0, 0).unwrap();
        let report = |as_of, final_from: Option<DateTime<Utc>>| MonthReport {
            month: "2026-11".into(),
            from: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            until: t(1, 0, 0),
            as_of,
            final_from,
            is_final: final_from.is_some_and(|f| as_of >= f),
            movements: vec![],
            net: 0,
            opening: zero.clone(),
            closing: zero.clone(),
            active_accounts: 0,
        };
        let heading = |r: MonthReport| r.to_string().lines().next().unwrap_or_default().to_owned();
        let bound = Some(t(1, 0, 1));
        let late = heading(report(t(1, 0, 0), bound));
        assert!(
            late.contains("UTC, not final before 2026-12-01 00:01:00 UTC: rows dated"),
            "{late}"
        );
        assert!(
            heading(report(t(1, 0, 1), bound)).contains("UTC), read at 2026-12-01 00:01:00 UTC")
        );
        assert!(heading(report(t(7, 0, 0), None)).contains("UTC, final only once no batch"));
        let during = heading(report(
            Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap(),
            bound,
        ));
        assert!(during.contains("UTC, to date), read at"), "{during}");
    }

    #[test]
    fn sums_wider_than_a_balance_are_kept_whole() {
        let many = "92233720368547758070"; // ten balances of i64::MAX
        assert_eq!(parse_sum(many, "x").unwrap(), 10 * i128::from(i64::MAX));
        let p = position(("closing", many, "1"), 10, 1).unwrap();
        assert_eq!(p.net, 10 * i128::from(i64::MAX) - 1);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["held"], "92233720368547758070");
        assert_eq!(json["owed"], 1);
        let err = parse_sum("1e40", "the debt at the opening").unwrap_err();
        assert!(matches!(err, LedgerError::AmountOutOfRange(_)));
        assert_eq!(
            err.to_string(),
            "the debt at the opening is beyond the 128-bit integer range"
        );
    }

    #[test]
    fn types_are_listed_money_in_first() {
        let order: Vec<usize> = ["REFUND", "USAGE", "GRANT", "TOP_UP"]
            .map(type_order)
            .to_vec();
        assert_eq!(order, vec![3, 2, 1, 0]);
    }
}
