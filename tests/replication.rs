//! One stick, every node, end to end: three enrolled nodes in network
//! namespaces (`sovereign node run`, the real demo model), only one of which
//! is given the bundle; it reaches the others over the ring, each imports it
//! with its own trust file, and the three-stage plan serves it. A tampered
//! bundle a peer offers is refused and audited by each receiver. Needs root,
//! `ip` and python3. No test asserts a time: waits are bounded only so that
//! a broken ring fails.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use sovereign_vm_tests::netns::RingNet;
use support::cluster::{answer, Cluster, WAIT};

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

    // node-a passes on an older, validly signed version of the model every
    // node serves: each receiver refuses the rollback and audits it.
    ring.lab.model("old", 100_000, 9);
    #[rustfmt::skip]
    ring.lab.bundle("smollm2-0.9.0.sovb", "smollm2", "0.9.0", "old", &["alice"], &[]);
    let outbox = ring.lab.path("store-node-a/outbox/smollm2@0.9.0");
    std::fs::create_dir_all(ring.lab.path("store-node-a/outbox/.old")).unwrap();
    std::fs::copy(
        ring.lab.path("smollm2-0.9.0.sovb"),
        ring.lab.path("store-node-a/outbox/.old/smollm2-0.9.0.sovb"),
    )
    .unwrap();
    std::fs::rename(ring.lab.path("store-node-a/outbox/.old"), &outbox).unwrap();
    for node in ["node-b", "node-c"] {
        wait_until(&ring, &format!("{node} refuses the rollback"), || {
            ring.audited(node, "replication", "refused")
                .iter()
                .any(|r| {
                    r["details"]["model"] == "smollm2@0.9.0"
                        && r["details"]["reason"]
                            .as_str()
                            .is_some_and(|reason| reason.contains("rollback refused"))
                })
        });
    }
    assert!(!ring.ask(2, 8, 1, 0.0).is_empty(), "node-c answers");
}

/// The version node `i` serves and its `/health` ring fields.
fn serving(ring: &Cluster, i: usize) -> (String, Value) {
    let status = ring.status(i).unwrap_or_default();
    let version = status["ring"]["version"].as_str().unwrap_or("").to_owned();
    (version, status["ring"].clone())
}

#[test]
fn a_newer_version_takes_over_once_the_answers_in_flight_finish_on_theirs() {
    let mut ring = Cluster::new(RingNet::chain(2).unwrap(), &NODES[..2], &[]);
    // 2.0.0: the demo model again (the switch, not the weights, is on test).
    let model = ring.lab.demo_model();
    #[rustfmt::skip]
    ring.lab.bundle("smollm2-2.0.0.sovb", "smollm2", "2.0.0", &model, &["alice"], &[]);
    for i in 0..2 {
        ring.start(i);
    }
    ring.wait_for_order(1, &NODES[..2]);
    let replays = ring.metric(0, "sovereign_ring_replays_total");

    // A long answer on 1.0.0 (the end tokens biased away: it runs its length,
    // ~20 s here, against ~3.5 s for 2.0.0 to reach both nodes and well
    // within the 60 s the switch waits at most).
    let long = serde_json::json!({
        "model": "smollm2", "max_tokens": 800, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "logit_bias": {"0": -100, "1": -100, "2": -100},
    });
    let running = ring.post_in_background(0, "/v1/chat/completions", &long);
    wait_until(&ring, "the long answer runs", || {
        ring.metric(0, "sovereign_api_in_flight") == 1
    });

    // 2.0.0 arrives on node-a's stick and replicates to node-b; the ring
    // waits for node-a's answer in flight before it moves.
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--trust", "node.trust", "smollm2-2.0.0.sovb"]).ok();
    wait_until(
        &ring,
        "the switch to 2.0.0 waits for node-a's answer",
        || {
            let (version, shown) = serving(&ring, 1);
            version == "1.0.0"
                && shown["switch"]["to"] == "2.0.0"
                && shown["switch"]["waiting_for"] == serde_json::json!(["node-a"])
        },
    );
    // A request that comes meanwhile waits for the switch, then runs on 2.0.0.
    let short = serde_json::json!({
        "model": "smollm2", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Hello"}],
    });
    let held = ring.post_in_background(1, "/v1/chat/completions", &short);
    wait_until(&ring, "node-b holds the new request", || {
        serving(&ring, 1).1["switch"]["held"] == 1
    });
    assert_eq!(serving(&ring, 0).0, "1.0.0", "{}", ring.logs());

    let (code, body) = answer(running);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 800, "{body}");
    assert_eq!(
        ring.metric(0, "sovereign_ring_replays_total"),
        replays,
        "the long answer ran on 1.0.0 to its end, never replayed"
    );
    let (code, body) = answer(held);
    assert_eq!(code, 200, "{body}");
    for i in 0..2 {
        assert_eq!(serving(&ring, i).0, "2.0.0", "{}", ring.logs());
    }
    assert!(ring
        .audited("node-a", "node", "model-loaded")
        .iter()
        .any(|r| r["details"]["model"] == "smollm2@2.0.0"));
}

