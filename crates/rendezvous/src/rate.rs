//! Token buckets for per-user and per-requester rate limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A rate: `per_second` tokens refill each second, up to `burst` stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate.
    pub per_second: f64,
    /// Largest burst.
    pub burst: f64,
}

impl Rate {
    /// `count` per `period`, with a burst of `burst`.
    pub fn per(count: u32, period: Duration, burst: u32) -> Self {
        Self {
            per_second: f64::from(count) / period.as_secs_f64().max(1e-9),
            burst: f64::from(burst),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Buckets keyed by name; forgets idle full buckets so memory stays bounded
/// by the number of recently active keys (and of keys someone holds a
/// [`SharedBucket`] of).
#[derive(Debug)]
pub struct Buckets {
    rate: Rate,
    buckets: HashMap<String, Arc<Mutex<Bucket>>>,
    /// Above this many keys the next lookup prunes: [`MAX_TRACKED`], or
    /// twice what the last prune kept, so that buckets nobody may forget
    /// (held, or not yet full) do not make every lookup a scan.
    prune_above: usize,
}

/// One key's bucket, held outside its [`Buckets`] (by a logged-in
/// connection, so that each of its requests takes a token without a lookup
/// by name under the map's lock). Tokens taken through it and through the
/// map by the same key come out of the same bucket.
#[derive(Debug, Clone)]
pub struct SharedBucket {
    rate: Rate,
    bucket: Arc<Mutex<Bucket>>,
}

impl SharedBucket {
    /// Takes one token at time `now_ms`; false when none is left.
    pub fn take(&self, now_ms: u64) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        take_one(self.rate, &mut bucket, now_ms)
    }
}

/// Above this many tracked keys, full buckets are dropped on the next take.
const MAX_TRACKED: usize = 100_000;

impl Buckets {
    /// Empty buckets with this rate.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
            prune_above: MAX_TRACKED,
        }
    }

    /// Takes one token for `key` at time `now_ms`; false when none is left.
    pub fn take(&mut self, key: &str, now_ms: u64) -> bool {
        self.take_n(key, 1.0, now_ms)
    }

    /// Takes `cost` tokens for `key` at time `now_ms`; false, taking none,
    /// when fewer are left. A cost above the burst passes only from a full
    /// bucket and leaves it in debt, refilled at the rate like any other
    /// deficit: such requests pass, and the rate still bounds what they
    /// cost on average.
    pub fn take_n(&mut self, key: &str, cost: f64, now_ms: u64) -> bool {
        let rate = self.rate;
        let bucket = self.bucket(key, now_ms);
        let mut bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        take_cost(rate, &mut bucket, now_ms, cost)
    }

    /// `key`'s bucket, to take its tokens without this map
    /// ([`SharedBucket::take`]). It is not forgotten while held.
    pub fn shared(&mut self, key: &str, now_ms: u64) -> SharedBucket {
        SharedBucket {
            rate: self.rate,
            bucket: self.bucket(key, now_ms),
        }
    }

    fn bucket(&mut self, key: &str, now_ms: u64) -> Arc<Mutex<Bucket>> {
        if self.buckets.len() > self.prune_above {
            let rate = self.rate;
            self.buckets.retain(|_, b| {
                Arc::strong_count(b) > 1 || {
                    let b = *b.lock().unwrap_or_else(PoisonError::into_inner);
                    refill(rate, b, now_ms).tokens < rate.burst
                }
            });
            self.prune_above = MAX_TRACKED.max(2 * self.buckets.len());
        }
        // Looked up before inserting, so that the common case (a key already
        // tracked) does not allocate.
        if let Some(bucket) = self.buckets.get(key) {
            return Arc::clone(bucket);
        }
        let fresh = Arc::new(Mutex::new(Bucket {
            tokens: self.rate.burst,
            at_ms: now_ms,
        }));
        self.buckets.insert(key.to_owned(), Arc::clone(&fresh));
        fresh
    }
}

/// Refills `bucket` to `now_ms` and takes a token from it if it has one.
fn take_one(rate: Rate, bucket: &mut Bucket, now_ms: u64) -> bool {
    take_cost(rate, bucket, now_ms, 1.0)
}

