//! State that plugins keep in respire rather than in their instances: token buckets and
//! counters with a time to live. Shared by every worker (a plugin has one instance per
//! worker) and kept across plugin reloads; namespaced by plugin name.
//!
//! The maps are split into shards, each behind its own mutex, so that workers rarely meet
//! on a lock; entries that no longer matter (a bucket that has refilled, a counter past its
//! time to live) are swept out as a shard is used.

use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

const SHARDS: usize = 16;
/// A shard is swept once per this many operations on it.
const SWEEP_EVERY: u32 = 1024;

struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }
}

struct Counter {
    value: i64,
    expires: Option<Instant>,
}

/// A plugin's entry, by its parts: the plugin, the limiter's name ("" for counters), the key.
#[derive(Clone, Copy)]
struct Key<'a> {
    plugin: &'a str,
    name: &'a str,
    key: &'a str,
}

impl Key<'_> {
    /// Whether `stored` (as [`Key::joined`] makes it) is this key.
    fn matches(&self, stored: &str) -> bool {
        let (p, n, k) = (self.plugin, self.name, self.key);
        stored.len() == p.len() + n.len() + k.len() + 2
            && stored.starts_with(p)
            && stored.as_bytes()[p.len()] == 0
            && stored[p.len() + 1..].starts_with(n)
            && stored.as_bytes()[p.len() + 1 + n.len()] == 0
            && stored.ends_with(k)
    }

    /// `plugin \0 name \0 key`, as kept in the map.
    fn joined(&self) -> Box<str> {
        let mut s = String::with_capacity(self.plugin.len() + self.name.len() + self.key.len() + 2);
        s.push_str(self.plugin);
        s.push('\0');
        s.push_str(self.name);
        s.push('\0');
        s.push_str(self.key);
        s.into_boxed_str()
    }
}

/// An entry of a shard: the joined key with its hash, so that a lookup hashes the parts once
/// (for the shard and the table alike) and allocates nothing unless the entry is new.
struct Entry<V> {
    hash: u64,
    key: Box<str>,
    value: V,
}

/// A shard's map of one kind of entry.
struct Map<V>(HashTable<Entry<V>>);

impl<V> Default for Map<V> {
    fn default() -> Self {
        Map(HashTable::new())
    }
}

impl<V> Map<V> {
    fn get(&self, hash: u64, k: Key<'_>) -> Option<&V> {
        self.0.find(hash, |e| k.matches(&e.key)).map(|e| &e.value)
    }

    fn get_mut(&mut self, hash: u64, k: Key<'_>) -> Option<&mut V> {
        self.0
            .find_mut(hash, |e| k.matches(&e.key))
            .map(|e| &mut e.value)
    }

    fn get_or_insert(&mut self, hash: u64, k: Key<'_>, new: impl FnOnce() -> V) -> &mut V {
        let entry = self
            .0
            .entry(hash, |e| k.matches(&e.key), |e| e.hash)
            .or_insert_with(|| Entry {
                hash,
                key: k.joined(),
                value: new(),
            });
        &mut entry.into_mut().value
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Default)]
struct Shard {
    buckets: Map<Bucket>,
    counters: Map<Counter>,
    ops: u32,
}

impl Shard {
    fn tick(&mut self, now: Instant) {
        self.ops += 1;
        if self.ops < SWEEP_EVERY {
            return;
        }
        self.ops = 0;
        // A full bucket behaves exactly like a missing one.
        self.buckets.0.retain(|e| {
            e.value.refill(now);
            e.value.tokens < e.value.burst
        });
        self.counters
            .0
            .retain(|e| e.value.expires.is_none_or(|x| x > now));
    }
}

/// A token bucket's rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Tokens added per second.
    pub rate: f64,
    /// Most tokens held.
    pub burst: u32,
}

/// Buckets and counters of every plugin.
pub struct SharedState {
    shards: Box<[Mutex<Shard>]>,
    /// Seeded at random: keys may come from clients (a key prefix, an address).
    hasher: foldhash::fast::RandomState,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl SharedState {
    fn hash(&self, k: Key<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(k.plugin.as_bytes());
        h.write_u8(0);
        h.write(k.name.as_bytes());
        h.write_u8(0);
        h.write(k.key.as_bytes());
        h.finish()
    }

    /// An entry's key, its hash, and its shard, locked.
    fn locate<'k>(
        &self,
        plugin: &'k str,
        name: &'k str,
        key: &'k str,
    ) -> (Key<'k>, u64, std::sync::MutexGuard<'_, Shard>) {
        let k = Key { plugin, name, key };
        let hash = self.hash(k);
        // The shard from bits the table does not use for its slots and tags.
        let i = ((hash >> 32) as usize) % self.shards.len();
        // A poisoned lock only means another thread panicked mid-update of plain numbers.
        let shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        (k, hash, shard)
    }

