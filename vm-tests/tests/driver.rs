//! The driver's own tests: a tiny guest (Debian's kernel and a busybox
//! initramfs, `scripts/selftest-payload`) booted under TCG. Covers the console,
//! the command agent, USB stick hot-plug through QMP, a ring link between two
//! machines, power-off and crash, and that no host network device exists.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sovereign_vm_tests::{Boot, Link, Machine, MachineConfig, VmError};

/// One VM test at a time: the machines have 2 cores, shared.
static SERIAL: Mutex<()> = Mutex::new(());

const BOOT: Duration = Duration::from_secs(180);
const CMD: Duration = Duration::from_secs(60);

fn payload() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/selftest-payload");
    let output = Command::new(script).output().expect("run selftest-payload");
    assert!(
        output.status.success(),
        "selftest-payload failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn selftest(name: &str) -> MachineConfig {
    let dir = payload();
    MachineConfig::new(
        name,
        Boot::Kernel {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            append: "console=ttyS0 panic=-1 quiet sovereign.selftest=1".into(),
            disk: None,
        },
    )
}

fn boot(config: MachineConfig) -> Machine {
    let mut machine = Machine::new(config).expect("machine");
    machine.start().expect("start");
    machine
        .wait_for_console("selftest: ready", BOOT)
        .expect("guest ready");
    machine
}

#[test]
fn the_qemu_command_has_no_host_network_device() {
    let link = Link::new().expect("link");
    let (a, _) = link.ends();
    let machine = Machine::new(selftest("node").link(a)).expect("machine");
    let command = machine.qemu_command().join(" ");
    assert!(command.contains("-nic none"), "{command}");
    assert!(command.contains("-accel tcg"), "{command}");
    assert!(command.contains("-machine q35"), "{command}");
    assert!(command.contains("-nodefaults"), "{command}");
    for forbidden in [
        "-netdev user",
        "-nic user",
        "tap,",
        "bridge",
        "hostfwd",
        "vhost",
        "-net ",
    ] {
        assert!(!command.contains(forbidden), "{forbidden} in {command}");
    }
    let netdevs: Vec<&str> = command
        .split(" -netdev ")
        .skip(1)
        .map(|rest| rest.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(netdevs.len(), 1, "{command}");
    assert!(
        netdevs[0].starts_with("dgram,id=ring0,local.type=unix"),
        "{command}"
    );
}

#[test]
fn a_machine_boots_runs_commands_and_sees_no_network_device() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut node = boot(selftest("node"));
    let cmdline = node.succeed("cat /proc/cmdline", CMD).expect("cmdline");
    assert!(cmdline.contains("sovereign.selftest=1"), "{cmdline}");
    let (status, output) = node
        .execute("echo to-stdout; exit 3", CMD)
        .expect("execute");
    assert_eq!(status, 3);
    assert_eq!(output.trim(), "to-stdout");
    let error = node.succeed("false", CMD).expect_err("false fails");
    assert!(
        matches!(error, VmError::CommandFailed { status: 1, .. }),
        "{error}"
    );
    let interfaces = node.succeed("ls /sys/class/net", CMD).expect("interfaces");
    assert_eq!(interfaces.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let error = node
        .wait_for_console("this never appears", Duration::from_secs(2))
        .expect_err("nothing printed it");
    assert!(matches!(error, VmError::Timeout { .. }), "{error}");
    node.crash().expect("crash");
    assert!(!node.is_running());
}

#[test]
fn a_stick_plugged_through_qmp_appears_and_disappears_in_the_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let stick = dir.path().join("stick.img");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..18].copy_from_slice(b"sovereign-stick-42");
    std::fs::write(&stick, bytes).expect("stick image");
    let mut node = boot(selftest("node"));
    assert_eq!(
        node.execute("test -b /dev/sda", CMD).expect("execute").0,
        1,
        "no stick yet"
    );
    let id = node.attach_stick(&stick).expect("attach");
    let head = node
        .succeed(
            "for i in $(seq 150); do [ -b /dev/sda ] && break; sleep 0.2; done; head -c 18 /dev/sda",
            CMD,
        )
        .expect("stick readable");
    assert_eq!(head.trim(), "sovereign-stick-42");
    node.detach_stick(&id).expect("detach");
    node.succeed(
        "for i in $(seq 150); do [ -b /dev/sda ] || exit 0; sleep 0.2; done; exit 1",
        CMD,
    )
    .expect("stick gone");
    let error = node
        .attach_stick(&dir.path().join("missing.img"))
        .expect_err("no such stick");
    assert!(error.to_string().contains("missing.img"), "{error}");
}

/// The machine's eth0 link-local address once duplicate address detection is
/// over (/proc/net/if_inet6: address, index, prefix, scope 20 = link, flags).
fn link_local(machine: &mut Machine) -> String {
    for _ in 0..100 {
        let table = machine
            .succeed("cat /proc/net/if_inet6", CMD)
            .expect("if_inet6");
        let ready = table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(4)?, 16).ok()?;
            (fields.get(5) == Some(&"eth0") && fields.get(3) == Some(&"20") && flags & 0x40 == 0)
                .then(|| fields[0].to_string())
        });
        if let Some(hex) = ready {
            let groups: Vec<String> = (0..8).map(|g| hex[g * 4..g * 4 + 4].to_string()).collect();
            return groups.join(":");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{}: no usable link-local address on eth0", machine.name());
}

#[test]
fn two_machines_on_a_ring_link_reach_each_other_over_ipv6_link_local() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let link = Link::new().expect("link");
    let (a, b) = link.ends();
    let mut peer_a = Machine::new(selftest("peer_a").link(a)).expect("peer_a");
    let mut peer_b = Machine::new(selftest("peer_b").link(b)).expect("peer_b");
    peer_a.start().expect("start peer_a");
    peer_b.start().expect("start peer_b");
    peer_a
        .wait_for_console("selftest: ready", BOOT)
        .expect("peer_a ready");
    peer_b
        .wait_for_console("selftest: ready", BOOT)
        .expect("peer_b ready");
    let interfaces = peer_a
        .succeed("ls /sys/class/net", CMD)
        .expect("interfaces");
    assert_eq!(
        interfaces.split_whitespace().collect::<Vec<_>>(),
        ["eth0", "lo"]
    );
    // Both ends need their link-local address past duplicate address detection.
    let _ = link_local(&mut peer_a);
    let address = link_local(&mut peer_b);
    let ping = peer_a
        .succeed(&format!("ping6 -c 2 -W 10 {address}%eth0"), CMD)
        .expect("ping over the ring link");
    assert!(ping.contains("2 packets received"), "{ping}");
}

#[test]
fn a_guest_that_powers_off_ends_the_machine_and_waits_report_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut node = boot(selftest("node"));
    node.send_console("n0 poweroff -f\n").expect("send");
    let status = node
        .wait_for_shutdown(Duration::from_secs(60))
        .expect("powered off");
    assert!(status.success(), "{status}");
    assert!(!node.is_running());
    let error = node
        .wait_for_console("ready", Duration::from_secs(1))
        .expect_err("not running");
    assert!(error.to_string().contains("not running"), "{error}");
    // It boots again from the same configuration.
    node.start().expect("restart");
    node.wait_for_console("selftest: ready", BOOT)
        .expect("ready again");
    let mut other = boot(selftest("other"));
    other.send_console("n0 poweroff -f\n").expect("send");
    let error = other
        .wait_for_console("never printed", Duration::from_secs(120))
        .expect_err("QEMU exits first");
    assert!(matches!(error, VmError::Exited { .. }), "{error}");
}
