//! Flashing to files and loop devices: the written disk's GPT, the state
//! partition's contents, and every refusal leaving the target untouched.
//! Loop-device cases need root (as the image build does).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use sovereign_identity::NodeIdentity;
use sovereign_provisioning::cluster::{Cluster, EnrollRequest};
use sovereign_provisioning::gpt::{self, Guid, SECTOR};
use sovereign_provisioning::state::{STATE_LABEL, VAR_PARTITION_TYPE};
use sovereign_provisioning::{flash, FlashError, FlashOptions, NoProgress, NodeFile};

fn run(command: &mut Command) -> String {
    let output = command.output().expect("tool runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A small GPT disk image shaped like a node image: ESP and root with random bytes.
fn make_image(dir: &Path) -> PathBuf {
    let image = dir.join("node.img");
    let file = fs::File::create(&image).expect("create image");
    file.set_len(40 << 20).expect("size image");
    run(Command::new("sgdisk")
        .args(["-n1:2048:+8M", "-t1:ef00", "-c1:esp"])
        .args([
            "-n2:0:+16M",
            "-t2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            "-c2:root",
        ])
        .arg(&image));
    let mut noise = vec![0u8; 20 << 20];
    let mut state = 0x9e3779b97f4a7c15u64;
    for byte in noise.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut bytes = fs::read(&image).expect("read image");
    bytes[(2 << 20)..(22 << 20)].copy_from_slice(&noise);
    fs::write(&image, bytes).expect("write image");
    image
}

/// An enrolled node identity file (a fresh cluster under `dir`).
fn make_key(dir: &Path) -> PathBuf {
    let mut cluster = Cluster::init(&dir.join("cluster"), "test", None).expect("cluster init");
    let identity = dir.join("node-a.identity");
    let request = EnrollRequest {
        name: "node-a".into(),
        days: 30,
        ..EnrollRequest::default()
    };
    cluster.enroll(&request, &identity).expect("enroll");
    identity
}

fn sparse_file(path: &Path, size: u64) {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create disk file");
}

fn digest(path: &Path) -> blake3::Hash {
    blake3::hash(&fs::read(path).expect("read"))
}

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut file = fs::File::open(path).expect("open");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    let mut bytes = vec![0u8; len as usize];
    file.read_exact(&mut bytes).expect("read range");
    bytes
}

fn options(image: &Path, device: &Path, key: &Path) -> FlashOptions {
    FlashOptions {
        image: image.to_owned(),
        device: device.to_owned(),
        identity: key.to_owned(),
        state_size: 32 << 20,
        node_files: Vec::new(),
    }
}

/// Checks a flashed disk: image partitions intact, backup GPT at the end, and a
/// state partition whose ext4 holds exactly this node's identity.
fn check_flashed(image: &Path, disk: &Path, key: &Path, disk_size: u64) {
    let image_table = gpt::read(&mut fs::File::open(image).expect("image")).expect("image GPT");
    let table = gpt::read(&mut fs::File::open(disk).expect("disk")).expect("disk GPT");
    assert_eq!(table.disk_guid, image_table.disk_guid);
    assert_eq!(
        table.backup_lba,
        disk_size / SECTOR - 1,
        "backup GPT moved to the end"
    );
    for part in &image_table.partitions {
        let flashed = table
            .partitions
            .iter()
            .find(|p| p.number == part.number)
            .expect("image partition kept");
        assert_eq!(flashed, part);
        assert_eq!(
            blake3::hash(&read_range(disk, part.offset(), part.len())),
            blake3::hash(&read_range(image, part.offset(), part.len())),
            "partition {} bytes",
            part.name
        );
    }
    let state = table.by_name(STATE_LABEL).expect("state partition");
    assert_eq!(state.number, 3);
    assert_eq!(
        state.type_guid,
        Guid::parse(VAR_PARTITION_TYPE).expect("guid")
    );
    assert_eq!(state.len(), 32 << 20);
    assert_eq!(state.first_lba % 2048, 0, "1 MiB aligned");
    assert!(state.offset() >= fs::metadata(image).expect("image").len());

    let dir = tempfile::tempdir().expect("temp dir");
    let fs_image = dir.path().join("state.ext4");
    fs::write(&fs_image, read_range(disk, state.offset(), state.len())).expect("extract");
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&fs_image));
    let label = run(Command::new("e2label").arg(&fs_image));
    assert_eq!(label.trim(), STATE_LABEL);
    let public = run(Command::new("debugfs")
        .args(["-R", "cat /lib/sovereign/node/node.pub"])
        .arg(&fs_image));
    let identity = NodeIdentity::load(key).expect("identity");
    let expected = sovereign_signing::PublicKey::from_bytes(
        &identity.signing_key().verifying_key().to_bytes(),
    )
    .expect("key");
    assert_eq!(public.trim(), expected.to_string());
    let hostname = run(Command::new("debugfs")
        .args(["-R", "cat /lib/sovereign/node/hostname"])
        .arg(&fs_image));
    assert_eq!(identity.name(), "node-a");
    assert_eq!(hostname, "node-a\n", "the node is named after its identity");
    let secret = run(Command::new("debugfs")
        .args(["-R", "cat /lib/sovereign/node/identity.pem"])
        .arg(&fs_image));
    assert_eq!(secret, fs::read_to_string(key).expect("identity text"));
    let chain = run(Command::new("debugfs")
        .args(["-R", "cat /lib/sovereign/node/cert.pem"])
        .arg(&fs_image));
    assert_eq!(
        chain,
        identity.chain_pem(),
        "the LAN API serves the node certificate"
    );
    for (file, mode) in [
        ("identity.pem", "0600"),
        ("key.pem", "0600"),
        ("node.age", "0600"),
    ] {
        let stat = run(Command::new("debugfs")
            .args(["-R", &format!("stat /lib/sovereign/node/{file}")])
            .arg(&fs_image));
        assert!(stat.contains(&format!("Mode:  {mode}")), "{file}: {stat}");
        assert!(stat.contains("User:     0"), "{stat}");
    }
}

