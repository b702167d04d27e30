//! Scenario: an operator flashes a disk image with `sovereign flash`, and the
//! flashed file boots under UEFI (OVMF, TCG, no network device) and the node
//! finds its identity on the state partition.
//!
//! The image here is a stand-in assembled in the test (a unified kernel image
//! of the driver's self-test guest in an ESP, plus a root partition); the same
//! flow with the real node image is in `node_image.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sovereign_vm_tests::{host_tool, workspace_binary, Boot, Machine, MachineConfig};

/// Runs a host tool, failing the test with its output if it fails.
fn run(command: &mut Command) -> String {
    host_tool(command).unwrap_or_else(|e| panic!("{e}"))
}

fn payload() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/selftest-payload");
    PathBuf::from(run(&mut Command::new(script)).trim())
}

/// A GPT disk image: ESP holding a UKI at the removable-media path, and a root partition.
fn stand_in_image(dir: &Path) -> PathBuf {
    let guest = payload();
    fs::write(dir.join("os-release"), "ID=sovereign-selftest\n").expect("os-release");
    fs::write(
        dir.join("cmdline"),
        "console=ttyS0 panic=-1 quiet sovereign.selftest=uefi",
    )
    .expect("cmdline");
    let uki = dir.join("uki.efi");
    run(Command::new("objcopy")
        .arg("--add-section")
        .arg(format!(".osrel={}", dir.join("os-release").display()))
        .args(["--change-section-vma", ".osrel=0x20000"])
        .arg("--add-section")
        .arg(format!(".cmdline={}", dir.join("cmdline").display()))
        .args(["--change-section-vma", ".cmdline=0x30000"])
        .arg("--add-section")
        .arg(format!(".linux={}", guest.join("vmlinuz").display()))
        .args(["--change-section-vma", ".linux=0x2000000"])
        .arg("--add-section")
        .arg(format!(".initrd={}", guest.join("initrd.img").display()))
        .args(["--change-section-vma", ".initrd=0x3000000"])
        .arg("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
        .arg(&uki));
    let esp = dir.join("esp.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "ESP"])
        .arg(&esp)
        .arg("32768"));
    let mtools = |args: &[&str]| {
        run(Command::new(args[0])
            .args(["-i"])
            .arg(&esp)
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1"));
    };
    mtools(&["mmd", "::/EFI", "::/EFI/BOOT"]);
    mtools(&[
        "mcopy",
        uki.to_str().expect("utf8"),
        "::/EFI/BOOT/BOOTX64.EFI",
    ]);
    let image = dir.join("node.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(56 << 20))
        .expect("image");
    run(Command::new("sgdisk")
        .args(["-n1:2048:+32M", "-t1:ef00", "-c1:esp"])
        .args([
            "-n2:0:+16M",
            "-t2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            "-c2:root-x86-64",
        ])
        .arg(&image));
    let mut bytes = fs::read(&image).expect("image");
    let esp_bytes = fs::read(&esp).expect("esp");
    bytes[(1 << 20)..(1 << 20) + esp_bytes.len()].copy_from_slice(&esp_bytes);
    fs::write(&image, bytes).expect("image");
    image
}

#[test]
fn a_disk_flashed_with_sovereign_flash_boots_under_uefi_and_holds_the_node_identity() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = stand_in_image(dir.path());
    let sovereign = workspace_binary("sovereign").expect("the sovereign binary");
    let cluster = dir.path().join("cluster");
    let key = dir.path().join("node-a.identity");
    run(Command::new(&sovereign)
        .args(["cluster", "init", "--name", "test", "--out"])
        .arg(&cluster));
    run(Command::new(&sovereign)
        .args(["node", "enroll", "--name", "node-a", "--cluster"])
        .arg(&cluster)
        .arg("--out")
        .arg(&key));
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(128 << 20))
        .expect("disk");
    let flashed = run(Command::new(&sovereign)
        .arg("flash")
        .arg("--image")
        .arg(&image)
        .arg("--device")
        .arg(&disk)
        .arg("--node")
        .arg(&key));
    assert!(flashed.contains("verified by read-back"), "{flashed}");
    let public = flashed
        .split_whitespace()
        .find(|w| w.starts_with("(ed25519:"))
        .map(|w| w.trim_matches(|c| c == '(' || c == ')').to_owned())
        .expect("the node's key in flash's summary");

    let mut node = Machine::new(MachineConfig::new(
        "node",
        Boot::Uefi { disk: disk.clone() },
    ))
    .expect("machine");
    let started = Instant::now();
    node.start().expect("start");
    node.wait_for_console("selftest: ready", Duration::from_secs(300))
        .expect("the flashed disk boots");
    eprintln!(
        "node: UEFI boot to ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let cmdline = node
        .succeed("cat /proc/cmdline", Duration::from_secs(30))
        .expect("cmdline");
    assert!(
        cmdline.contains("sovereign.selftest=uefi"),
        "booted the UKI: {cmdline}"
    );
    let interfaces = node
        .succeed("ls /sys/class/net", Duration::from_secs(30))
        .expect("net");
    assert_eq!(
        interfaces.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "no network device"
    );
    let name = node
        .succeed(
            "grep PARTNAME /sys/class/block/vda3/uevent",
            Duration::from_secs(30),
        )
        .expect("state partition");
    assert_eq!(name.trim(), "PARTNAME=sovereign-state");
    let node_pub = node
        .succeed(
            "mkdir -p /mnt && mount -t ext4 -o ro /dev/vda3 /mnt && cat /mnt/lib/sovereign/node/node.pub && stat -c %a /mnt/lib/sovereign/node/identity.pem",
            Duration::from_secs(60),
        )
        .expect("identity on the state partition");
    let lines: Vec<&str> = node_pub.lines().collect();
    assert_eq!(lines, [public.trim(), "600"]);
    node.send_console("n0 umount /mnt; poweroff -f\n")
        .expect("send");
    node.wait_for_shutdown(Duration::from_secs(60))
        .expect("powers off");
}