/// Refills `bucket` to `now_ms` and takes `cost` tokens if it has them, or,
/// for a cost above the burst, if it is full (leaving it in debt).
fn take_cost(rate: Rate, bucket: &mut Bucket, now_ms: u64, cost: f64) -> bool {
    *bucket = refill(rate, *bucket, now_ms);
    if bucket.tokens >= cost.min(rate.burst) {
        bucket.tokens -= cost;
        true
    } else {
        false
    }
}

fn refill(rate: Rate, b: Bucket, now_ms: u64) -> Bucket {
    let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
    Bucket {
        tokens: (b.tokens + elapsed * rate.per_second).min(rate.burst),
        at_ms: now_ms.max(b.at_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut b = Buckets::new(Rate::per(10, Duration::from_secs(1), 5));
        let taken = (0..20).filter(|_| b.take("a", 0)).count();
        assert_eq!(taken, 5);
        // 10 per second: 100 ms gives one more token.
        assert!(b.take("a", 100));
        assert!(!b.take("a", 100));
        // Other keys are independent.
        assert!(b.take("b", 100));
        // Over 10 s at most burst + 10 * 10 are granted.
        let granted = (0..10_000u64).filter(|i| b.take("c", *i)).count();
        assert!(granted <= 5 + 100 + 1, "{granted}");
        assert!(granted >= 100);
    }

    #[test]
    fn a_cost_takes_that_many_tokens_and_at_most_the_burst() {
        let mut b = Buckets::new(Rate::per(1, Duration::from_secs(1), 10));
        assert!(b.take_n("a", 4.0, 0));
        assert!(b.take_n("a", 4.0, 0));
        // Two left: a cost of four is refused and takes nothing.
        assert!(!b.take_n("a", 4.0, 0));
        assert!(b.take_n("a", 2.0, 0));
        assert!(!b.take("a", 0));
        // A cost above the burst passes once the bucket is full again, and
        // leaves it in debt: 1,000 tokens at 1 a second.
        assert!(!b.take_n("a", 1_000.0, 5_000));
        assert!(b.take_n("a", 1_000.0, 10_000));
        assert!(!b.take("a", 10_000));
        assert!(!b.take("a", 10_000 + 989_000));
        assert!(b.take("a", 10_000 + 991_000));
    }

    /// Tracks `key` with a full bucket last touched at time 0, as one
    /// nobody has used for a while.
    fn insert_idle_full(b: &mut Buckets, key: &str) {
        let bucket = Bucket {
            tokens: b.rate.burst,
            at_ms: 0,
        };
        b.buckets
            .insert(key.to_owned(), Arc::new(Mutex::new(bucket)));
    }

    #[test]
    fn a_shared_bucket_is_the_keys_bucket_and_is_kept_while_held() {
        let rate = Rate::per(10, Duration::from_secs(1), 3);
        let mut b = Buckets::new(rate);
        let held = b.shared("a", 0);
        assert!(held.take(0));
        assert!(b.take("a", 0));
        assert!(held.take(0));
        // Three taken, by either way: the burst is spent for both.
        assert!(!b.take("a", 0));
        assert!(!held.take(0));
        // Past the tracking bound, idle full buckets are forgotten, but not
        // one that is held: "a" refills to full meanwhile, yet stays.
        for i in 0..=MAX_TRACKED {
            insert_idle_full(&mut b, &format!("k{i}"));
        }
        assert!(b.take("other", 10_000));
        assert!(b.buckets.contains_key("a"));
        assert!(!b.buckets.contains_key("k0"));
        drop(held);
        for i in 0..=MAX_TRACKED {
            insert_idle_full(&mut b, &format!("k{i}"));
        }
        assert!(b.take("other", 20_000));
        assert!(!b.buckets.contains_key("a"), "no longer held: forgotten");
    }

    #[test]
    fn held_buckets_past_the_bound_do_not_make_every_lookup_prune() {
        let rate = Rate::per(10, Duration::from_secs(1), 3);
        let mut b = Buckets::new(rate);
        let held: Vec<SharedBucket> = (0..=MAX_TRACKED)
            .map(|i| b.shared(&format!("k{i}"), 0))
            .collect();
        // One prune, which keeps every held bucket, then none until the map
        // has doubled: an idle full bucket added meanwhile is kept.
        assert!(b.take("first", 0));
        assert_eq!(b.prune_above, 2 * (MAX_TRACKED + 1));
        insert_idle_full(&mut b, "idle");
        assert!(b.take("second", 0));
        assert!(b.buckets.contains_key("idle"), "pruned again too soon");
        drop(held);
    }
}
