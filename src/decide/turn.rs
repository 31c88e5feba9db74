//! The order of decision transactions in flight at once (`pipeline.in_flight`).
//!
//! Batches arrive in delivery order, and a user's messages must be applied in that order.
//! So a batch's transaction locks its accounts only once the batch before it holds all of its
//! own: row locks then queue the later batch behind the earlier one on every user they share.
//! A batch that failed releases its locks without having applied its messages, and a later
//! batch may take them; so a batch commits only when every earlier batch in flight that
//! shares a user with it has committed. When one of those failed instead, the later batch
//! rolls back ([`super::DecideError::Reordered`]) and is decided again after it. Batches
//! that share no user commit in whatever order they finish; the consumer acks in delivery
//! order whatever the commit order.
//!
//! A batch never waits for a later one, and waits for an earlier one only where that one
//! holds or held locks it needs, so the waits cannot form a cycle.
//!
//! Two batches may also name the same node execution for different users (a producer's
//! conflicting duplicate): the decision's key orders them, not a row lock. A later batch
//! that names one an earlier batch has not committed rolls back before writing, and is
//! decided again after it, so the earlier message's decision stands.

use std::sync::Arc;

use tokio::sync::watch;

/// What the batches after one see of it.
#[derive(Debug, Clone, Default)]
struct Stage {
    /// The users whose accounts it holds (sorted), once it holds them all.
    users: Option<Arc<[String]>>,
    /// The node executions it decides or settles (sorted), from then on.
    ids: Option<Arc<[String]>>,
    /// How it ended: true committed, false failed (nothing it wrote stays).
    end: Option<bool>,
}

/// A batch's place among the batches in flight: whom it waits for, and what it tells the
/// batches after it. Dropped without `committed`, it tells them it failed.
#[derive(Debug)]
pub struct Turn {
    /// The batches still in flight before this one, oldest first.
    earlier: Vec<watch::Receiver<Stage>>,
    me: watch::Sender<Stage>,
    /// Made by [`Turn::after`]: later batches may follow it.
    pipelined: bool,
}

/// How the batches after one follow it (see [`Turn::after`]).
#[derive(Debug, Clone)]
pub struct Follow(watch::Receiver<Stage>);

impl Turn {
    /// A batch with nothing in flight before it.
    pub fn alone() -> Turn {
        let (me, _) = watch::channel(Stage::default());
        Turn {
            earlier: Vec::new(),
            me,
            pipelined: false,
        }
    }

    /// A batch decided after `earlier` (every batch still in flight before it, oldest first),
    /// and how the batches after it follow it.
    pub fn after<'a>(earlier: impl IntoIterator<Item = &'a Follow>) -> (Turn, Follow) {
        let (me, rx) = watch::channel(Stage::default());
        let earlier = earlier.into_iter().map(|f| f.0.clone()).collect();
        let turn = Turn {
            earlier,
            me,
            pipelined: true,
        };
        (turn, Follow(rx))
    }

    /// Whether other batches may be in flight before or after this one: then a failed
    /// attempt must end the turn (releasing its locks) rather than be retried within it,
    /// since a later batch may be waiting for its end.
    pub(crate) fn pipelined(&self) -> bool {
        self.pipelined
    }

    /// Resolves once the batch before this one holds its locks or has ended; by then every
    /// earlier one has too.
    pub(crate) async fn wait_to_lock(&self) {
        if let Some(last) = self.earlier.last() {
            let mut rx = last.clone();
            // A closed channel: its turn was dropped, which ends it.
            let _ = rx.wait_for(|s| s.users.is_some() || s.end.is_some()).await;
        }
    }

    /// This batch now holds the accounts of `users` (sorted) and decides `ids` (sorted).
    pub(crate) fn locked(&self, users: &[String], ids: &[&str]) {
        // Only batches after it read its ids.
        let ids = self
            .pipelined
            .then(|| ids.iter().map(|&id| id.to_owned()).collect());
        self.me.send_modify(|s| {
            s.users = Some(users.into());
            s.ids = ids;
        });
    }

    /// Whether this batch, holding the accounts of `users` (sorted), may write decisions of
    /// `ids` (sorted): no earlier batch that has not committed names one of them (one that
    /// ended before saying which counts as naming them). An earlier batch sharing a user has
    /// ended its transaction already (this one holds the shared row): its decisions are
    /// seen, or it failed and [`Turn::may_commit`] says so. Called once this batch holds its
    /// locks, when every earlier batch has said or ended.
    pub(crate) fn may_write(&self, users: &[String], ids: &[&str]) -> bool {
        self.earlier.iter().all(|rx| {
            let s = rx.borrow();
            s.end == Some(true)
                || s.users.as_deref().is_some_and(|u| !disjoint(u, users))
                || s.ids.as_deref().is_some_and(|e| disjoint(e, ids))
        })
    }

    /// Whether this batch, holding the accounts of `users` (sorted), may commit: every
    /// earlier batch sharing one of them has committed. Waits for those still deciding.
    pub(crate) async fn may_commit(&self, users: &[String]) -> bool {
        for earlier in &self.earlier {
            let mut rx = earlier.clone();
            let known = rx
                .wait_for(|s| s.users.is_some() || s.end.is_some())
                .await
                .map(|s| s.clone());
            let Ok(stage) = known else { return false };
            // One that holds only other users' accounts cannot matter. One that failed
            // before it said which it held may have held some of these for a while.
            if stage.users.as_deref().is_some_and(|u| disjoint(u, users)) {
                continue;
            }
            match rx.wait_for(|s| s.end.is_some()).await.map(|s| s.end) {
                Ok(Some(true)) => {}
                _ => return false,
            }
        }
        true
    }

    /// This batch committed.
    pub(crate) fn committed(self) {
        self.me.send_modify(|s| s.end = Some(true));
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.me.send_if_modified(|s| {
            let open = s.end.is_none();
            if open {
                s.end = Some(false);
            }
            open
        });
    }
}