/// The checkpoint file of `node`'s folder on the stick.
fn carried(ring: &Cluster, node: &str) -> String {
    std::fs::read_to_string(
        ring.lab
            .path(&format!("stick/sovereign-audit/{node}/checkpoint")),
    )
    .unwrap()
}

/// `sovereign audit courier` through node `via`'s courier socket.
fn courier(ring: &Cluster, via: &str) -> String {
    let socket = format!("courier-{via}.sock");
    ring.lab
        .run(&["audit", "courier", "--ring", &socket, "stick"])
        .ok()
        .stdout
}

/// `sovereign audit verify --cluster-ca` of `node`'s folder on the stick.
fn verify_carried(ring: &Cluster, node: &str) -> String {
    let folder = format!("stick/sovereign-audit/{node}");
    #[rustfmt::skip]
    let run = ring.lab.run(&["audit", "verify", "--cluster-ca", "acme/ca.pem", &folder]).ok();
    run.stdout
}

#[test]
fn one_stick_visit_to_any_node_carries_every_members_checkpoint_and_proof() {
    let mut ring = Cluster::new(RingNet::ring(3).unwrap(), &NODES, &[]);
    for (i, node) in NODES.iter().enumerate() {
        let socket = format!("courier-{node}.sock");
        ring.start_with(i, &["--courier-socket", &socket]);
    }
    ring.wait_for_order(0, &NODES);
    std::fs::create_dir(ring.lab.path("stick")).unwrap();

    // First visit, to node-a: every member's folder, each verified with the CA alone.
    let first = courier(&ring, "node-a");
    for node in NODES {
        assert!(
            first.contains(&format!("{node}: left the checkpoint")),
            "{first}\n{}",
            ring.logs()
        );
        let verified = verify_carried(&ring, node);
        assert!(verified.contains(&format!("of node {node}")), "{verified}");
    }
    let c_before = carried(&ring, "node-c");
    // A node whose folder this visit already wrote (the image's stick unit
    // writes its own node's first) is not asked again.
    let request = sovereign_audit::RingCourierRequest {
        previous: Default::default(),
        written: vec!["node-a".into()],
    };
    let reply = sovereign_audit::ask_ring(&ring.lab.path("courier-node-a.sock"), &request).unwrap();
    let nodes: Vec<&str> = reply.packages.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, ["node-b", "node-c"], "{:?}", reply.missing);
    assert!(reply.missing.is_empty(), "{:?}", reply.missing);

    // node-c is powered off; the others record its leave. The next visit
    // carries what it reaches, says what it does not, and leaves node-c's
    // folder as it was.
    ring.kill(2);
    wait_until(&ring, "node-a and node-b record node-c's leave", || {
        ["node-a", "node-b"].iter().all(|node| {
            ring.audited(node, "node", "ring-leave")
                .iter()
                .any(|r| r["details"]["node"] == "node-c")
        })
    });
    let second = courier(&ring, "node-a");
    assert!(second.contains("node-c: not carried"), "{second}");
    assert_eq!(carried(&ring, "node-c"), c_before);
    for node in ["node-a", "node-b"] {
        assert!(
            second.contains(&format!("{node}: left the checkpoint")),
            "{second}"
        );
        // The log grew (node-c's leave, the new plan) and the proof links
        // the checkpoint carried last time to the new one.
        let line = second
            .lines()
            .find(|l| l.starts_with(&format!("{node}: left")))
            .unwrap();
        let size = |after: &str| -> u64 {
            line.split(after)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap()
        };
        assert!(
            size("proof from size ") > 0 && size("checkpoint at size ") > size("proof from size "),
            "{line}"
        );
        let verified = verify_carried(&ring, node);
        assert!(verified.contains("extends the previous one"), "{verified}");
    }

    // node-c comes back; the stick now visits node-b, and node-c's folder
    // extends the checkpoint it carried before node-c went down.
    ring.start_with(2, &["--courier-socket", "courier-node-c.sock"]);
    ring.wait_for_order(1, &NODES);
    let third = courier(&ring, "node-b");
    assert!(
        third.contains("node-c: left the checkpoint") && !third.contains("not carried"),
        "{third}\n{}",
        ring.logs()
    );
    let previous = std::fs::read_to_string(
        ring.lab
            .path("stick/sovereign-audit/node-c/previous-checkpoint"),
    )
    .unwrap();
    assert_eq!(previous, c_before);
    let verified = verify_carried(&ring, "node-c");
    assert!(verified.contains("extends the previous one"), "{verified}");
}

