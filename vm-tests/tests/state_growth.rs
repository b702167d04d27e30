//! The state partition's first-boot growth, with the files the image installs
//! (`provisioning/files/repart.d/50-sovereign-state.conf`, growfs on mount):
//! a disk flashed with a small state partition, attached to a systemd guest,
//! ends with the partition and its ext4 filling the disk and the node identity
//! intact.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sovereign_identity::NodeIdentity;
use sovereign_provisioning::cluster::{Cluster, EnrollRequest};
use sovereign_provisioning::gpt::{self, SECTOR};
use sovereign_provisioning::{flash, FlashOptions, NoProgress};
use sovereign_vm_tests::{host_tool, Boot, Machine, MachineConfig};

/// Runs a host tool, failing the test with its output if it fails.
fn run(command: &mut Command) -> String {
    host_tool(command).unwrap_or_else(|e| panic!("{e}"))
}

const CMD: Duration = Duration::from_secs(120);

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

fn small_image(dir: &Path) -> PathBuf {
    let image = dir.join("node.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(24 << 20))
        .expect("image");
    run(Command::new("sgdisk")
        .args([
            "-n1:2048:+8M",
            "-t1:ef00",
            "-c1:esp",
            "-n2:0:+8M",
            "-c2:root",
        ])
        .arg(&image));
    image
}

#[test]
fn first_boot_grows_the_state_partition_and_its_filesystem_to_the_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = small_image(dir.path());
    let mut cluster =
        Cluster::init(&dir.path().join("cluster"), "test", None).expect("cluster init");
    let key = dir.path().join("node-a.identity");
    let request = EnrollRequest {
        name: "node-a".into(),
        days: 30,
        ..EnrollRequest::default()
    };
    cluster.enroll(&request, &key).expect("enroll");
    let public = sovereign_signing::PublicKey::from_bytes(
        &NodeIdentity::load(&key)
            .expect("identity")
            .signing_key()
            .verifying_key()
            .to_bytes(),
    )
    .expect("key");
    let disk = dir.path().join("disk.img");
    let disk_size: u64 = 512 << 20;
    fs::File::create(&disk)
        .and_then(|f| f.set_len(disk_size))
        .expect("disk");
    flash(
        &FlashOptions {
            image,
            device: disk.clone(),
            identity: key,
            state_size: 32 << 20,
            node_files: Vec::new(),
        },
        &NoProgress,
    )
    .expect("flash");

    let guest = script("selftest-payload");
    let rootfs = script("selftest-rootfs");
    let root = dir.path().join("root.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(rootfs.join("root.img"))
        .arg(&root));
    let mut node = Machine::new(
        MachineConfig::new(
            "node",
            Boot::Kernel {
                kernel: guest.join("vmlinuz"),
                initrd: guest.join("initrd.img"),
                append: "console=ttyS0 panic=-1 sovereign.selftest.root=/dev/vda".into(),
                disk: Some(root),
            },
        )
        .disk(disk.clone()),
    )
    .expect("machine");
    node.start().expect("start");
    node.wait_for_console("sovereign-test-agent: ready", Duration::from_secs(300))
        .expect("agent");
    node.wait_for_unit("multi-user.target", CMD)
        .expect("multi-user");

    let conf = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../provisioning/files/repart.d/50-sovereign-state.conf"
    ))
    .expect("repart definition");
    // dash's printf knows octal escapes only.
    let encoded: String = conf.bytes().map(|b| format!("\\{b:03o}")).collect();
    node.succeed(
        &format!(
            "mkdir -p /run/repart.d && printf '{encoded}' > /run/repart.d/50-sovereign-state.conf"
        ),
        CMD,
    )
    .expect("install the definition");
    node.succeed(
        "systemd-repart --dry-run=no --definitions=/run/repart.d /dev/vdb",
        CMD,
    )
    .expect("systemd-repart grows the partition");
    let identity = node
        .succeed(
            "udevadm settle; mkdir -p /mnt/state && mount /dev/disk/by-partlabel/sovereign-state /mnt/state && /lib/systemd/systemd-growfs /mnt/state && cat /mnt/state/lib/sovereign/node/node.pub && umount /mnt/state",
            CMD,
        )
        .expect("grow the filesystem");
    assert!(
        identity.contains(&public.to_string()),
        "identity kept: {identity}"
    );
    node.shutdown(CMD).expect("power off");

    let table = gpt::read(&mut fs::File::open(&disk).expect("disk")).expect("GPT");
    let state = table.by_name("sovereign-state").expect("state partition");
    assert!(
        state.last_lba + 2048 > table.last_usable_lba && state.last_lba <= table.last_usable_lba,
        "partition ends at {} of {} usable",
        state.last_lba,
        table.last_usable_lba
    );
    assert_eq!(table.backup_lba, disk_size / SECTOR - 1);
    let fs_image = dir.path().join("state.ext4");
    let mut bytes = vec![0u8; state.len() as usize];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = fs::File::open(&disk).expect("disk");
        file.seek(SeekFrom::Start(state.offset())).expect("seek");
        file.read_exact(&mut bytes).expect("read");
    }
    fs::write(&fs_image, bytes).expect("extract");
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&fs_image));
    let header = run(Command::new("dumpe2fs").arg("-h").arg(&fs_image));
    let blocks: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block count");
    assert!(
        blocks * 4096 + (4 << 20) >= state.len() && blocks * 4096 <= state.len(),
        "filesystem {} bytes in a {} byte partition",
        blocks * 4096,
        state.len()
    );
    assert!(
        state.len() > 400 << 20,
        "grown from 32 MiB: {}",
        state.len()
    );
}
