/*!
The node image builder. A spec (`image/node.toml`) becomes a bootable GPT
disk image: a cached Debian base root filesystem (mmdebstrap), the Sovereign
services with hardened units, the no-egress firewall and the network and
kernel hardening, packed read-only into erofs under dm-verity, booted by a
unified kernel image whose command line pins the verity root hash; beside it
a manifest signed by the build key, a package lock and a listing of the root.

The same inputs (spec, lock, binaries, trust files, epoch) give the same
image bytes. This crate installs the service binaries; it does not link them.
*/
#![deny(missing_docs)]

mod base;
mod build;
mod config;
mod disk;
mod error;
mod firewall;
mod lock;
mod manifest;
mod pe;
mod rootfs;
mod sources;
mod spec;
mod tool;
mod tree;
mod units;

pub use base::BASE_PACKAGES;
pub use build::{
    build, BuildReport, BuildRequest, Progress, IMAGE_FILE, LISTING_FILE, LOCK_FILE, MANIFEST_FILE,
};
pub use config::{
    fstab, lan_network, modules_load, ring_network, sysusers, thunderbolt_rule, tmpfiles,
    usb_authorize_rule, usb_rule, KERNEL_HARDENING, LAN_LINK_GROUP, PRELOAD_MODULES, SYSCTL,
    SYSTEM_CONF,
};
pub use disk::{kernel_cmdline, root_partition_uuids};
pub use error::{BuildError, VerifyError};
pub use firewall::{nftables_ruleset, RING_GROUP};
pub use lock::{Lock, Package};
pub use manifest::{signature_path, verify, Manifest};
pub use sources::{from_host, AptSource};
pub use spec::{ImageSpec, LanAddress, Network, Profile, Service, SpecError, Trust};
pub use tree::{listing, MASKED_ALWAYS, PRODUCTION_REMOVED};
pub use units::{
    firewall_audit_timer, firewall_audit_unit, hostname_unit, lock_modules_unit, stick_unit,
    unit_file, unit_name, AUDIT_SOCKET, CLUSTER_CA, COURIER_SOCKET, FIREWALL_AUDIT_TIMER,
    FIREWALL_AUDIT_UNIT, HOSTNAME_UNIT, LOCK_MODULES_UNIT, SPOOL_DIR, STICK_DIR,
    STICK_MOUNT_OPTIONS, STICK_UNIT, STORE_DIR, STORE_GROUP,
};

/// The default spec (`image/node.toml`).
pub const DEFAULT_SPEC: &str = include_str!("../node.toml");
