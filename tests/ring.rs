//! The ring end to end: enrolled nodes started the documented way
//! (`sovereign node run`) in network namespaces cabled like Thunderbolt
//! (veth pairs, IPv6 link-local only), the real demo model, the official
//! `openai` client in each node's namespace. Needs root, `ip` and python3.
//! No test asserts a time: waits are bounded only so that a broken ring fails.

mod support;

use std::time::Duration;

use serde_json::Value;
use sovereign_vm_tests::netns::RingNet;
use support::cluster::Cluster;

#[test]
fn three_nodes_answer_like_one_and_carry_on_through_a_lost_node_and_a_cut_cable() {
    let mut ring = Cluster::new(
        RingNet::ring(3).unwrap(),
        &["node-a", "node-b", "node-c"],
        &[],
    );
    // What the API does to the logits (bias, penalties, a JSON schema's
    // grammar) and gives back of them (log-probabilities): the reference is
    // `sovereign serve`, the batched engine in one process.
    let shaped = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Describe a lighthouse keeper as JSON."}],
        "max_tokens": 48, "seed": 11, "temperature": 0.8,
        "frequency_penalty": 0.6, "presence_penalty": 0.3, "logit_bias": {"28": -5, "30": 2},
        "logprobs": true, "top_logprobs": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "keeper", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"]}}},
    });
    let shaped_answer = |body: &Value| {
        let choice = &body["choices"][0];
        (
            choice["message"]["content"].clone(),
            choice["logprobs"]["content"].clone(),
        )
    };
    let serving = ring.serve_alone(0);
    let (code, alone) = ring.post(0, "/v1/chat/completions", &shaped);
    drop(serving);
    assert_eq!(code, 200, "{alone}");
    let (text, logprobs) = shaped_answer(&alone);
    assert!(text.as_str().unwrap().starts_with('{'), "{alone}");
    assert!(!logprobs.as_array().unwrap().is_empty(), "{alone}");

    // One node alone serves every layer: the reference answers.
    ring.start(0);
    ring.wait_for_order(0, &["node-a"]);
    let greedy = ring.ask(0, 64, 1, 0.0);
    let seeded = ring.ask(0, 32, 7, 0.9);
    assert!(greedy.len() > 100, "a long answer: {greedy:?}");
    assert_ne!(greedy, seeded);
    let (code, single) = ring.post(0, "/v1/chat/completions", &shaped);
    assert_eq!(code, 200, "{single}");
    assert_eq!(
        shaped_answer(&single),
        shaped_answer(&alone),
        "shaped, constrained, with log-probabilities, from a one-node ring"
    );

    // The others join with nothing configured; every node's API answers
    // exactly like the single node, on a plan of three stages.
    ring.start(1);
    ring.start(2);
    let status = ring.wait_for_order(0, &["node-a", "node-b", "node-c"]);
    let layers: Vec<Value> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["layers"].clone())
        .collect();
    assert_eq!(
        layers,
        [
            serde_json::json!([0, 10]),
            serde_json::json!([10, 20]),
            serde_json::json!([20, 30])
        ],
        "equal budgets split the 30 layers evenly: {status}"
    );
    for i in 0..3 {
        ring.wait_for_order(i, &["node-a", "node-b", "node-c"]);
        assert_eq!(ring.ask(i, 64, 1, 0.0), greedy, "greedy from node {i}");
    }
    assert_eq!(ring.ask(2, 32, 7, 0.9), seeded, "seeded from node-c");
    let (code, spread) = ring.post(2, "/v1/chat/completions", &shaped);
    assert_eq!(code, 200, "{spread}");
    assert_eq!(
        shaped_answer(&spread),
        shaped_answer(&alone),
        "shaped, constrained, with log-probabilities, from node-c"
    );

    // The middle node dies mid-stream: the entry replays on the new plan and
    // the client gets the single node's tokens.
    let replays = ring.metric(0, "sovereign_ring_replays_total");
    let mut stream = ring.stream(0, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.kill(1);
    assert_eq!(stream.finish(&ring), greedy, "through a killed middle node");
    assert!(
        ring.metric(0, "sovereign_ring_replays_total") > replays,
        "the stream was replayed on the new plan"
    );
    ring.wait_for_order(0, &["node-a", "node-c"]);

    // It comes back, and the three-stage plan with it.
    ring.start(1);
    ring.wait_for_order(0, &["node-a", "node-b", "node-c"]);
    assert_eq!(ring.ask(1, 64, 1, 0.0), greedy, "after the return");

    // A cut cable in the closed ring: traffic goes the other way round.
    let mut stream = ring.stream(0, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.net.cable_down(0).unwrap();
    assert_eq!(stream.finish(&ring), greedy, "through a cut cable");
    assert_eq!(
        ring.order(0),
        ["node-a", "node-b", "node-c"],
        "node-b is still reached through node-c"
    );

    // The middle node's remaining cable goes down mid-stream too: it is
    // unreachable, and the two others finish the answer.
    let mut stream = ring.stream(2, 64, 1, 0.0);
    stream.pieces(4, &ring);
    ring.net.cable_down(1).unwrap();
    assert_eq!(stream.finish(&ring), greedy, "node-b cut off");
    ring.wait_for_order(2, &["node-a", "node-c"]);
}

#[test]
fn a_foreign_node_and_a_revoked_node_are_refused() {
    // node-a in the middle of a chain: one cable to a node of another
    // cluster, one to a node of its own cluster whose certificate is revoked.
    let mut ring = Cluster::new(
        RingNet::chain(3).unwrap(),
        &["node-x", "node-a", "node-r"],
        &["node-x"],
    );
    #[rustfmt::skip]
    ring.lab.run(&["cluster", "revoke", "--cluster", "acme", "node-r"]).ok();
    std::fs::create_dir(ring.lab.path("stick")).unwrap();
    std::fs::copy(
        ring.lab.path("acme/revoked.crl"),
        ring.lab.path("stick/revoked.crl"),
    )
    .unwrap();
    #[rustfmt::skip]
    ring.lab.run(&["import", "--store", "store-node-a", "--cluster-ca", "acme/ca.pem", "stick"]).ok();
    for i in 0..3 {
        ring.start(i);
    }
    for (i, name) in ["node-x", "node-a", "node-r"].iter().enumerate() {
        ring.wait_for_order(i, &[name]);
    }
    // Long enough for many announcements and connection attempts.
    std::thread::sleep(Duration::from_secs(5));
    for (i, name) in ["node-x", "node-a", "node-r"].iter().enumerate() {
        let status = ring.status(i).unwrap();
        let members: Vec<&str> = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert_eq!(
            members,
            [*name],
            "{name} stays alone: {status}\n{}",
            ring.logs()
        );
    }
    assert!(
        ring.metric(1, "sovereign_ring_connections_refused_total")
            + ring.metric(1, "sovereign_ring_announcements_refused_total")
            > 0,
        "node-a counted the refusals"
    );
    // node-a's audit log says who knocked and why, once per kind a minute.
    let refused = ring.audited("node-a", "node", "ring-refused");
    for rogue in ["node-x", "node-r"] {
        assert!(
            refused.iter().any(|r| r.to_string().contains(rogue)),
            "no audited refusal of {rogue}: {refused:#?}"
        );
    }
    assert!(
        refused.len() <= 8,
        "refusals are not rate-limited: {refused:#?}"
    );
    let answer = ring.ask(1, 16, 1, 0.0);
    assert!(!answer.is_empty(), "node-a still serves alone");
}

#[test]
fn a_cable_gone_silent_without_losing_carrier_is_noticed_by_heartbeat_and_the_answer_completes() {
    let names = ["node-a", "node-b", "node-c"];
    let mut ring = Cluster::new(RingNet::ring(3).unwrap(), &names, &[]);
    for i in 0..3 {
        ring.start(i);
    }
    for i in 0..3 {
        ring.wait_for_order(i, &names);
    }
    let greedy = ring.ask(1, 48, 1, 0.0);

    // node-a drops everything on its cable to node-b, both ways, while
    // node-b answers: no carrier changes on either side, so only the
    // heartbeats tell the two that the link is gone.
    let mut stream = ring.stream(1, 48, 1, 0.0);
    stream.pieces(4, &ring);
    let cable = &ring.net.cables()[0];
    let iface = &cable.a_if;
    let rules = format!(
        "add table inet silent; \
         add chain inet silent out {{ type filter hook output priority 0; policy accept; }}; \
         add chain inet silent in {{ type filter hook input priority 0; policy accept; }}; \
         add rule inet silent out oifname {iface} drop; \
         add rule inet silent in iifname {iface} drop"
    );
    ring.net.node(cable.a).run("nft", &[&rules]).unwrap();
    assert_eq!(stream.finish(&ring), greedy, "through a silent cable");
    assert_eq!(
        ring.order(1),
        names,
        "node-a is still reached through node-c"
    );
}
