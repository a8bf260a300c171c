//! Failed-login throttling: exponential back-off per user name and per client address, and
//! a lockout of the user name that only a privacy officer lifts.
//!
//! - The first `free_failures` (3) failures in a row cost nothing; each one after that
//!   holds the next attempt back for 1 s, 2 s, 4 s, … up to `max_backoff_secs` (15 min),
//!   for the user name and for the client address separately (the longer applies).
//! - After `lockout_failures` (10) failures in a row, the user name is locked until an
//!   officer runs `fedq user unlock` (the right password does not open it).
//!
//! The numbers are `[login]` in `coordinator.toml` ([`LoginPolicy`]).
//! - A successful login clears the user's and the address's counts.
//! - A held-back attempt is refused before the password is checked, so guessing costs the
//!   attacker time and costs the coordinator nothing.
//!
//! Unknown user names are throttled exactly like real ones, so the throttle tells no one
//! which names exist. The state is in memory: a restart of the coordinator clears it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most; beyond it, expired ones are dropped first, then the oldest.
const MAX_ENTRIES: usize = 100_000;

/// `[login]` in `coordinator.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginPolicy {
    /// Failures in a row that cost nothing.
    pub free_failures: u32,
    /// Failures in a row that lock a user name until an officer unlocks it.
    pub lockout_failures: u32,
    /// The first back-off, in milliseconds; each later one doubles it.
    pub backoff_base_ms: u64,
    /// The longest back-off, in seconds.
    pub max_backoff_secs: u64,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            free_failures: 3,
            lockout_failures: 10,
            backoff_base_ms: 1000,
            max_backoff_secs: 15 * 60,
        }
    }
}

impl LoginPolicy {
    /// Check the numbers; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.lockout_failures <= self.free_failures || self.lockout_failures > 1000 {
            return Err(format!(
                "[login] lockout_failures = {} must be above free_failures = {} and at most 1000",
                self.lockout_failures, self.free_failures
            ));
        }
        if self.backoff_base_ms == 0 || self.max_backoff_secs == 0 || self.max_backoff_secs > 86_400
        {
            return Err("[login] backoff_base_ms must be at least 1 and max_backoff_secs between 1 and 86400 (a day)".into());
        }
        Ok(())
    }

    fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.max_backoff_secs)
    }

    fn backoff(&self, failures: u32) -> Option<Duration> {
        let over = failures.checked_sub(self.free_failures)?;
        if over == 0 {
            return None;
        }
        let d = Duration::from_millis(
            self.backoff_base_ms
                .saturating_mul(1u64 << (over - 1).min(30)),
        );
        Some(d.min(self.max_backoff()))
    }

    fn locked(&self, r: &Record) -> bool {
        r.failures >= self.lockout_failures && r.until.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
    until: Option<Instant>,
}

/// Why a login is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Retry after this long.
    BackOff(Duration),
    /// Locked until an officer unlocks the user.
    Locked,
}

impl Held {
    /// The researcher's message.
    pub fn message(&self, user: &str) -> String {
        match self {
            Held::BackOff(d) => format!(
                "too many failed logins for {user:?} or from this address; try again in {} s",
                d.as_secs().max(1)
            ),
            Held::Locked => format!(
                "{user:?} is locked after too many failed logins in a row; ask your privacy officer to run `fedq user unlock --name {user}`"
            ),
        }
    }
}

/// What a failure led to, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Failures in a row for the user name, this one included.
    pub failures: u32,
    /// How long the next attempt is held back (`None`: not held; `Some(MAX)` with `locked`).
    pub held_for: Option<Duration>,
    /// The user name is now locked.
    pub locked: bool,
}

/// The throttle: one per coordinator.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    policy: LoginPolicy,
    users: Mutex<HashMap<String, Record>>,
    clients: Mutex<HashMap<String, Record>>,
    /// Added to the clock: zero, except where a test lets time pass.
    skew: Mutex<Duration>,
}

impl LoginThrottle {
    /// A throttle with these numbers.
    pub fn new(policy: LoginPolicy) -> LoginThrottle {
        LoginThrottle {
            policy,
            ..LoginThrottle::default()
        }
    }

    fn held(&self, map: &Mutex<HashMap<String, Record>>, key: &str, now: Instant) -> Option<Held> {
        let m = map.lock().unwrap_or_else(|p| p.into_inner());
        let r = m.get(key)?;
        if self.policy.locked(r) {
            return Some(Held::Locked);
        }
        r.until.filter(|u| *u > now).map(|u| Held::BackOff(u - now))
    }

    fn fail(
        &self,
        map: &Mutex<HashMap<String, Record>>,
        key: &str,
        now: Instant,
        lockable: bool,
    ) -> Record {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ENTRIES && !m.contains_key(key) {
            self.prune(&mut m, now);
        }
        let r = m.entry(key.to_string()).or_insert(Record {
            failures: 0,
            last: now,
            until: None,
        });
        r.failures = r.failures.saturating_add(1);
        r.last = now;
        r.until = if lockable && r.failures >= self.policy.lockout_failures {
            None
        } else {
            self.policy.backoff(r.failures).map(|d| now + d)
        };
        *r
    }

