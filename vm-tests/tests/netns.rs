//! The namespace harness itself: cables carry IPv6 link-local traffic
//! between neighbours only, a pulled cable carries nothing, and nothing is
//! left behind. Needs root, `ip` and `ping`.

use std::path::Path;
use std::process::Stdio;

use sovereign_vm_tests::netns::RingNet;

/// The link-local address of `iface` in namespace `ns` (None before it has one).
fn link_local(net: &RingNet, node: usize, iface: &str) -> Option<String> {
    let out = net
        .node(node)
        .run(
            "ip",
            &["-6", "-o", "addr", "show", "dev", iface, "scope", "link"],
        )
        .ok()?;
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)?;
    Some(addr.split('/').next()?.to_string())
}

fn ping(net: &RingNet, from: usize, iface: &str, to: &str) -> bool {
    net.node(from)
        .command("ping")
        .args(["-6", "-c", "1", "-W", "1", &format!("{to}%{iface}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_ring_of_three_is_cabled_link_local_and_cleaned_up() {
    let net = RingNet::ring(3).unwrap();
    let namespaces: Vec<String> = net
        .nodes()
        .iter()
        .map(|n| n.namespace().to_string())
        .collect();
    for node in net.nodes() {
        assert_eq!(node.interfaces(), ["thunderbolt0", "thunderbolt1"]);
        let routes = node.run("ip", &["-4", "route", "show"]).unwrap();
        assert!(routes.trim().is_empty(), "no IPv4 at all: {routes}");
    }
    // Cable 0 joins node 0's thunderbolt0 and node 1's thunderbolt1.
    let b = link_local(&net, 1, "thunderbolt1").expect("node 1 has a link-local address");
    assert!(b.starts_with("fe80:"));
    assert!(
        ping(&net, 0, "thunderbolt0", &b),
        "neighbours reach each other"
    );
    assert!(
        !ping(&net, 0, "thunderbolt1", &b),
        "node 0's other cable goes to node 2, not node 1"
    );

    net.cable_down(0).unwrap();
    assert!(
        !ping(&net, 0, "thunderbolt0", &b),
        "a pulled cable carries nothing"
    );
    net.cable_up(0).unwrap();
    let b = link_local(&net, 1, "thunderbolt1").unwrap();
    assert!(
        ping(&net, 0, "thunderbolt0", &b),
        "the cable back carries again"
    );

    let sleeper = net
        .node(2)
        .spawn(net.node(2).command("sleep").arg("600"))
        .unwrap();
    let pid = sleeper.id();
    let listed = net
        .node(2)
        .run("ip", &["netns", "pids", net.node(2).namespace()]);
    assert!(listed
        .unwrap()
        .split_whitespace()
        .any(|p| p == pid.to_string()));
    sleeper.pause().unwrap();
    sleeper.resume().unwrap();
    drop(sleeper);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the process was killed and reaped"
    );
    drop(net);
    for ns in namespaces {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "{ns} removed");
    }
}
