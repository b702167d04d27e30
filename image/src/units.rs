//! Hardened systemd units for the Sovereign services: each its own user, a
//! read-only system, no capabilities, a system call filter, and IP access
//! limited to what the service needs. Secrets reach a service as systemd
//! credentials (`LoadCredential=`), so no service user can read the node's
//! identity directory itself.

use crate::spec::{ImageSpec, LanAddress, Service};

/// The socket services use to reach the audit daemon.
pub const AUDIT_SOCKET: &str = "/run/sovereign-audit/audit.sock";
/// The node service's courier socket: the stick unit's courier step gathers
/// every ring member's checkpoint through it.
pub const COURIER_SOCKET: &str = "/run/sovereign-node/courier.sock";

/// Where the node's identity and credentials live (on the state partition).
pub const NODE_DIR: &str = "/var/lib/sovereign/node";

/// The model store on the state partition.
pub const STORE_DIR: &str = "/var/lib/sovereign/store";

/// Where the node keeps what it receives over the ring until it is verified.
pub const SPOOL_DIR: &str = "/var/lib/sovereign/store.spool";

/// The group of the model store's writers: the stick import and the node
/// (which imports what it receives over the ring).
pub const STORE_GROUP: &str = "sovereign-store";

/// The cluster CA certificate in the verified root (when the spec has one).
pub const CLUSTER_CA: &str = "/etc/sovereign/cluster-ca.pem";

/// Where sticks are mounted, one directory per block device.
pub const STICK_DIR: &str = "/run/sovereign/stick";

/// The template unit that mounts a stick read-only and runs the import on it
/// (instance: the block device name, `sda1`).
pub const STICK_UNIT: &str = "sovereign-stick@.service";

/// Who may record what over the audit socket: each service user of `spec`
/// only its own service name and event kinds (root: the firewall counters;
/// any listed user may ask for the courier checkpoint).
fn audit_allow(spec: &ImageSpec) -> String {
    let mut rules = String::from(" --allow root=firewall:drop-counters");
    for service in &spec.services {
        rules.push_str(match service {
            Service::Audit => "",
            Service::Import => " --allow sovereign-import=import:import,trust-rotation",
            Service::Api => {
                " --allow sovereign-api=api:api-request,api-refused,model-loaded \
                 --allow sovereign-api=node:ring-join,ring-leave,ring-plan,ring-replan,ring-refused \
                 --allow sovereign-api=replication:offer,receive,refused,no-room,relay-unopened \
                 --allow sovereign-api=import:import"
            }
        });
    }
    rules
}

/// The unit file name of a service.
pub fn unit_name(service: Service) -> &'static str {
    match service {
        Service::Audit => "sovereign-audit.service",
        Service::Import => "sovereign-import@.service",
        Service::Api => "sovereign-api.service",
    }
}

const HARDENING: &str = "\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateMounts=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077
DevicePolicy=closed
KeyringMode=private
NotifyAccess=none
IPAddressDeny=any
";