    /// Takes `cost` tokens from bucket `key` of `limiter`: the tokens left, or the
    /// milliseconds until `cost` tokens are there (nothing is taken then).
    pub fn take(
        &self,
        plugin: &str,
        limiter: &str,
        rule: Rule,
        key: &str,
        cost: u32,
    ) -> Result<u32, u64> {
        self.take_at(plugin, limiter, rule, key, cost, Instant::now())
    }

    fn take_at(
        &self,
        plugin: &str,
        limiter: &str,
        rule: Rule,
        key: &str,
        cost: u32,
        now: Instant,
    ) -> Result<u32, u64> {
        let (k, hash, mut shard) = self.locate(plugin, limiter, key);
        shard.tick(now);
        let burst = f64::from(rule.burst);
        let rate = if rule.rate.is_finite() {
            rule.rate.max(0.0)
        } else {
            0.0
        };
        let b = shard.buckets.get_or_insert(hash, k, || Bucket {
            tokens: burst,
            at: now,
            rate,
            burst,
        });
        // A changed rule (the plugin was reloaded) applies from now on.
        b.rate = rate;
        b.burst = burst;
        b.refill(now);
        let cost = f64::from(cost);
        if b.tokens >= cost {
            b.tokens -= cost;
            return Ok(b.tokens.floor() as u32);
        }
        if rate <= 0.0 || cost > burst {
            return Err(u64::MAX);
        }
        Err((((cost - b.tokens) / rate) * 1000.0).ceil().max(1.0) as u64)
    }

    /// Gives back tokens taken by [`SharedState::take`] (when a later take of the same
    /// command failed).
    pub fn refund(&self, plugin: &str, limiter: &str, key: &str, cost: u32) {
        let (k, hash, mut shard) = self.locate(plugin, limiter, key);
        if let Some(b) = shard.buckets.get_mut(hash, k) {
            b.tokens = (b.tokens + f64::from(cost)).min(b.burst);
        }
    }

    /// Adds `delta` to a counter and returns the new value; the counter is forgotten `ttl`
    /// after this change (zero: never).
    pub fn counter_add(&self, plugin: &str, key: &str, delta: i64, ttl: Duration) -> i64 {
        self.counter_add_at(plugin, key, delta, ttl, Instant::now())
    }

    /// [`SharedState::counter_add`] at a time the caller read (one clock read for many).
    pub fn counter_add_at(
        &self,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl: Duration,
        now: Instant,
    ) -> i64 {
        let (k, hash, mut shard) = self.locate(plugin, "", key);
        shard.tick(now);
        let c = shard.counters.get_or_insert(hash, k, || Counter {
            value: 0,
            expires: None,
        });
        if c.expires.is_some_and(|e| e <= now) {
            c.value = 0;
        }
        c.value = c.value.saturating_add(delta);
        c.expires = if ttl.is_zero() {
            None
        } else {
            now.checked_add(ttl)
        };
        c.value
    }

    /// A counter's value (0 when unknown or expired).
    pub fn counter_get(&self, plugin: &str, key: &str) -> i64 {
        self.counter_get_at(plugin, key, Instant::now())
    }

    fn counter_get_at(&self, plugin: &str, key: &str, now: Instant) -> i64 {
        let (k, hash, shard) = self.locate(plugin, "", key);
        match shard.counters.get(hash, k) {
            Some(c) if c.expires.is_none_or(|e| e > now) => c.value,
            _ => 0,
        }
    }

    /// The `count` live counters of `plugin` whose keys start with `prefix` that have the
    /// largest values, largest first (ties by key). Walks every shard.
    pub fn counter_top(&self, plugin: &str, prefix: &str, count: usize) -> Vec<(String, i64)> {
        let now = Instant::now();
        let full = Key {
            plugin,
            name: "",
            key: prefix,
        }
        .joined();
        let head = full.len() - prefix.len();
        let mut found: Vec<(String, i64)> = Vec::new();
        for shard in self.shards.iter() {
            let s = shard.lock().unwrap_or_else(|p| p.into_inner());
            for e in s.counters.0.iter() {
                if e.key.starts_with(&*full) && e.value.expires.is_none_or(|x| x > now) {
                    found.push((e.key[head..].to_string(), e.value.value));
                }
            }
        }
        let order =
            |a: &(String, i64), b: &(String, i64)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        if found.len() > count && count > 0 {
            found.select_nth_unstable_by(count - 1, order);
        }
        found.truncate(count);
        found.sort_by(order);
        found
    }

