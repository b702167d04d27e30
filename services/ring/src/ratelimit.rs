//! Token buckets: how many announcements a source may send, how many
//! connections a link accepts, and how often a refusal is logged.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(burst: u32, per_second: f64) -> Self {
        Bucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second,
            last: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One bucket per key, at most `capacity` keys (all forgotten when full, so
/// a flood of sources cannot grow it).
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    buckets: HashMap<K, Bucket>,
    capacity: usize,
    burst: u32,
    per_second: f64,
}

impl<K: Hash + Eq> Buckets<K> {
    /// Empty; each new key starts with a full bucket.
    pub fn new(capacity: usize, burst: u32, per_second: f64) -> Self {
        Buckets {
            buckets: HashMap::new(),
            capacity,
            burst,
            per_second,
        }
    }

    /// Takes a token from `key`'s bucket if there is one.
    pub fn take(&mut self, key: K) -> bool {
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            self.buckets.clear();
        }
        let (burst, per_second) = (self.burst, self.per_second);
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket::new(burst, per_second))
            .take()
    }
}

/// Logs refusals at most a few times a second per kind, counting the rest.
#[derive(Debug)]
pub(crate) struct LogLimit {
    buckets: std::sync::Mutex<Buckets<&'static str>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    /// At most 5 lines per second per kind, bursts of 10.
    pub fn new() -> Self {
        LogLimit {
            buckets: std::sync::Mutex::new(Buckets::new(64, 10, 5.0)),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a line of `kind` may be logged now; when not, it is counted.
    pub fn allow(&self, kind: &'static str) -> bool {
        let allowed = self
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(kind);
        if !allowed {
            self.suppressed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        allowed
    }

    /// How many lines were not logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refuses() {
        let mut bucket = Bucket::new(3, 0.0);
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.take());
    }

    #[test]
    fn buckets_are_per_key_and_bounded() {
        let mut buckets = Buckets::new(2, 1, 0.0);
        assert!(buckets.take("a"));
        assert!(!buckets.take("a"));
        assert!(buckets.take("b"));
        assert!(buckets.take("c"), "a third key clears the table");
        assert!(buckets.buckets.len() <= 2);
    }
}