/// The unit file of `service` for `spec`.
pub fn unit_file(service: Service, spec: &ImageSpec) -> String {
    let (description, body, overrides) = match service {
        Service::Audit => (
            "Sovereign audit log",
            format!(
                "Type=simple\nUser=sovereign-audit\nGroup=sovereign-audit\nStateDirectory=sovereign/audit\nStateDirectoryMode=0700\n\
                 RuntimeDirectory=sovereign-audit\nRuntimeDirectoryMode=0750\n\
                 LoadCredential=identity.pem:{NODE_DIR}/identity.pem\n\
                 ExecStart=/usr/bin/sovereign-audit --log /var/lib/sovereign/audit --socket {AUDIT_SOCKET} --boot \
                 --identity %d/identity.pem{ca}{allow}\n\
                 Restart=always\nPrivateNetwork=yes\nRestrictAddressFamilies=AF_UNIX\n",
                allow = audit_allow(spec),
                // The enrolled key signs the log; an identity from another CA is refused.
                ca = if spec.trust.cluster_ca.is_empty() {
                    String::new()
                } else {
                    format!(" --cluster-ca {CLUSTER_CA}")
                }
            ),
            // The boot record reads the verity root hash from /proc/cmdline;
            // the daemon must see its clients' real user ids (SO_PEERCRED),
            // which a private user namespace would map to nobody.
            "ProcSubset=all\nPrivateUsers=no\n".to_owned(),
        ),
        Service::Import => (
            "Sovereign import from the stick %I",
            format!(
                "Type=oneshot\nUser=sovereign-import\nGroup=sovereign-import\n\
                 SupplementaryGroups=sovereign-audit {STORE_GROUP}\n\
                 ReadWritePaths={STORE_DIR}\nReadOnlyPaths={STICK_DIR}/%i\n\
                 LoadCredential=node.age:{NODE_DIR}/node.age\n\
                 ExecStart=/usr/bin/sovereign-import --store {STORE_DIR} --trust /etc/sovereign/node.trust \
                 --identity %d/node.age --audit-socket {AUDIT_SOCKET}{ca} --wait-secs 10800 {STICK_DIR}/%i\n\
                 TimeoutStartSec=6h\nMemoryMax=3G\n\
                 PrivateNetwork=yes\nRestrictAddressFamilies=AF_UNIX\n",
                // Revocation lists on a stick are checked against the image's CA.
                ca = if spec.trust.cluster_ca.is_empty() {
                    String::new()
                } else {
                    format!(" --cluster-ca {CLUSTER_CA}")
                }
            ),
            // The node, in the store's group, reads and writes what this service writes.
            "UMask=0007\n".to_owned(),
        ),
        Service::Api => {
            let lan = match spec.network.lan() {
                LanAddress::Static(cidr) => cidr,
                LanAddress::Dhcp => "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7".into(),
            };
            (
                "Sovereign node: the ring and the OpenAI-compatible API",
                format!(
                    "Type=simple\nUser=sovereign-api\nGroup=sovereign-api\n\
                     SupplementaryGroups=sovereign-audit {STORE_GROUP}\n\
                     ReadWritePaths={STORE_DIR}\nStateDirectory=sovereign/store.spool\nStateDirectoryMode=0700\n\
                     RuntimeDirectory=sovereign-node\nRuntimeDirectoryMode=0700\n\
                     LoadCredential=identity.pem:{NODE_DIR}/identity.pem\n\
                     LoadCredential=api-keys:{NODE_DIR}/api-keys\nLoadCredential=cert.pem:{NODE_DIR}/cert.pem\n\
                     LoadCredential=key.pem:{NODE_DIR}/key.pem\n\
                     ExecStart=/usr/bin/sovereign-node --identity %d/identity.pem --store {STORE_DIR} --spool {SPOOL_DIR} \
                     --trust /etc/sovereign/node.trust \
                     --ring-interface {ring} --ring-port {ring_port} --api-listen [::]:{port} \
                     --keys %d/api-keys --tls-cert %d/cert.pem --tls-key %d/key.pem --audit-socket {AUDIT_SOCKET} \
                     --courier-socket {COURIER_SOCKET}\n\
                     Restart=on-failure\nRestartSec=5\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
                     LimitNOFILE=4096\n\
                     IPAddressAllow=localhost link-local multicast {lan}\n",
                    port = spec.network.api_port,
                    ring = spec.network.ring_match,
                    ring_port = spec.network.ring_port,
                ),
                // The stick import, in the store's group, reads and writes what this service writes.
                "UMask=0007\n".to_owned(),
            )
        }
    };
    let unit = match service {
        Service::Audit => String::new(),
        // Without its identity, API keys and certificate the node cannot join a
        // ring or serve; without a model it still runs (answering 503) and
        // receives one over the ring.
        Service::Api => format!(
            "After=sovereign-audit.service systemd-tmpfiles-setup.service\nRequires=sovereign-audit.service\n\
             ConditionPathExists={NODE_DIR}/api-keys\nConditionPathExists={NODE_DIR}/cert.pem\n\
             ConditionPathExists={NODE_DIR}/key.pem\nConditionPathExists={NODE_DIR}/identity.pem\n"
        ),
        Service::Import => {
            "After=sovereign-audit.service\nRequires=sovereign-audit.service\n".to_owned()
        }
    };
    let install = if service == Service::Import {
        ""
    } else {
        "\n[Install]\nWantedBy=multi-user.target\n"
    };
    format!(
        "# Generated by sovereign-image.\n[Unit]\nDescription={description}\n{unit}\n[Service]\n{body}{HARDENING}{overrides}{install}"
    )
}