    /// Number of live buckets and counters (for tests and `INFO`).
    pub fn len(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(b, c), s| {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            (b + s.buckets.len(), c + s.counters.len())
        })
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let s = SharedState::default();
        let rule = Rule {
            rate: 10.0,
            burst: 3,
        };
        let t0 = Instant::now();
        assert_eq!(s.take_at("p", "l", rule, "k", 1, t0), Ok(2));
        assert_eq!(s.take_at("p", "l", rule, "k", 1, t0), Ok(1));
        assert_eq!(s.take_at("p", "l", rule, "k", 1, t0), Ok(0));
        // One token comes back every 100 ms.
        assert_eq!(s.take_at("p", "l", rule, "k", 1, t0), Err(100));
        assert_eq!(
            s.take_at("p", "l", rule, "k", 1, t0 + Duration::from_millis(60)),
            Err(40)
        );
        assert_eq!(
            s.take_at("p", "l", rule, "k", 1, t0 + Duration::from_millis(100)),
            Ok(0)
        );
        // Other keys, limiters and plugins have buckets of their own.
        assert_eq!(s.take_at("p", "l", rule, "other", 1, t0), Ok(2));
        assert_eq!(s.take_at("p", "m", rule, "k", 1, t0), Ok(2));
        assert_eq!(s.take_at("q", "l", rule, "k", 1, t0), Ok(2));
        // Never more than the burst, however long it waits.
        assert_eq!(
            s.take_at("p", "l", rule, "k", 1, t0 + Duration::from_secs(60)),
            Ok(2)
        );
        // A cost above the burst can never be paid.
        assert_eq!(
            s.take_at("p", "l", rule, "k", 4, t0 + Duration::from_secs(60)),
            Err(u64::MAX)
        );
    }

    #[test]
    fn refunds_give_tokens_back_up_to_the_burst() {
        let s = SharedState::default();
        let rule = Rule {
            rate: 0.001,
            burst: 2,
        };
        let t0 = Instant::now();
        assert_eq!(s.take_at("p", "l", rule, "k", 2, t0), Ok(0));
        s.refund("p", "l", "k", 1);
        assert_eq!(s.take_at("p", "l", rule, "k", 1, t0), Ok(0));
        s.refund("p", "l", "k", 5);
        assert_eq!(s.take_at("p", "l", rule, "k", 2, t0), Ok(0));
    }

    #[test]
    fn counters_expire_after_their_last_change() {
        let s = SharedState::default();
        let t0 = Instant::now();
        let ttl = Duration::from_millis(100);
        assert_eq!(s.counter_add_at("p", "c", 5, ttl, t0), 5);
        assert_eq!(
            s.counter_add_at("p", "c", -2, ttl, t0 + Duration::from_millis(50)),
            3
        );
        assert_eq!(
            s.counter_get_at("p", "c", t0 + Duration::from_millis(149)),
            3
        );
        assert_eq!(
            s.counter_get_at("p", "c", t0 + Duration::from_millis(150)),
            0
        );
        assert_eq!(
            s.counter_add_at("p", "c", 1, ttl, t0 + Duration::from_millis(200)),
            1
        );
        assert_eq!(
            s.counter_get_at("q", "c", t0),
            0,
            "plugins do not see each other's counters"
        );
        assert_eq!(
            s.counter_add_at("p", "forever", i64::MAX, Duration::ZERO, t0),
            i64::MAX
        );
        assert_eq!(
            s.counter_add_at(
                "p",
                "forever",
                1,
                Duration::ZERO,
                t0 + Duration::from_secs(3600)
            ),
            i64::MAX
        );
    }

    #[test]
    fn counter_top_gives_the_largest_counters_under_a_prefix() {
        let s = SharedState::default();
        for (k, v) in [
            ("hot:a", 5),
            ("hot:b", 9),
            ("hot:c", 1),
            ("hot:d", 9),
            ("cold:x", 100),
        ] {
            s.counter_add("p", k, v, Duration::ZERO);
        }
        s.counter_add("q", "hot:z", 50, Duration::ZERO);
        s.counter_add("p", "hot:gone", 70, Duration::from_nanos(1));
        std::thread::sleep(Duration::from_millis(2));
        let top = s.counter_top("p", "hot:", 3);
        assert_eq!(
            top,
            vec![
                ("hot:b".to_string(), 9),
                ("hot:d".to_string(), 9),
                ("hot:a".to_string(), 5)
            ]
        );
        assert_eq!(s.counter_top("p", "hot:", 10).len(), 4);
        assert!(s.counter_top("p", "none:", 10).is_empty());
        assert!(s.counter_top("p", "hot:", 0).is_empty());
    }

    #[test]
    fn sweeping_drops_full_buckets_and_expired_counters() {
        let s = SharedState::default();
        let t0 = Instant::now();
        let rule = Rule {
            rate: 1000.0,
            burst: 1,
        };
        for i in 0..200 {
            s.take_at("p", "l", rule, &format!("k{i}"), 1, t0).unwrap();
            s.counter_add_at("p", &format!("c{i}"), 1, Duration::from_millis(1), t0);
        }
        assert_eq!(s.len(), (200, 200));
        let later = t0 + Duration::from_secs(1);
        // Enough operations on enough keys to reach every shard's sweep.
        for i in 0..(SWEEP_EVERY as usize * SHARDS * 2) {
            s.counter_add_at("p", &format!("n{}", i % 512), 0, Duration::ZERO, later);
        }
        assert_eq!(s.len(), (0, 512));
    }
}