#[test]
fn a_transfer_cut_by_a_pulled_cable_resumes_where_it_stopped() {
    // Two cabled nodes serving the demo model; a large bundle imported on
    // node-a streams to node-b until the only cable is pulled mid-transfer.
    let mut ring = Cluster::new(RingNet::chain(2).unwrap(), &NODES[..2], &[]);
    ring.lab.model("large", 384 << 20, 5);
    #[rustfmt::skip]
    ring.lab.bundle("large-1.0.0.sovb", "large", "1.0.0", "large", &["alice"], &[]);
    for i in 0..2 {
        ring.start(i);
    }
    ring.wait_for_order(1, &NODES[..2]);
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--trust", "node.trust", "large-1.0.0.sovb"]).ok();

    let spooled = || spooled_bytes(&ring.lab.path("store-node-b.spool/partial"));
    let started = Instant::now();
    while spooled() < 16 << 20 {
        assert!(
            started.elapsed() < WAIT,
            "node-b never started receiving\n{}",
            ring.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ring.net.cable_down(0).unwrap();
    // Chunks already on their way may still land; then the spool stops growing.
    std::thread::sleep(Duration::from_secs(2));
    let cut_at = spooled();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(spooled(), cut_at, "the spool grew with the cable pulled");
    assert!(cut_at < 384 << 20, "the transfer finished before the cut");

    ring.net.cable_up(0).unwrap();
    wait_until(&ring, "node-b imports large@1.0.0", || {
        ring.audited("node-b", "import", "import").iter().any(|r| {
            r["details"]["model"] == "large@1.0.0" && r["details"]["outcome"] == "imported"
        })
    });
    // After the cable the stalled transfer asked again from the spool's
    // length, not from byte 0.
    let log = std::fs::read_to_string(ring.lab.path("node-node-b.log")).unwrap();
    let asked_at: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("asking again") && l.contains("item=large@1.0.0"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("at=")))
        .filter_map(|at| at.parse().ok())
        .collect();
    assert!(
        asked_at.iter().any(|at| *at > 0 && *at <= cut_at),
        "no resume from the spool's length ({cut_at} bytes at the cut): {asked_at:?}\n{}",
        ring.logs()
    );
}

#[test]
fn a_node_without_room_for_a_bundle_refuses_it_with_the_reason_and_audits_it() {
    // node-b's spool may hold 32 MiB; node-a offers a 96 MiB bundle.
    let mut ring = Cluster::new(RingNet::chain(2).unwrap(), &NODES[..2], &[]);
    ring.lab.model("large", 96 << 20, 6);
    #[rustfmt::skip]
    ring.lab.bundle("large-1.0.0.sovb", "large", "1.0.0", "large", &["alice"], &[]);
    ring.start(0);
    ring.start_with(1, &["--spool-capacity-mb", "32"]);
    ring.wait_for_order(1, &NODES[..2]);
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--trust", "node.trust", "large-1.0.0.sovb"]).ok();

    wait_until(&ring, "node-b audits that it has no room", || {
        ring.audited("node-b", "replication", "no-room")
            .iter()
            .any(|r| {
                r["details"]["model"] == "large@1.0.0"
                    && r["details"]["reason"]
                        .as_str()
                        .is_some_and(|reason| reason.contains("no room"))
            })
    });
    wait_until(&ring, "node-a hears the reason", || {
        ring.status(0).is_some_and(|s| {
            s["replication"]["refusals"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["item"] == "large@1.0.0"
                        && r["node"] == "node-b"
                        && r["reason"]
                            .as_str()
                            .is_some_and(|why| why.contains("no room"))
                })
        })
    });
    let listed = ring
        .lab
        .run(&["models", "--store", "store-node-b"])
        .ok()
        .stdout;
    assert!(!listed.contains("large"), "node-b never took it: {listed}");
    assert_eq!(ring.order(1), NODES[..2], "the plan in force keeps serving");
}

/// The bytes received so far in a spool's `partial/` directory.
fn spooled_bytes(dir: &std::path::Path) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| match entry.file_type() {
                Ok(t) if t.is_dir() => walk(&entry.path()),
                Ok(_) => entry.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir)
}
