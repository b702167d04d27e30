//! Issue 14, items 4 and 5: events a hostile or buggy client sends must never
//! make the log unverifiable, and a client may only record what its policy allows.

use sovereign_audit::{verify, AuditLog, Event, Export};

fn nested(depth: usize) -> serde_json::Value {
    let mut value = serde_json::json!(1);
    for _ in 0..depth {
        value = serde_json::json!([value]);
    }
    value
}

/// Whatever the log acknowledged, it reopens and verifies.
fn reopens_and_verifies(dir: &std::path::Path) {
    drop(AuditLog::open(dir, "node").expect("the log refuses to reopen"));
    verify(&Export::from_dir(dir).unwrap(), None, None).expect("the log no longer verifies");
}

#[test]
fn r14_a_float_that_does_not_round_trip_keeps_the_log_verifiable() {
    let tmp = tempfile::tempdir().unwrap();
    let log = AuditLog::open(tmp.path(), "node").unwrap();
    let details: serde_json::Value =
        serde_json::from_str(r#"{"x": 2.2790121708605243e+274, "y": 0.1, "z": -1e-300}"#).unwrap();
    log.record(Event::new("api", "api-request", details))
        .unwrap();
    drop(log);
    reopens_and_verifies(tmp.path());
}

#[test]
fn r14_deep_or_huge_details_are_refused_and_the_log_stays_verifiable() {
    let tmp = tempfile::tempdir().unwrap();
    let log = AuditLog::open(tmp.path(), "node").unwrap();
    for depth in [40, 126, 127, 200] {
        let err = log
            .record(Event::new("api", "api-request", nested(depth)))
            .expect_err("a deeply nested event was acknowledged");
        assert!(err.to_string().contains("deep"), "{err}");
    }
    let huge = serde_json::json!({ "blob": "x".repeat(200 * 1024) });
    let err = log
        .record(Event::new("api", "api-request", huge))
        .expect_err("a huge event was acknowledged");
    assert!(err.to_string().contains("bytes"), "{err}");
    let err = log
        .record(Event::new(
            "api\u{1b}[2K",
            "api-request",
            serde_json::json!({}),
        ))
        .expect_err("a service name with an escape sequence was acknowledged");
    assert!(err.to_string().contains("service"), "{err}");
    // A refusal does not close the log.
    assert_eq!(
        log.record(Event::new("api", "api-request", nested(8)))
            .unwrap(),
        0
    );
    drop(log);
    reopens_and_verifies(tmp.path());
}