/// The mount options of a stick, read-only and for the courier's read-write
/// step alike: no set-id programs, no device nodes, nothing executed, no
/// symbolic link followed (a link on a stick to `/dev/zero` or to a file of
/// the node is never read through), and files readable by the import's user.
pub const STICK_MOUNT_OPTIONS: &str = "nosuid,nodev,noexec,nosymfollow,umask=0022";

/// The stick unit: runs as root only to mount the stick (FAT32 or exFAT
/// only, [`STICK_MOUNT_OPTIONS`], read-only) and to start the unprivileged
/// import on it (the node service notices a new model itself: no restart,
/// so no answer in flight is cut). Whatever the
/// import's outcome, the stick then becomes the auditor's courier: remounted
/// read-write for one step, it gets the newest signed checkpoint and the
/// consistency proof from the one it carried (in the folder named after the
/// node, see [`hostname_unit`]), and through the node service every other
/// reachable ring member's ([`COURIER_SOCKET`]); then it is unmounted.
pub fn stick_unit() -> String {
    let mount = format!("{STICK_DIR}/%i");
    format!(
        "# Generated by sovereign-image.\n[Unit]\nDescription=Sovereign USB stick %I\n\
         BindsTo=dev-%i.device\nAfter=dev-%i.device sovereign-audit.service\n\n\
         [Service]\nType=oneshot\nSupplementaryGroups=sovereign-audit\n\
         TimeoutStartSec=7h\nMemoryMax=256M\n\
         ExecStart=/usr/bin/mkdir -p {mount}\n\
         ExecStart=/usr/bin/mount -t vfat,exfat -o {STICK_MOUNT_OPTIONS},ro /dev/%i {mount}\n\
         ExecStart=/usr/bin/systemctl start sovereign-import@%i.service\n\
         ExecStopPost=-/usr/bin/mount -o remount,{STICK_MOUNT_OPTIONS},rw {mount}\n\
         ExecStopPost=-/usr/bin/sovereign-auditctl --socket {AUDIT_SOCKET} courier --ring {COURIER_SOCKET} {mount}\n\
         ExecStopPost=-/usr/bin/umount {mount}\n\
         ExecStopPost=-/usr/bin/rmdir {mount}\n\
         PrivateNetwork=yes\nIPAddressDeny=any\nNoNewPrivileges=yes\n\
         CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE\nRestrictAddressFamilies=AF_UNIX\n\
         # No mount namespace: the mount must be the one the import unit sees.\n\
         ProtectHostname=yes\nRestrictNamespaces=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n\
         LockPersonality=yes\nMemoryDenyWriteExecute=yes\nSystemCallArchitectures=native\n\
         SystemCallFilter=@system-service @mount\nSystemCallErrorNumber=EPERM\nUMask=0022\n"
    )
}

/// The one-shot unit that records the firewall's drop counters.
pub const FIREWALL_AUDIT_UNIT: &str = "sovereign-firewall-audit.service";

/// Its timer: a minute after boot, then every five minutes.
pub const FIREWALL_AUDIT_TIMER: &str = "sovereign-firewall-audit.timer";

/// Runs `sovereign-auditctl firewall-counters` as root with only CAP_NET_ADMIN (what
/// reading nftables counters needs), no network, a read-only system.
pub fn firewall_audit_unit() -> String {
    format!(
        "# Generated by sovereign-image.\n[Unit]\nDescription=Sovereign: record the firewall's drop counters\n\
         After=sovereign-audit.service nftables.service\nRequires=sovereign-audit.service\n\n\
         [Service]\nType=oneshot\nSupplementaryGroups=sovereign-audit\nExecStart=/usr/bin/sovereign-auditctl --socket {AUDIT_SOCKET} firewall-counters --nft /usr/sbin/nft\n\
         CapabilityBoundingSet=CAP_NET_ADMIN\nAmbientCapabilities=\nNoNewPrivileges=yes\nProtectSystem=strict\n\
         ProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\nProtectKernelModules=yes\nProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\nProtectClock=yes\nProtectHostname=yes\nRestrictNamespaces=yes\nRestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\nLockPersonality=yes\nMemoryDenyWriteExecute=yes\nSystemCallArchitectures=native\n\
         RestrictAddressFamilies=AF_UNIX AF_NETLINK\nIPAddressDeny=any\nUMask=0077\n"
    )
}

