//! Token buckets for per-user and per-requester rate limits.

use std::collections::HashMap;
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
/// by the number of recently active keys.
#[derive(Debug)]
pub struct Buckets {
    rate: Rate,
    buckets: HashMap<String, Bucket>,
}

/// Above this many tracked keys, full buckets are dropped on the next take.
const MAX_TRACKED: usize = 100_000;

impl Buckets {
    /// Empty buckets with this rate.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key` at time `now_ms`; false when none is left.
    pub fn take(&mut self, key: &str, now_ms: u64) -> bool {
        if self.buckets.len() > MAX_TRACKED {
            let rate = self.rate;
            self.buckets
                .retain(|_, b| refill(rate, *b, now_ms).tokens < rate.burst);
        }
        let rate = self.rate;
        // Looked up before inserting, so that the common case (a key already
        // tracked: every request of a logged-in user) does not allocate.
        let bucket = match self.buckets.get_mut(key) {
            Some(bucket) => bucket,
            None => self.buckets.entry(key.to_owned()).or_insert(Bucket {
                tokens: rate.burst,
                at_ms: now_ms,
            }),
        };
        *bucket = refill(rate, *bucket, now_ms);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
