//! Prometheus metrics: requests, tokens, latency, queue.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Per route: bucket counts, total count, sum of seconds.
type Histogram = ([u64; BUCKETS.len()], u64, f64);

/// The API's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Generations stopped because the client went away.
    pub cancelled: AtomicU64,
    /// Requests waiting for a slot.
    pub queued: AtomicU64,
    /// Requests generating now.
    pub in_flight: AtomicU64,
}

impl Metrics {
    /// Counts a finished request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route.to_owned(), status)).or_default() += 1;
        }
        if let Ok(mut map) = self.latency.lock() {
            let entry = map
                .entry(route.to_owned())
                .or_insert(([0; BUCKETS.len()], 0, 0.0));
            for (i, bound) in BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    entry.0[i] += 1;
                }
            }
            entry.1 += 1;
            entry.2 += seconds;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP sovereign_api_requests_total Requests by route and status.\n# TYPE sovereign_api_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "sovereign_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP sovereign_api_request_duration_seconds Request latency.\n# TYPE sovereign_api_request_duration_seconds histogram\n");
        if let Ok(map) = self.latency.lock() {
            for (route, (buckets, count, sum)) in map.iter() {
                for (bound, n) in BUCKETS.iter().zip(buckets) {
                    let _ = writeln!(out, "sovereign_api_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}");
                }
                let _ = writeln!(out, "sovereign_api_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}");
                let _ = writeln!(
                    out,
                    "sovereign_api_request_duration_seconds_sum{{route=\"{route}\"}} {sum}"
                );
                let _ = writeln!(
                    out,
                    "sovereign_api_request_duration_seconds_count{{route=\"{route}\"}} {count}"
                );
            }
        }
        for (name, kind, help, value) in [
            (
                "sovereign_api_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "sovereign_api_completion_tokens_total",
                "counter",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            (
                "sovereign_api_cancelled_total",
                "counter",
                "Generations cancelled by a client disconnect.",
                &self.cancelled,
            ),
            (
                "sovereign_api_queue_depth",
                "gauge",
                "Requests waiting for a slot.",
                &self.queued,
            ),
            (
                "sovereign_api_in_flight",
                "gauge",
                "Requests generating.",
                &self.in_flight,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}