/// The timer of [`firewall_audit_unit`].
pub fn firewall_audit_timer() -> String {
    "# Generated by sovereign-image.\n[Unit]\nDescription=Sovereign: record the firewall's drop counters regularly\n\n\
     [Timer]\nOnBootSec=1min\nOnUnitActiveSec=5min\nAccuracySec=10s\n\n[Install]\nWantedBy=timers.target\n"
        .to_owned()
}

/// The unit that names the node after its enrolled identity: `sovereign
/// flash` writes the identity's name beside it on the state partition, and
/// this sets the host name from it before anything else starts, so two
/// nodes' courier folders on one stick never collide. (Units name the node
/// at run time, never with `%H`, which systemd expands when it loads units,
/// before this ran.)
pub const HOSTNAME_UNIT: &str = "sovereign-hostname.service";

/// The text of [`HOSTNAME_UNIT`]: root with only CAP_SYS_ADMIN (what
/// `sethostname` needs), no network, a read-only system; in the host's UTS
/// namespace, by design.
pub fn hostname_unit() -> String {
    format!(
        "# Generated by sovereign-image.\n[Unit]\nDescription=Sovereign: name the node after its enrolled identity\n\
         DefaultDependencies=no\nRequiresMountsFor={NODE_DIR}\nConflicts=shutdown.target\n\
         Before=sysinit.target shutdown.target systemd-networkd.service sovereign-audit.service\n\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/hostname --file {NODE_DIR}/hostname\n\
         CapabilityBoundingSet=CAP_SYS_ADMIN\nAmbientCapabilities=\nNoNewPrivileges=yes\nProtectSystem=strict\n\
         ProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\nPrivateNetwork=yes\nIPAddressDeny=any\n\
         ProtectKernelModules=yes\nProtectKernelLogs=yes\nProtectKernelTunables=yes\nProtectControlGroups=yes\n\
         ProtectClock=yes\nRestrictNamespaces=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\nSystemCallArchitectures=native\nRestrictAddressFamilies=AF_UNIX\nUMask=0077\n\n\
         [Install]\nWantedBy=sysinit.target\n"
    )
}

/// The unit that forbids loading kernel modules once the node is up
/// (`kernel.modules_disabled=1`, which only a reboot undoes): a hostile
/// device plugged in later cannot pull in a driver the node did not load
/// at boot. What sticks and Thunderbolt cables need is preloaded
/// ([`crate::PRELOAD_MODULES`]); the devices present at boot get their
/// drivers first (the udev queue is drained before the lock).
pub const LOCK_MODULES_UNIT: &str = "sovereign-lock-modules.service";

/// The text of [`LOCK_MODULES_UNIT`]: root without any capability (the
/// sysctl is root's file), no network, a read-only system but `/proc/sys`.
pub fn lock_modules_unit() -> String {
    "# Generated by sovereign-image.\n[Unit]\nDescription=Sovereign: no kernel module loads after boot\n\
     After=multi-user.target systemd-modules-load.service systemd-udev-trigger.service nftables.service systemd-networkd.service\n\n\
     [Service]\nType=oneshot\nRemainAfterExit=yes\n\
     ExecStart=/usr/bin/udevadm settle --timeout=120\n\
     ExecStart=/usr/bin/sh -c 'echo 1 > /proc/sys/kernel/modules_disabled'\n\
     CapabilityBoundingSet=\nAmbientCapabilities=\nNoNewPrivileges=yes\nProtectSystem=strict\n\
     ProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\nPrivateNetwork=yes\nIPAddressDeny=any\n\
     ProtectKernelModules=yes\nProtectKernelLogs=yes\nProtectControlGroups=yes\nProtectClock=yes\nProtectHostname=yes\n\
     RestrictNamespaces=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes\n\
     MemoryDenyWriteExecute=yes\nSystemCallArchitectures=native\n\
     RestrictAddressFamilies=AF_UNIX AF_NETLINK\nUMask=0077\n\n\
     [Install]\nWantedBy=multi-user.target\n"
        .to_owned()
}
