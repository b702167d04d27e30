//! Refused requests (401, 429, 503) are audited as counted summaries: one
//! record per interval at most, counting refusals per client address, key
//! and status, with a bounded number of rows, so an outsider hammering the
//! API cannot flood the audit log. No prompt text is ever recorded.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

/// Most distinct (client, key, status) rows in one summary (the record stays
/// well under the audit log's 16 KiB event bound); the rest are
/// counted together.
const MAX_ROWS: usize = 100;

type Row = (IpAddr, Option<String>, u16);

/// Refusals counted since the last summary.
#[derive(Default)]
pub struct Refusals {
    counts: Mutex<(BTreeMap<Row, u64>, u64)>,
}

impl Refusals {
    /// Counts one refusal of `client` (with the key's name once known).
    pub fn count(&self, client: IpAddr, key: Option<&str>, status: u16) {
        let Ok(mut guard) = self.counts.lock() else {
            return;
        };
        let (rows, others) = &mut *guard;
        let row = (client, key.map(str::to_owned), status);
        if let Some(count) = rows.get_mut(&row) {
            *count += 1;
        } else if rows.len() < MAX_ROWS {
            rows.insert(row, 1);
        } else {
            *others += 1;
        }
    }

    /// Records the summary since the last one, if anything was refused.
    pub fn flush(&self, audit: &sovereign_audit::Auditor, interval: Duration) {
        let (rows, others) = match self.counts.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(_) => return,
        };
        if rows.is_empty() && others == 0 {
            return;
        }
        let refused: Vec<_> = rows
            .into_iter()
            .map(|((client, key, status), count)| {
                json!({ "client": client.to_string(), "key": key, "status": status, "count": count })
            })
            .collect();
        let details = json!({
            "interval_seconds": interval.as_secs(),
            "refused": refused,
            "other_refused": others,
        });
        if let Err(error) = audit.record(sovereign_audit::Event::new("api", "api-refused", details))
        {
            tracing::warn!(%error, "could not record the refused-requests summary");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_row_and_bounds_the_rows() {
        let refusals = Refusals::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..5 {
            refusals.count(a, None, 401);
        }
        refusals.count(a, Some("alice"), 429);
        for i in 0..1000u32 {
            refusals.count(IpAddr::from(i.to_be_bytes()), None, 401);
        }
        let (rows, others) = &*refusals.counts.lock().unwrap();
        assert_eq!(rows.len(), MAX_ROWS);
        assert_eq!(rows[&(a, None, 401)], 5);
        assert_eq!(rows[&(a, Some("alice".into()), 429)], 1);
        assert_eq!(*others, 1000 - (MAX_ROWS as u64 - 2));
    }

    #[test]
    fn a_full_summary_fits_in_one_audit_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(sovereign_audit::AuditLog::open(dir.path(), "t").unwrap());
        let audit = sovereign_audit::Auditor::Local(log);
        let refusals = Refusals::default();
        for i in 0..5000u32 {
            let client = IpAddr::from([0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16]);
            refusals.count(client, Some("a-key-name-of-some-length"), 503);
        }
        refusals.flush(&audit, Duration::from_secs(60));
        let text: String = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .collect();
        assert!(text.contains("\"other_refused\":4900"), "{text}");
        assert!(refusals.counts.lock().unwrap().0.is_empty());
    }
}
