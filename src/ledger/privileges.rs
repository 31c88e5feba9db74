//! What `run` needs of the ledger's tables, checked at start: a role without a grant it needs
//! (a table added by an upgrade and not yet granted, a grant script that left one out) is
//! refused before it consumes anything, with every missing grant named at once, rather than
//! fail each batch on the first one it meets.

use sqlx::PgPool;

/// Each object `run` reads or writes, with the privileges its statements need: no more, so a
/// role granted exactly what it uses is not refused. `SELECT … FOR UPDATE` needs `UPDATE`,
/// the outbox's `DELETE` is the relay's pruning (not needed where `outbox.retention_s` is 0),
/// and the sequence's `UPDATE` covers both `nextval` and the `setval` that moves it past the
/// ids in use.
const NEEDED: &[(&str, Kind, &[&str])] = &[
    (
        "credit.balances",
        Kind::Table,
        &["SELECT", "INSERT", "UPDATE"],
    ),
    ("credit.transactions", Kind::Table, &["SELECT", "INSERT"]),
    ("credit.decisions", Kind::Table, &["SELECT", "INSERT"]),
    ("credit.settlements", Kind::Table, &["SELECT", "INSERT"]),
    (
        "credit.outbox",
        Kind::Table,
        &["SELECT", "INSERT", "DELETE"],
    ),
    ("credit.outbox_relay", Kind::Table, &["SELECT", "UPDATE"]),
    ("credit.ledger_identity", Kind::Table, &["SELECT", "UPDATE"]),
    (
        "credit.outbox_id_seq",
        Kind::Sequence,
        &["SELECT", "UPDATE"],
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Table,
    Sequence,
}

/// The checks [`refusal`] asks the database, one per object and privilege, in the order of
/// [`NEEDED`]: (object, is a sequence, privilege).
fn checks(prunes: bool) -> (Vec<&'static str>, Vec<bool>, Vec<&'static str>) {
    let pairs = NEEDED.iter().flat_map(|(object, kind, privileges)| {
        privileges
            .iter()
            .filter(move |p| prunes || (*object, **p) != PRUNING)
            .map(move |p| (*object, *kind == Kind::Sequence, *p))
    });
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for (object, sequence, privilege) in pairs {
        columns.0.push(object);
        columns.1.push(sequence);
        columns.2.push(privilege);
    }
    columns
}

/// The grant only the outbox's pruning uses.
const PRUNING: (&str, &str) = ("credit.outbox", "DELETE");

const MISSING: &str = "\
SELECT c.privilege || ' on ' || c.object
  FROM unnest($1::text[], $2::bool[], $3::text[]) WITH ORDINALITY AS c(object, sequence, privilege, n)
 WHERE NOT CASE WHEN c.sequence THEN has_sequence_privilege(c.object, c.privilege)
                ELSE has_table_privilege(c.object, c.privilege) END
 ORDER BY c.n";

/// The start's refusal of the session's role, naming each privilege of [`NEEDED`] it lacks
/// (`"INSERT on credit.outbox"`); None when it has them all.
pub(crate) async fn refusal(pool: &PgPool, prunes: bool) -> Result<Option<String>, sqlx::Error> {
    let (objects, sequences, privileges) = checks(prunes);
    let missing: Vec<String> = sqlx::query_scalar(MISSING)
        .bind(objects)
        .bind(sequences)
        .bind(privileges)
        .fetch_all(pool)
        .await?;
    if missing.is_empty() {
        return Ok(None);
    }
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await?;
    Ok(Some(refusing(&role, &missing)))
}

fn refusing(role: &str, missing: &[String]) -> String {
    format!(
        "database: the role {role:?} lacks {}: grant what the README's \"PostgreSQL roles\" \
         gives (after each upgrade's migrate too) and start again; nothing was consumed",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_needed_privilege_is_checked_once_in_order() {
        let (objects, sequences, privileges) = checks(true);
        assert_eq!(objects.len(), 18);
        assert_eq!(
            (objects[0], sequences[0], privileges[0]),
            ("credit.balances", false, "SELECT")
        );
        assert_eq!(
            (objects[17], sequences[17], privileges[17]),
            ("credit.outbox_id_seq", true, "UPDATE")
        );
        assert_eq!(sequences.iter().filter(|s| **s).count(), 2);
    }

    #[test]
    fn a_worker_that_keeps_every_event_needs_no_delete() {
        let (objects, _, privileges) = checks(false);
        assert_eq!(objects.len(), 17);
        assert!(!privileges.contains(&"DELETE"));
        assert!(objects
            .iter()
            .zip(&privileges)
            .any(|p| p == (&"credit.outbox", &"INSERT")));
    }

    #[test]
    fn a_refusal_names_the_role_and_every_missing_grant() {
        let missing = [
            "DELETE on credit.outbox".to_owned(),
            "INSERT on credit.settlements".to_owned(),
        ];
        assert_eq!(
            refusing("worker", &missing),
            "database: the role \"worker\" lacks DELETE on credit.outbox, INSERT on \
             credit.settlements: grant what the README's \"PostgreSQL roles\" gives (after each \
             upgrade's migrate too) and start again; nothing was consumed"
        );
    }
}
