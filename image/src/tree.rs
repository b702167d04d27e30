//! The node's root tree: the cached base unpacked, then the Sovereign
//! binaries, units, firewall, network, hardening and trust files put in, the
//! profile applied (production: every login path masked, no package manager;
//! test: the VM test agent), and the kernel and initramfs taken out for the
//! unified kernel image.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::base::Base;
use crate::config;
use crate::error::BuildError;
use crate::firewall::nftables_ruleset;
use crate::spec::{ImageSpec, Profile, Service};
use crate::tool;
use crate::units::{
    firewall_audit_timer, firewall_audit_unit, hostname_unit, lock_modules_unit, stick_unit,
    unit_file, unit_name, CLUSTER_CA, FIREWALL_AUDIT_TIMER, FIREWALL_AUDIT_UNIT, HOSTNAME_UNIT,
    LOCK_MODULES_UNIT, STICK_UNIT,
};

const TEST_AGENT: &str = include_str!("../../vm-tests/agent/sovereign-test-agent");
const TEST_AGENT_UNIT: &str = include_str!("../../vm-tests/agent/sovereign-test-agent.service");
const TEST_NETWORK: [(&str, &str); 3] = [
    (
        "10-sovereign-test-thunderbolt0.link",
        include_str!("../../vm-tests/agent/10-sovereign-test-thunderbolt0.link"),
    ),
    (
        "10-sovereign-test-thunderbolt1.link",
        include_str!("../../vm-tests/agent/10-sovereign-test-thunderbolt1.link"),
    ),
    (
        "05-sovereign-test-sink.network",
        include_str!("../../vm-tests/agent/05-sovereign-test-sink.network"),
    ),
];

/// Units masked in every image: login prompts, first-boot questions, and
/// Ctrl-Alt-Del (a keyboard cannot reboot a node).
pub const MASKED_ALWAYS: &[&str] = &[
    "ctrl-alt-del.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "autovt@.service",
    "getty-static.service",
    "debug-shell.service",
    "systemd-firstboot.service",
    "dpkg-db-backup.timer",
];

/// Programs removed from production images: package management.
pub const PRODUCTION_REMOVED: &[&str] = &[
    "usr/bin/dpkg",
    "usr/bin/dpkg-deb",
    "usr/bin/dpkg-divert",
    "usr/bin/dpkg-maintscript-helper",
    "usr/bin/dpkg-query",
    "usr/bin/dpkg-realpath",
    "usr/bin/dpkg-split",
    "usr/bin/dpkg-statoverride",
    "usr/bin/dpkg-trigger",
    "usr/sbin/dpkg-preconfigure",
    "usr/sbin/dpkg-reconfigure",
];

/// The files a build puts into the tree beyond the base.
pub struct TreeInputs<'a> {
    /// The spec.
    pub spec: &'a ImageSpec,
    /// The service binaries to install in `/usr/bin`: name and bytes.
    pub binaries: &'a [(&'static str, Vec<u8>)],
    /// The bundle trust file's bytes.
    pub bundle_trust: &'a [u8],
    /// The cluster CA public key's bytes, if the spec names one.
    pub cluster_ca: Option<&'a [u8]>,
    /// The image version (`IMAGE_VERSION` in os-release).
    pub version: &'a str,
    /// SOURCE_DATE_EPOCH.
    pub epoch: u64,
}

/// The assembled tree and what was taken out of it.
pub struct Tree {
    /// The root directory.
    pub root: PathBuf,
    /// The kernel.
    pub vmlinuz: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The os-release text (for the UKI's `.osrel`).
    pub os_release: String,
}

/// The binaries of a service.
pub fn binary_names(service: Service) -> &'static [&'static str] {
    match service {
        Service::Audit => &["sovereign-audit", "sovereign-auditctl"],
        Service::Import => &["sovereign-import"],
        Service::Api => &["sovereign-node"],
    }
}

/// Writes `contents` to `path` under `root` with `mode`, creating its
/// directories and replacing whatever was there.
pub(crate) fn put(root: &Path, path: &str, contents: &[u8], mode: u32) -> Result<(), BuildError> {
    let target = root.join(path.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .map_err(BuildError::io(format!("creating {}", parent.display())))?;
    }
    let _ = fs::remove_file(&target);
    fs::write(&target, contents)
        .map_err(BuildError::io(format!("writing {}", target.display())))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))
        .map_err(BuildError::io(format!("chmod {}", target.display())))
}

fn systemctl(root: &Path, verb: &str, units: &[&str], epoch: u64) -> Result<(), BuildError> {
    if units.is_empty() {
        return Ok(());
    }
    tool::run(
        Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .arg("--quiet")
            .arg(verb)
            .args(units),
        epoch,
    )
    .map(|_| ())
}