#[test]
fn flashing_a_file_writes_the_image_moves_the_backup_gpt_and_adds_the_state_partition() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let disk = dir.path().join("disk");
    sparse_file(&disk, 128 << 20);
    let report = flash(&options(&image, &disk, &key), &NoProgress).expect("flash");
    assert_eq!(report.image_size, 40 << 20);
    assert_eq!(report.image_blake3, digest(&image).to_hex().to_string());
    assert_eq!(report.state_partition.name, STATE_LABEL);
    check_flashed(&image, &disk, &key, 128 << 20);
    run(Command::new("sgdisk").arg("-v").arg(&disk));
}

#[test]
fn flashing_the_same_node_twice_gives_identical_disks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    sparse_file(&first, 100 << 20);
    sparse_file(&second, 100 << 20);
    let a = flash(&options(&image, &first, &key), &NoProgress).expect("flash 1");
    let b = flash(&options(&image, &second, &key), &NoProgress).expect("flash 2");
    assert_eq!(
        a.state_partition, b.state_partition,
        "GUIDs derive from the node key"
    );
}

fn assert_refused(result: Result<sovereign_provisioning::FlashReport, FlashError>, needle: &str) {
    let error = result.expect_err("must be refused");
    assert!(error.to_string().contains(needle), "{error}");
}

#[test]
fn a_missing_node_key_is_refused_and_the_disk_is_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let disk = dir.path().join("disk");
    fs::write(&disk, vec![7u8; 100 << 20]).expect("disk");
    let before = digest(&disk);
    let missing = dir.path().join("nope.key");
    assert_refused(
        flash(&options(&image, &disk, &missing), &NoProgress),
        "nope.key",
    );
    assert_eq!(digest(&disk), before);
}

#[test]
fn a_bare_key_is_refused_with_a_pointer_to_enrollment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = dir.path().join("node.key");
    sovereign_signing::generate_signing_key(&key).expect("generate key");
    let disk = dir.path().join("disk");
    sparse_file(&disk, 100 << 20);
    let before = digest(&disk);
    assert_refused(
        flash(&options(&image, &disk, &key), &NoProgress),
        "sovereign node enroll",
    );
    assert_eq!(digest(&disk), before);
}