    /// Drop records whose back-off ended over `max_backoff` ago (locks are kept), then, if
    /// still full, the oldest unlocked half.
    fn prune(&self, m: &mut HashMap<String, Record>, now: Instant) {
        let max = self.policy.max_backoff();
        m.retain(|_, r| self.policy.locked(r) || now.duration_since(r.last) < max);
        if m.len() >= MAX_ENTRIES {
            let mut ages: Vec<(Instant, String)> = m
                .iter()
                .filter(|(_, r)| !self.policy.locked(r))
                .map(|(k, r)| (r.last, k.clone()))
                .collect();
            ages.sort();
            for (_, k) in ages.into_iter().take(MAX_ENTRIES / 2) {
                m.remove(&k);
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::now() + *self.skew.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a login for `user` from `client` is held back now.
    pub fn check(&self, user: &str, client: &str) -> Option<Held> {
        let now = self.now();
        let u = self.held(&self.users, user, now);
        if u == Some(Held::Locked) {
            return u;
        }
        let c = self.held(&self.clients, client, now);
        match (u, c) {
            (Some(Held::BackOff(a)), Some(Held::BackOff(b))) => Some(Held::BackOff(a.max(b))),
            (a, b) => a.or(b),
        }
    }

    /// Record a failed login.
    pub fn failed(&self, user: &str, client: &str) -> Failure {
        let now = self.now();
        let u = self.fail(&self.users, user, now, true);
        let c = self.fail(&self.clients, client, now, false);
        let locked = u.failures >= self.policy.lockout_failures;
        let held_for = [u.until, c.until]
            .into_iter()
            .flatten()
            .max()
            .map(|t| t - now);
        Failure {
            failures: u.failures,
            held_for,
            locked,
        }
    }

    /// Record a successful login: the user's and the address's counts start again.
    pub fn succeeded(&self, user: &str, client: &str) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client);
    }

    /// Lift a user's lockout and back-off (an officer's `fedq user unlock`). Returns whether
    /// there was anything to lift.
    pub fn unlock(&self, user: &str) -> bool {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user)
            .is_some()
    }

    /// Let time pass (tests).
    #[cfg(test)]
    fn age(&self, by: Duration) {
        *self.skew.lock().unwrap() += by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE_FAILURES: u32 = 3;
    const LOCKOUT_FAILURES: u32 = 10;
    const MAX_BACKOFF: Duration = Duration::from_secs(900);

    #[test]
    fn three_failures_are_free_then_the_back_off_doubles_up_to_its_cap() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.check("alice", "10.0.0.1"), None);
            assert_eq!(t.failed("alice", "10.0.0.1").held_for, None);
        }
        let mut waits = Vec::new();
        for _ in 0..3 {
            let f = t.failed("alice", "10.0.0.1");
            waits.push(f.held_for.unwrap().as_secs_f64().round() as u64);
            assert!(matches!(
                t.check("alice", "10.0.0.1"),
                Some(Held::BackOff(_))
            ));
            t.age(MAX_BACKOFF);
            assert_eq!(t.check("alice", "10.0.0.1"), None);
        }
        assert_eq!(waits, vec![1, 2, 4]);
        assert_eq!(t.policy.backoff(40), Some(MAX_BACKOFF));
        assert!(LoginPolicy::default().validate().is_ok());
        let bad = LoginPolicy {
            lockout_failures: 2,
            ..LoginPolicy::default()
        };
        assert!(bad.validate().unwrap_err().contains("lockout_failures"));
    }

    #[test]
    fn a_guesser_is_held_back_by_address_whatever_names_it_tries() {
        let t = LoginThrottle::default();
        for i in 0..=FREE_FAILURES {
            t.failed(&format!("user{i}"), "10.0.0.9");
        }
        assert!(matches!(
            t.check("someone-new", "10.0.0.9"),
            Some(Held::BackOff(_))
        ));
        assert_eq!(t.check("someone-new", "10.0.0.10"), None);
    }

    #[test]
    fn ten_failures_lock_the_name_until_an_officer_unlocks_it() {
        let t = LoginThrottle::default();
        for i in 0..LOCKOUT_FAILURES {
            let f = t.failed("bob", &format!("10.0.1.{i}"));
            assert_eq!(f.locked, i + 1 >= LOCKOUT_FAILURES);
        }
        t.age(Duration::from_secs(30 * 24 * 3600));
        assert_eq!(t.check("bob", "10.0.2.1"), Some(Held::Locked));
        assert!(t
            .check("bob", "10.0.2.1")
            .unwrap()
            .message("bob")
            .contains("fedq user unlock"));
        assert!(t.unlock("bob"));
        assert_eq!(t.check("bob", "10.0.2.1"), None);
        assert!(!t.unlock("bob"));
    }

    #[test]
    fn a_success_clears_the_counts_and_unknown_names_are_throttled_alike() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            t.failed("alice", "10.0.0.1");
        }
        t.succeeded("alice", "10.0.0.1");
        assert_eq!(t.failed("alice", "10.0.0.1").failures, 1);
        // A name that does not exist gets the same counts and messages.
        for _ in 0..=FREE_FAILURES {
            t.failed("no-such-user", "10.0.0.2");
        }
        assert!(matches!(
            t.check("no-such-user", "10.0.0.3"),
            Some(Held::BackOff(_))
        ));
    }

    #[test]
    fn the_table_of_records_stays_bounded() {
        let t = LoginThrottle::default();
        for i in 0..(MAX_ENTRIES + 10) {
            t.failed(&format!("u{i}"), "10.0.0.1");
        }
        assert!(t.users.lock().unwrap().len() <= MAX_ENTRIES);
        assert_eq!(t.users.lock().unwrap().len(), MAX_ENTRIES / 2 + 10);
    }
}