/// Unpacks `base` into `work/root` and makes it a Sovereign node's tree.
pub fn assemble(base: &Base, inputs: &TreeInputs, work: &Path) -> Result<Tree, BuildError> {
    let spec = inputs.spec;
    let epoch = inputs.epoch;
    let root = work.join("root");
    fs::create_dir_all(&root).map_err(BuildError::io(format!("creating {}", root.display())))?;
    tool::run(
        Command::new("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--same-permissions",
                "--xattrs",
                "--xattrs-include=*",
            ])
            .arg("--file")
            .arg(&base.tar)
            .arg("--directory")
            .arg(&root),
        epoch,
    )?;

    // The kernel and initramfs go into the unified kernel image, not the root.
    let kernel = &base.kernel;
    let vmlinuz = work.join("vmlinuz");
    let initrd = work.join("initrd.img");
    for (from, to) in [
        (format!("boot/vmlinuz-{kernel}"), &vmlinuz),
        (format!("boot/initrd.img-{kernel}"), &initrd),
    ] {
        fs::rename(root.join(&from), to)
            .map_err(BuildError::io(format!("taking {from} out of the root")))?;
    }
    for entry in fs::read_dir(root.join("boot"))
        .map_err(BuildError::io("reading /boot"))?
        .flatten()
    {
        let _ = fs::remove_file(entry.path());
    }
    for link in ["vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"] {
        let _ = fs::remove_file(root.join(link));
    }
    // Nothing of the build host stays; /var is the state partition on a node.
    for leftover in ["var/cache/apt", "var/log/apt", "var/lib/apt"] {
        let _ = fs::remove_dir_all(root.join(leftover));
    }

    // Identity of the image; no host name, DNS or machine id of the build host.
    // The node's name comes from its enrolled identity at boot (HOSTNAME_UNIT).
    let _ = fs::remove_file(root.join("etc/hostname"));
    put(&root, "etc/resolv.conf", b"", 0o644)?;
    put(&root, "etc/machine-id", b"", 0o444)?;
    let mut os_release = fs::read_to_string(root.join("usr/lib/os-release"))
        .map_err(BuildError::io("reading usr/lib/os-release"))?;
    let profile = match spec.profile {
        Profile::Production => "production",
        Profile::Test => "test",
    };
    let _ = write!(
        os_release,
        "IMAGE_ID=sovereign-node\nIMAGE_VERSION={}\nSOVEREIGN_PROFILE={profile}\n",
        inputs.version
    );
    put(&root, "usr/lib/os-release", os_release.as_bytes(), 0o644)?;

    // The services: binaries, users, units.
    for (name, bytes) in inputs.binaries {
        put(&root, &format!("usr/bin/{name}"), bytes, 0o755)?;
        // Debug information has no place on a node (and makes dev builds huge).
        tool::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(root.join(format!("usr/bin/{name}"))),
            epoch,
        )?;
    }
    for service in &spec.services {
        put(
            &root,
            &format!("usr/lib/systemd/system/{}", unit_name(*service)),
            unit_file(*service, spec).as_bytes(),
            0o644,
        )?;
    }
    if spec.services.contains(&Service::Audit) {
        for (name, text) in [
            (FIREWALL_AUDIT_UNIT, firewall_audit_unit()),
            (FIREWALL_AUDIT_TIMER, firewall_audit_timer()),
        ] {
            put(
                &root,
                &format!("usr/lib/systemd/system/{name}"),
                text.as_bytes(),
                0o644,
            )?;
        }
    }
    if spec.services.contains(&Service::Import) {
        put(
            &root,
            &format!("usr/lib/systemd/system/{STICK_UNIT}"),
            stick_unit().as_bytes(),
            0o644,
        )?;
        put(
            &root,
            "usr/lib/udev/rules.d/90-sovereign-usb.rules",
            config::usb_rule().as_bytes(),
            0o644,
        )?;
    }
    put(
        &root,
        &format!("usr/lib/systemd/system/{HOSTNAME_UNIT}"),
        hostname_unit().as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/systemd/system.conf.d/90-sovereign.conf",
        config::SYSTEM_CONF.as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/udev/rules.d/89-sovereign-usb-authorize.rules",
        config::usb_authorize_rule().as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/modules-load.d/sovereign.conf",
        config::modules_load().as_bytes(),
        0o644,
    )?;
    put(
        &root,
        &format!("usr/lib/systemd/system/{LOCK_MODULES_UNIT}"),
        lock_modules_unit().as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/udev/rules.d/91-sovereign-thunderbolt.rules",
        config::thunderbolt_rule().as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/sysusers.d/sovereign.conf",
        config::sysusers(spec).as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/tmpfiles.d/sovereign.conf",
        config::tmpfiles().as_bytes(),
        0o644,
    )?;
    tool::run(
        Command::new("systemd-sysusers").arg(format!("--root={}", root.display())),
        epoch,
    )?;
    pin_password_ages(&root, epoch)?;

    // Trust, firewall, network, hardening, mounts.
    put(
        &root,
        "etc/sovereign/node.trust",
        inputs.bundle_trust,
        0o644,
    )?;
    if let Some(ca) = inputs.cluster_ca {
        put(&root, CLUSTER_CA.trim_start_matches('/'), ca, 0o644)?;
    }
    put(
        &root,
        "etc/nftables.conf",
        nftables_ruleset(spec).as_bytes(),
        0o755,
    )?;
    put(
        &root,
        "etc/systemd/network/10-sovereign-ring.network",
        config::ring_network(spec).as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "etc/systemd/network/20-sovereign-lan.network",
        config::lan_network(spec).as_bytes(),
        0o644,
    )?;
    put(
        &root,
        "usr/lib/sysctl.d/90-sovereign.conf",
        config::SYSCTL.as_bytes(),
        0o644,
    )?;
    put(&root, "etc/fstab", config::fstab().as_bytes(), 0o644)?;
    put(
        &root,
        "usr/lib/repart.d/50-sovereign-state.conf",
        config::REPART_STATE.as_bytes(),
        0o644,
    )?;

    let mut enable = vec![
        "nftables.service",
        "systemd-networkd.service",
        HOSTNAME_UNIT,
        LOCK_MODULES_UNIT,
    ];
    for service in &spec.services {
        if *service != Service::Import {
            enable.push(unit_name(*service));
        }
    }
    if spec.services.contains(&Service::Audit) {
        enable.push(FIREWALL_AUDIT_TIMER);
    }
    systemctl(&root, "enable", &enable, epoch)?;
    systemctl(
        &root,
        "disable",
        &[
            "getty@tty1.service",
            "e2scrub_all.timer",
            "e2scrub_reap.service",
        ],
        epoch,
    )?;
    systemctl(&root, "mask", MASKED_ALWAYS, epoch)?;

    match spec.profile {
        Profile::Production => {
            for path in PRODUCTION_REMOVED {
                let _ = fs::remove_file(root.join(path));
            }
        }
        Profile::Test => {
            put(
                &root,
                "usr/local/sbin/sovereign-test-agent",
                TEST_AGENT.as_bytes(),
                0o755,
            )?;
            put(
                &root,
                "usr/lib/systemd/system/sovereign-test-agent.service",
                TEST_AGENT_UNIT.as_bytes(),
                0o644,
            )?;
            for (name, text) in TEST_NETWORK {
                put(
                    &root,
                    &format!("etc/systemd/network/{name}"),
                    text.as_bytes(),
                    0o644,
                )?;
            }
            systemctl(&root, "enable", &["sovereign-test-agent.service"], epoch)?;
        }
    }
    Ok(Tree {
        root,
        vmlinuz,
        initrd,
        os_release,
    })
}

