//! The firewall's drop counters as an audit event: egress attempts the node's
//! nftables ruleset dropped (and input and forward drops), read from
//! `nft --json list counters`, so an auditor sees that something tried to
//! leave and was stopped.

use serde_json::{json, Map, Value};

use crate::error::AuditError;
use crate::record::Event;

/// The nftables table whose named counters are recorded.
const TABLE: &str = "sovereign";

/// Builds the `firewall`/`drop-counters` event from the JSON that
/// `nft --json list counters` prints: `{ "<counter>": { "packets", "bytes" } }`
/// for every named counter of the `sovereign` table.
pub fn drop_counters_event(nft_json: &str) -> Result<Event, AuditError> {
    let bad = |why: &str| AuditError::Format(format!("nft counters: {why}"));
    let parsed: Value = serde_json::from_str(nft_json).map_err(|e| bad(&e.to_string()))?;
    let items = parsed
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `nftables` array"))?;
    let mut counters = Map::new();
    for counter in items.iter().filter_map(|i| i.get("counter")) {
        if counter.get("table").and_then(Value::as_str) != Some(TABLE) {
            continue;
        }
        let name = counter
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a counter without a name"))?;
        let number = |field: &str| {
            counter
                .get(field)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&format!("counter {name} has no {field}")))
        };
        counters.insert(
            name.to_owned(),
            json!({ "packets": number("packets")?, "bytes": number("bytes")? }),
        );
    }
    if counters.is_empty() {
        return Err(bad(&format!(
            "no counters of table {TABLE} (is the ruleset loaded?)"
        )));
    }
    Ok(Event::new(
        "firewall",
        "drop-counters",
        Value::Object(counters),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_the_sovereign_table_become_one_event() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "egress-drops", "table": "sovereign", "handle": 2, "packets": 3, "bytes": 252}},
            {"counter": {"family": "inet", "name": "input-drops", "table": "sovereign", "handle": 1, "packets": 0, "bytes": 0}},
            {"counter": {"family": "ip", "name": "other", "table": "elsewhere", "handle": 1, "packets": 9, "bytes": 9}}]}"#;
        let event = drop_counters_event(text).unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["service"], "firewall");
        assert_eq!(json["kind"], "drop-counters");
        assert_eq!(json["details"]["egress-drops"]["packets"], 3);
        assert_eq!(json["details"]["input-drops"]["bytes"], 0);
        assert!(json["details"].get("other").is_none());
        for bad in ["", "{}", r#"{"nftables": []}"#] {
            assert!(drop_counters_event(bad).is_err(), "{bad}");
        }
    }
}