#[test]
fn a_node_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let disk = dir.path().join("disk");
    sparse_file(&disk, 100 << 20);
    let before = digest(&disk);
    assert_refused(
        flash(&options(&image, &disk, &key), &NoProgress),
        "chmod 600",
    );
    assert_eq!(digest(&disk), before);
}

#[test]
fn an_image_bigger_than_the_device_is_refused_and_the_disk_is_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let disk = dir.path().join("disk");
    fs::write(&disk, vec![7u8; 30 << 20]).expect("disk");
    let before = digest(&disk);
    assert_refused(
        flash(&options(&image, &disk, &key), &NoProgress),
        "but the image needs",
    );
    assert_eq!(digest(&disk), before);
    // Room for the image but not the state partition is refused too.
    let tight = dir.path().join("tight");
    fs::write(&tight, vec![7u8; 60 << 20]).expect("disk");
    assert_refused(
        flash(&options(&image, &tight, &key), &NoProgress),
        "state partition",
    );
    assert_eq!(fs::read(&tight).expect("tight"), vec![7u8; 60 << 20]);
}

#[test]
fn an_image_without_a_partition_table_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("raw.img");
    fs::write(&image, vec![1u8; 4 << 20]).expect("image");
    let key = make_key(dir.path());
    let disk = dir.path().join("disk");
    sparse_file(&disk, 100 << 20);
    assert_refused(
        flash(&options(&image, &disk, &key), &NoProgress),
        "not a GPT disk image",
    );
}

#[test]
fn the_image_itself_is_refused_as_a_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let before = digest(&image);
    assert_refused(
        flash(&options(&image, &image, &key), &NoProgress),
        "is the image itself",
    );
    assert_eq!(digest(&image), before);
}

/// A loop device over a file; detached on drop.
struct Loop {
    device: PathBuf,
}

impl Loop {
    fn attach(file: &Path, partitions: bool) -> Self {
        let mut command = Command::new("losetup");
        command.args(["--find", "--show"]);
        if partitions {
            command.arg("--partscan");
        }
        let out = run(command.arg(file));
        Self {
            device: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn a_mounted_loop_device_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let backing = dir.path().join("backing");
    sparse_file(&backing, 100 << 20);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing));
    let before = digest(&backing);
    let device = Loop::attach(&backing, false);
    let mount_point = dir.path().join("mnt");
    fs::create_dir(&mount_point).expect("mount point");
    run(Command::new("mount")
        .args(["-o", "ro"])
        .arg(&device.device)
        .arg(&mount_point));
    let result = flash(&options(&image, &device.device, &key), &NoProgress);
    run(Command::new("umount").arg(&mount_point));
    assert_refused(result, "is mounted");
    drop(device);
    assert_eq!(digest(&backing), before);
}

#[test]
fn a_partition_is_refused_and_the_whole_disk_is_asked_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let backing = dir.path().join("backing");
    fs::copy(&image, &backing).expect("copy");
    let device = Loop::attach(&backing, true);
    // Ask the kernel for the partitions explicitly (partscan alone can lag).
    let _ = Command::new("partx").arg("-a").arg(&device.device).status();
    // The kernel lists the partition in sysfs; without udev there may be no
    // /dev node, so make one in the temp dir from its device number.
    let name = device
        .device
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let sys_dev = PathBuf::from(format!("/sys/class/block/{name}/{name}p2/dev"));
    let mut numbers = String::new();
    for _ in 0..50 {
        if let Ok(text) = fs::read_to_string(&sys_dev) {
            numbers = text;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (major, minor) = numbers.trim().split_once(':').expect("partition in sysfs");
    let partition = dir.path().join("part2");
    run(Command::new("mknod")
        .arg(&partition)
        .args(["b", major, minor]));
    assert_refused(
        flash(&options(&image, &partition, &key), &NoProgress),
        "give the whole disk",
    );
}

#[test]
fn flashing_an_unmounted_loop_device_works_like_a_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let backing = dir.path().join("backing");
    sparse_file(&backing, 96 << 20);
    let device = Loop::attach(&backing, false);
    flash(&options(&image, &device.device, &key), &NoProgress).expect("flash a loop device");
    drop(device);
    check_flashed(&image, &backing, &key, 96 << 20);
}