/// Whether two sorted lists have no element in common.
fn disjoint<A: AsRef<str>, B: AsRef<str>>(a: &[A], b: &[B]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].as_ref().cmp(b[j].as_ref()) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn users(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    /// Whether `f` is still pending after the other tasks had a chance to run.
    async fn pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .is_err()
    }

    #[test]
    fn disjoint_compares_sorted_lists() {
        assert!(disjoint(&users(&["a", "c"]), &users(&["b", "d"])));
        assert!(!disjoint(&users(&["a", "c"]), &users(&["b", "c"])));
        assert!(disjoint::<String, _>(&[], &users(&["a"])));
    }

    #[tokio::test]
    async fn a_batch_alone_locks_and_commits_at_once() {
        let t = Turn::alone();
        assert!(!t.pipelined());
        t.wait_to_lock().await;
        assert!(t.may_commit(&users(&["a"])).await);
    }

    #[tokio::test]
    async fn the_next_batch_locks_after_the_first_holds_its_locks() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        assert!(second.pipelined());
        assert!(pending(second.wait_to_lock()).await);
        first.locked(&users(&["a"]), &[]);
        second.wait_to_lock().await;
    }

    #[tokio::test]
    async fn a_batch_sharing_no_user_commits_before_the_first() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        first.locked(&users(&["a", "c"]), &[]);
        assert!(second.may_commit(&users(&["b"])).await);
        drop(first);
    }

    #[tokio::test]
    async fn a_batch_sharing_a_user_commits_only_after_the_first_committed() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        first.locked(&users(&["a", "b"]), &[]);
        let mine = users(&["b"]);
        let gate = second.may_commit(&mine);
        tokio::pin!(gate);
        assert!(pending(&mut gate).await);
        first.committed();
        assert!(gate.await);
    }

    #[tokio::test]
    async fn a_batch_sharing_a_user_with_a_failed_one_may_not_commit() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        first.locked(&users(&["a", "b"]), &[]);
        drop(first);
        second.wait_to_lock().await;
        assert!(!second.may_commit(&users(&["b"])).await);
        // Sharing none, it may.
        assert!(second.may_commit(&users(&["c"])).await);
    }

    #[tokio::test]
    async fn a_batch_that_failed_before_saying_what_it_held_counts_as_sharing() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        drop(first);
        second.wait_to_lock().await;
        assert!(!second.may_commit(&users(&["a"])).await);
    }

    #[tokio::test]
    async fn a_node_execution_an_earlier_batch_has_not_committed_is_not_written() {
        let (first, f1) = Turn::after([]);
        let (second, _) = Turn::after([&f1]);
        first.locked(&users(&["u"]), &["x", "y"]);
        second.wait_to_lock().await;
        let (v, x) = (users(&["v"]), ["x"]);
        // Another user's batch naming "x": not before the first commits.
        assert!(!second.may_write(&v, &x));
        assert!(second.may_write(&v, &["z"]));
        // Holding "u", the second holds a row the first's ended transaction let go: its
        // decision of "x" is seen (a completion after its start, a redelivery).
        assert!(second.may_write(&users(&["u"]), &x));
        first.committed();
        assert!(second.may_write(&v, &x));
        // A failed earlier batch will be decided again after this one: it goes first.
        let (third, f3) = Turn::after([]);
        let (fourth, _) = Turn::after([&f3]);
        third.locked(&users(&["u"]), &x);
        drop(third);
        assert!(!fourth.may_write(&v, &x));
        assert!(Turn::alone().may_write(&v, &x));
    }

    #[tokio::test]
    async fn every_earlier_batch_in_flight_counts() {
        let (first, f1) = Turn::after([]);
        let (second, f2) = Turn::after([&f1]);
        let (third, _) = Turn::after([&f1, &f2]);
        first.locked(&users(&["a"]), &[]);
        second.locked(&users(&["b"]), &[]);
        third.wait_to_lock().await;
        // Shares "a" with the first, which fails: the third must not commit.
        drop(first);
        assert!(!third.may_commit(&users(&["a", "c"])).await);
        second.committed();
        assert!(third.may_commit(&users(&["b", "c"])).await);
    }
}
