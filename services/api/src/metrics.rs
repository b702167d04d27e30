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
    first_token: Mutex<Histogram>,
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

/// Counts `seconds` into `histogram`.
/// One metric with a single value in the Prometheus text format: its
/// `# HELP` and `# TYPE` lines and the sample (`kind`: `counter` or `gauge`).
pub fn single_metric(name: &str, kind: &str, help: &str, value: impl std::fmt::Display) -> String {
    format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n")
}

fn count(histogram: &mut Histogram, seconds: f64) {
    for (i, bound) in BUCKETS.iter().enumerate() {
        if seconds <= *bound {
            histogram.0[i] += 1;
        }
    }
    histogram.1 += 1;
    histogram.2 += seconds;
}

/// Writes `histogram` as Prometheus lines of `name` with `labels` (`k="v",` each).
fn write_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let (buckets, total, sum) = histogram;
    for (bound, n) in BUCKETS.iter().zip(buckets) {
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {total}");
    let labels = match labels.trim_end_matches(',') {
        "" => String::new(),
        l => format!("{{{l}}}"),
    };
    let _ = writeln!(out, "{name}_sum{labels} {sum}");
    let _ = writeln!(out, "{name}_count{labels} {total}");
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
            count(entry, seconds);
        }
    }

    /// Counts the time from a generation's arrival to its first token.
    pub fn observe_first_token(&self, seconds: f64) {
        if let Ok(mut histogram) = self.first_token.lock() {
            count(&mut histogram, seconds);
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
            for (route, histogram) in map.iter() {
                let labels = format!("route=\"{route}\",");
                write_histogram(
                    &mut out,
                    "sovereign_api_request_duration_seconds",
                    &labels,
                    histogram,
                );
            }
        }
        out.push_str("# HELP sovereign_api_time_to_first_token_seconds Time from a generation's arrival to its first token (each choice).\n# TYPE sovereign_api_time_to_first_token_seconds histogram\n");
        if let Ok(histogram) = self.first_token.lock() {
            write_histogram(
                &mut out,
                "sovereign_api_time_to_first_token_seconds",
                "",
                &histogram,
            );
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
            out.push_str(&single_metric(
                name,
                kind,
                help,
                value.load(Ordering::Relaxed),
            ));
        }
        out
    }
}