/// Sets the "last password change" of every account to the build's epoch
/// (systemd-sysusers writes today's date) and drops the backup copies, so
/// the account files are the same on every build day. No account has a password.
fn pin_password_ages(root: &Path, epoch: u64) -> Result<(), BuildError> {
    let path = root.join("etc/shadow");
    let text = fs::read_to_string(&path).map_err(BuildError::io("reading etc/shadow"))?;
    let day = (epoch / 86_400).to_string();
    let mut out = String::new();
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 2 && !fields[2].is_empty() {
            fields[2] = &day;
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    // Rewritten in place: the file keeps its owner (root:shadow) and mode.
    fs::write(&path, out).map_err(BuildError::io("writing etc/shadow"))?;
    for backup in ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"] {
        let _ = fs::remove_file(root.join(backup));
    }
    Ok(())
}

/// A listing of every path in `root`, sorted: `mode uid gid size path`, then
/// `-> target` for links or the BLAKE3 of a regular file's bytes. It is the
/// image's table of contents in the build output and what tests compare.
pub fn listing(root: &Path) -> Result<String, BuildError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), BuildError> {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(BuildError::io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path)
                .map_err(BuildError::io(format!("stat {}", path.display())))?;
            let relative = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
            let kind = meta.file_type();
            let detail = if kind.is_symlink() {
                let target = fs::read_link(&path)
                    .map_err(BuildError::io(format!("readlink {}", path.display())))?;
                format!("-> {}", target.display())
            } else if kind.is_file() {
                let mut file = fs::File::open(&path)
                    .map_err(BuildError::io(format!("opening {}", path.display())))?;
                let mut hasher = blake3::Hasher::new();
                hasher
                    .update_reader(&mut file)
                    .map_err(BuildError::io(format!("reading {}", path.display())))?;
                hasher.finalize().to_hex().to_string()
            } else {
                String::new()
            };
            let line = format!(
                "{:06o} {} {} {} {relative} {detail}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                if kind.is_file() { meta.size() } else { 0 },
            );
            out.push((relative, line.trim_end().to_owned()));
            if kind.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut lines = Vec::new();
    walk(root, root, &mut lines)?;
    lines.sort();
    Ok(lines.into_iter().map(|(_, l)| l + "\n").collect())
}
