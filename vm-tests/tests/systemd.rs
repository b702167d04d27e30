//! The driver against a real systemd guest (Debian minbase with systemd and the
//! console agent, `scripts/selftest-rootfs`): ring NICs named thunderbolt0/1,
//! waiting for units, a unit that fails, and a clean power-off.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sovereign_vm_tests::{Boot, Link, Machine, MachineConfig, VmError};

fn script(name: &str) -> PathBuf {
    let path = format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(&path).output().expect("run script");
    assert!(
        output.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

#[test]
fn units_are_awaited_failures_reported_and_the_guest_powers_off() {
    let guest = script("selftest-payload");
    let rootfs = script("selftest-rootfs");
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("root.img");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(rootfs.join("root.img"))
        .arg(&disk)
        .status()
        .expect("cp");
    assert!(copied.success());
    let (left, right) = (Link::new().expect("link"), Link::new().expect("link"));
    let mut node = Machine::new(
        MachineConfig::new(
            "node",
            Boot::Kernel {
                kernel: guest.join("vmlinuz"),
                initrd: guest.join("initrd.img"),
                append: "console=ttyS0 panic=-1 sovereign.selftest.root=/dev/vda".into(),
                disk: Some(disk),
            },
        )
        .link(left.ends().0)
        .link(right.ends().0),
    )
    .expect("machine");
    let started = Instant::now();
    node.start().expect("start");
    node.wait_for_console("sovereign-test-agent: ready", Duration::from_secs(300))
        .expect("agent");
    node.wait_for_unit("sovereign-selftest.service", Duration::from_secs(120))
        .expect("one-shot unit finished");
    node.wait_for_unit("multi-user.target", Duration::from_secs(120))
        .expect("multi-user");
    eprintln!(
        "node: systemd guest multi-user in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The driver's ring NICs get the node's ring names (agent/*.link).
    // One marked line: systemd's late status lines share the console.
    let interfaces = node
        .succeed(
            "echo interfaces: $(ls /sys/class/net)",
            Duration::from_secs(60),
        )
        .expect("interfaces");
    let listed = interfaces
        .lines()
        .find_map(|line| line.strip_prefix("interfaces: "))
        .unwrap_or_else(|| panic!("no interface line in {interfaces:?}"));
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        ["lo", "thunderbolt0", "thunderbolt1"]
    );
    // The console shows systemd's status lines without colour codes.
    assert!(
        node.console_text().contains("[  OK  ] Reached target"),
        "{}",
        node.console_tail(20)
    );
    node.succeed(
        "systemd-run --unit=broken.service --property=Type=oneshot /bin/false; true",
        Duration::from_secs(60),
    )
    .expect("start a failing unit");
    let error = node
        .wait_for_unit("broken.service", Duration::from_secs(60))
        .expect_err("the unit failed");
    assert!(matches!(error, VmError::UnitFailed { .. }), "{error}");
    let error = node
        .wait_for_unit("bad'name", Duration::from_secs(5))
        .expect_err("not a unit name");
    assert!(error.to_string().contains("not a unit name"), "{error}");
    let status = node.shutdown(Duration::from_secs(120)).expect("powers off");
    assert!(status.success(), "{status}");
}