#[test]
fn the_disk_holding_the_root_filesystem_is_refused() {
    // Only the read-only safety check runs here: never the write path.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root_source = mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            (fields.get(4) == Some(&"/")).then(|| fields.get(dash + 2).map(|s| s.to_string()))?
        })
        .next_back()
        .expect("a root mount");
    assert!(
        root_source.starts_with("/dev/"),
        "this test needs / on a block device, found {root_source}"
    );
    // The whole disk: strip a partition suffix through sysfs.
    let name = Path::new(&root_source)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let sys = fs::canonicalize(format!("/sys/class/block/{name}")).expect("sysfs entry");
    let disk_name = if sys.join("partition").exists() {
        sys.parent()
            .and_then(|p| p.file_name())
            .expect("parent disk")
            .to_string_lossy()
            .into_owned()
    } else {
        name
    };
    let disk = PathBuf::from(format!("/dev/{disk_name}"));
    let error = sovereign_provisioning::target::inspect(&disk).expect_err("root disk refused");
    assert!(
        error.to_string().contains("running system's disk"),
        "{error}"
    );
}

#[test]
fn node_credentials_land_on_the_state_partition_with_their_modes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());
    let key = make_key(dir.path());
    let age = dir.path().join("node.age");
    let recipient = sovereign_signing::generate_age_identity(&age).expect("age identity");
    let disk = dir.path().join("disk");
    sparse_file(&disk, 128 << 20);
    let mut opts = options(&image, &disk, &key);
    opts.node_files = vec![
        NodeFile {
            name: "node.age".into(),
            contents: fs::read(&age).expect("age"),
        },
        NodeFile {
            name: "api-keys".into(),
            contents: b"ops blake3:00\n".to_vec(),
        },
        NodeFile {
            name: "cert.pem".into(),
            contents: b"CERT\n".to_vec(),
        },
    ];
    let report = flash(&opts, &NoProgress).expect("flash");
    assert_eq!(
        report.age_recipient, recipient,
        "the given age identity is the node's"
    );
    let table = gpt::read(&mut fs::File::open(&disk).expect("disk")).expect("GPT");
    let state = table.by_name(STATE_LABEL).expect("state partition");
    let fs_image = dir.path().join("state.ext4");
    fs::write(&fs_image, read_range(&disk, state.offset(), state.len())).expect("extract");
    let debugfs = |request: &str| run(Command::new("debugfs").args(["-R", request]).arg(&fs_image));
    assert_eq!(
        debugfs("cat /lib/sovereign/node/api-keys"),
        "ops blake3:00\n"
    );
    assert_eq!(debugfs("cat /lib/sovereign/node/cert.pem"), "CERT\n");
    for (file, mode) in [
        ("node.age", "0600"),
        ("api-keys", "0600"),
        ("cert.pem", "0644"),
    ] {
        let stat = debugfs(&format!("stat /lib/sovereign/node/{file}"));
        assert!(stat.contains(&format!("Mode:  {mode}")), "{file}: {stat}");
    }

    // Without one, the node's age identity is the one enrolled in its identity file.
    let other = dir.path().join("other");
    sparse_file(&other, 128 << 20);
    let enrolled = flash(&options(&image, &other, &key), &NoProgress).expect("flash");
    let identity = NodeIdentity::load(&key).expect("identity");
    assert_eq!(
        enrolled.age_recipient,
        identity
            .age_identity()
            .expect("age")
            .to_public()
            .to_string()
    );
    assert_ne!(enrolled.age_recipient, recipient);
    let bad = FlashOptions {
        node_files: vec![NodeFile {
            name: "../escape".into(),
            contents: Vec::new(),
        }],
        ..options(&image, &other, &key)
    };
    let err = flash(&bad, &NoProgress).expect_err("not a node file name");
    assert!(err.to_string().contains("not a node file name"), "{err}");
}
