//! One stick, every node, end to end: three enrolled nodes in network
//! namespaces (`sovereign node run`, the real demo model), only one of which
//! is given the bundle; it reaches the others over the ring, each imports it
//! with its own trust file, and the three-stage plan serves it. A tampered
//! bundle a peer offers is refused and audited by each receiver. Needs root,
//! `ip` and python3. No test asserts a time: waits are bounded only so that
//! a broken ring fails.

mod support;

use std::time::{Duration, Instant};

use sovereign_vm_tests::netns::RingNet;
use support::cluster::{Cluster, WAIT};

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Waits until `check` holds, or fails with `what` and the nodes' logs.
fn wait_until(ring: &Cluster, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < WAIT, "{what}\n{}", ring.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_bundle_imported_on_one_node_goes_live_on_all_three_and_a_tampered_one_is_refused() {
    let mut ring = Cluster::with_model_on(RingNet::ring(3).unwrap(), &NODES, &[], &[]);
    for i in 0..3 {
        ring.start(i);
    }

    // Without a model the nodes form the ring, answer 503 and say why.
    wait_until(&ring, "node-c sees three members", || {
        ring.status(2)
            .and_then(|s| s["members"].as_array().map(Vec::len))
            == Some(3)
    });
    let waiting = ring.status(2).unwrap();
    assert_eq!(waiting["status"], "unavailable", "{waiting}");
    assert_eq!(waiting["ring"]["serving"], false, "{waiting}");
    assert_eq!(ring.http_status(2, "/v1/models"), 503);

    // The stick goes into node-a only: `sovereign import` into its running
    // store, with the operator's trust as the image's stick unit gives it.
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--trust", "node.trust", "smollm2-1.0.0.sovb"]).ok();

    // Every node holds it through its own import and the three serve it.
    for i in 0..3 {
        ring.wait_for_order(i, &NODES);
    }
    let status = ring.status(1).unwrap();
    for member in status["members"].as_array().unwrap() {
        assert_eq!(
            member["models"],
            serde_json::json!(["smollm2@1.0.0"]),
            "{status}"
        );
    }
    for node in ["node-b", "node-c"] {
        // Its store held no trust: the node installed its `--trust` first.
        assert!(ring.lab.path(&format!("store-{node}/trust")).is_file());
        let imports = ring.audited(node, "import", "import");
        assert!(
            imports
                .iter()
                .any(|r| r["details"]["model"] == "smollm2@1.0.0"
                    && r["details"]["outcome"] == "imported"),
            "{node} imported the bundle itself: {imports:?}"
        );
        let received = ring.audited(node, "replication", "receive");
        assert!(
            received.iter().any(|r| r["details"]["from"] == "node-a"),
            "{node} received it from node-a: {received:?}"
        );
    }

    // node-a passes on a bundle with one flipped payload byte (as a faulty
    // or hostile peer would): each receiver's own import refuses it, audits
    // it and tells node-a; the plan in force keeps serving.
    ring.lab.model("tiny", 100_000, 7);
    #[rustfmt::skip]
    ring.lab.bundle("tiny-1.0.0.sovb", "tiny", "1.0.0", "tiny", &["alice"], &[]);
    support::flip(&ring.lab.path("tiny-1.0.0.sovb"), -1000);
    let outbox = ring.lab.path("store-node-a/outbox/tiny@1.0.0");
    std::fs::create_dir_all(ring.lab.path("store-node-a/outbox/.tiny")).unwrap();
    std::fs::copy(
        ring.lab.path("tiny-1.0.0.sovb"),
        ring.lab.path("store-node-a/outbox/.tiny/tiny-1.0.0.sovb"),
    )
    .unwrap();
    std::fs::rename(ring.lab.path("store-node-a/outbox/.tiny"), &outbox).unwrap();
    for (i, node) in [(1, "node-b"), (2, "node-c")] {
        wait_until(&ring, &format!("{node} refuses tiny@1.0.0"), || {
            ring.status(i).is_some_and(|s| {
                s["replication"]["refusals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["item"] == "tiny@1.0.0" && r["node"] == node)
            })
        });
        let refused = ring.audited(node, "replication", "refused");
        assert!(
            refused
                .iter()
                .any(|r| r["details"]["model"] == "tiny@1.0.0" && r["details"]["from"] == "node-a"),
            "{node} audited the refusal: {refused:?}"
        );
        let listed = ring
            .lab
            .run(&["models", "--store", &format!("store-{node}")])
            .ok()
            .stdout;
        assert!(!listed.contains("tiny"), "{node} never took it: {listed}");
    }
    wait_until(&ring, "node-a hears both refusals", || {
        ring.status(0).is_some_and(|s| {
            s["replication"]["refusals"]
                .as_array()
                .is_some_and(|r| r.iter().filter(|r| r["item"] == "tiny@1.0.0").count() == 2)
        })
    });
    assert_eq!(ring.order(0), NODES, "the plan in force keeps serving");
    assert!(!ring.ask(2, 8, 1, 0.0).is_empty(), "node-c answers");
}
