//! Protection against password guessing: failed `AUTH` attempts per client address.
//!
//! Each address has a bucket of `burst` attempts that refills at one per second. An
//! attempt takes one before the password is checked and a success gives it back, so only
//! failures count and concurrent attempts cannot overdraw it. An address whose bucket is
//! empty is told to retry later and its password is not checked at all, which bounds a
//! guesser to about one try per second per address however many connections it opens.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Attempts regained per second.
const REFILL_PER_SEC: f64 = 1.0;
/// Addresses tracked before full buckets are forgotten.
const PRUNE_AT: usize = 16 * 1024;

/// Failed `AUTH` attempts per client address.
pub struct AuthThrottle {
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    failures: AtomicU64,
    refused: AtomicU64,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, burst: f64, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * REFILL_PER_SEC;
        self.tokens = (self.tokens + gained).min(burst);
        self.at = now;
    }
}

impl AuthThrottle {
    /// `burst` failed attempts per address before throttling; 0 turns it off.
    pub fn new(burst: u32) -> AuthThrottle {
        AuthThrottle {
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes an attempt for `ip`; `Err` with the time until one is available when there is none.
    pub fn attempt(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.burst == 0.0 {
            return Ok(());
        }
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(());
        };
        if map.len() >= PRUNE_AT && !map.contains_key(&ip) {
            let burst = self.burst;
            map.retain(|_, b| {
                b.refill(burst, now);
                b.tokens < burst
            });
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.refill(self.burst, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(Duration::from_secs_f64((1.0 - b.tokens) / REFILL_PER_SEC))
        }
    }

    /// Reports how the attempt taken for `ip` went: a success gives it back.
    pub fn outcome(&self, ip: IpAddr, ok: bool) {
        if self.burst == 0.0 {
            return;
        }
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Ok(mut map) = self.buckets.lock() {
            if let Some(b) = map.get_mut(&ip) {
                b.tokens = (b.tokens + 1.0).min(self.burst);
            }
        }
    }

    /// Failed attempts, and attempts refused unchecked, since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.failures.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn failures_are_limited_per_address_and_refill() {
        let t = AuthThrottle::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let now = Instant::now();
        for _ in 0..3 {
            t.attempt(a, now).unwrap();
            t.outcome(a, false);
        }
        let wait = t.attempt(a, now).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another address is not affected.
        t.attempt(b, now).unwrap();
        // A second later one more attempt is allowed, not more.
        let later = now + Duration::from_millis(1001);
        t.attempt(a, later).unwrap();
        t.outcome(a, false);
        assert!(t.attempt(a, later).is_err());
        assert_eq!(t.totals(), (4, 2));
    }

    #[test]
    fn successes_do_not_count() {
        let t = AuthThrottle::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..100 {
            t.attempt(a, now).unwrap();
            t.outcome(a, true);
        }
        assert_eq!(t.totals(), (0, 0));
    }

    #[test]
    fn zero_turns_it_off() {
        let t = AuthThrottle::new(0);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..100 {
            t.attempt(a, Instant::now()).unwrap();
            t.outcome(a, false);
        }
    }
}
