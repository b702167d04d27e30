/*!
`Machine`: one role-named QEMU guest with its own temp dir, serial console,
QMP monitor, optional point-to-point ring links and a USB controller for
sticks. Killed and cleaned up on drop.

Network: never a host network device. Only `-nic none` plus, per ring link, a
`virtio-net-pci` NIC on `-netdev dgram` over unix sockets in the link's temp
dir. NIC `i` sits at PCI slot `0x10 + i` with MAC `52:54:00:5b:MM:0i`; the test
profile image names the NIC in slot `0x10 + i` `thunderbolt<i>` (a systemd
`.link` file matching `Path=pci-0000:00:1i.0`), so guests see ring interfaces.
*/

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::json;

use crate::error::VmError;
use crate::qmp::Qmp;

/// OVMF firmware code (read-only) as Debian's `ovmf` package installs it.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variable store template; each machine boots from its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation; works everywhere (the default).
    Tcg,
    /// Hardware virtualisation; only where a probe boot showed it works.
    Kvm,
}

impl Accel {
    /// `SOVEREIGN_VM_ACCEL=kvm` selects KVM; anything else (or nothing) TCG.
    /// On the project's machines `/dev/kvm` exists but KVM guests hang, so KVM
    /// is opt-in; [`probe_kvm`] checks a machine before relying on it.
    pub fn from_env() -> Self {
        match std::env::var("SOVEREIGN_VM_ACCEL").as_deref() {
            Ok("kvm") => Self::Kvm,
            _ => Self::Tcg,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Tcg => "tcg",
            Self::Kvm => "kvm",
        }
    }
}

/// What a machine boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// UEFI (OVMF) from a raw GPT disk image attached as a virtio disk; the
    /// guest writes to the file (first boot grows the state partition).
    Uefi {
        /// The disk image, e.g. a file `sovereign flash` wrote.
        disk: PathBuf,
    },
    /// Direct kernel boot (development and the driver's self-test).
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs.
        initrd: PathBuf,
        /// The kernel command line.
        append: String,
        /// An optional raw disk attached as a virtio disk.
        disk: Option<PathBuf>,
    },
}

/// One end of a point-to-point link; give it to exactly one machine.
#[derive(Debug, Clone)]
pub struct LinkEnd {
    pub(crate) local: PathBuf,
    pub(crate) remote: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

/// A point-to-point Ethernet link between two machines (a ring cable): two
/// unix datagram sockets, never a host interface.
pub struct Link {
    dir: Arc<tempfile::TempDir>,
}

impl Link {
    /// A new link with its socket directory.
    pub fn new() -> Result<Self, VmError> {
        let dir = tempfile::Builder::new()
            .prefix("sovereign-link-")
            .tempdir()
            .map_err(|source| VmError::Io {
                what: "creating a link dir".into(),
                source,
            })?;
        Ok(Self { dir: Arc::new(dir) })
    }

    /// The two ends, `(a, b)`.
    pub fn ends(&self) -> (LinkEnd, LinkEnd) {
        let a = self.dir.path().join("a.sock");
        let b = self.dir.path().join("b.sock");
        (
            LinkEnd {
                local: a.clone(),
                remote: b.clone(),
                _dir: self.dir.clone(),
            },
            LinkEnd {
                local: b,
                remote: a,
                _dir: self.dir.clone(),
            },
        )
    }
}

/// A machine's configuration; [`Machine::new`] turns it into a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The role name (`node`, `peer_a`, `operator`); used in logs and errors.
    pub name: String,
    /// What to boot.
    pub boot: Boot,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Ring links, in NIC order.
    pub links: Vec<LinkEnd>,
    /// TCG or KVM.
    pub accel: Accel,
    /// Further raw disks (virtio), after the boot disk.
    pub disks: Vec<PathBuf>,
    /// The office LAN stand-in, if any: see [`MachineConfig::lan_forward`].
    pub lan: Option<LanForward>,
    /// QEMU's CPU model (`-cpu`); `None` for QEMU's default.
    pub cpu_model: Option<String>,
}

/// A LAN NIC on QEMU's user-mode network with `restrict=on`: the guest can
/// reach nothing at all (no host, no outside), and the host reaches one guest
/// TCP port through `127.0.0.1:host_port`. It stands in for the office LAN
/// from which clients call a node's API.
#[derive(Debug, Clone, Copy)]
pub struct LanForward {
    /// Port on the host's loopback.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

impl MachineConfig {
    /// A machine named `name` booting `boot`, 1 GiB, 1 CPU, no links, accel from the environment.
    pub fn new(name: &str, boot: Boot) -> Self {
        Self {
            name: name.to_string(),
            boot,
            memory_mib: 1024,
            cpus: 1,
            links: Vec::new(),
            accel: Accel::from_env(),
            disks: Vec::new(),
            lan: None,
            cpu_model: None,
        }
    }

    /// Emulates CPU model `model` (`qemu64`, `max`: every feature TCG
    /// emulates, AVX2 among them).
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.cpu_model = Some(model.to_owned());
        self
    }

    /// Adds a LAN NIC (PCI slot 0x18, a `en*` name in the guest) whose guest
    /// TCP port `guest_port` the host reaches at `127.0.0.1:host_port`; the
    /// guest itself can reach nothing through it.
    pub fn lan_forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.lan = Some(LanForward {
            host_port,
            guest_port,
        });
        self
    }

    /// Adds a raw disk image as a further virtio disk (`/dev/vdb`, `/dev/vdc`...).
    pub fn disk(mut self, image: PathBuf) -> Self {
        self.disks.push(image);
        self
    }

    /// Adds a ring link end (NIC `thunderbolt<i>` in the guest, `i` in call order).
    pub fn link(mut self, end: LinkEnd) -> Self {
        self.links.push(end);
        self
    }
}

/// What the console reader shares with the machine.
#[derive(Default)]
struct ConsoleState {
    text: String,
    closed: bool,
}

type Shared = Arc<(Mutex<ConsoleState>, Condvar)>;

struct Running {
    child: Child,
    qmp: Qmp,
    console_in: UnixStream,
    console: Shared,
    reader: Option<thread::JoinHandle<()>>,
}

/// A guest; see the module docs.
pub struct Machine {
    config: MachineConfig,
    dir: tempfile::TempDir,
    running: Option<Running>,
    /// Console text before this byte offset has been consumed by earlier waits.
    cursor: usize,
    sticks: u32,
    nonce: u64,
}

fn accept_within(
    listener: &UnixListener,
    child: &mut Child,
    machine: &str,
    what: &str,
) -> Result<UnixStream, VmError> {
    let io = |source| VmError::Io {
        what: format!("{machine}: accepting QEMU's {what} connection"),
        source,
    };
    listener.set_nonblocking(true).map_err(io)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(io)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io(e)),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmError::Exited {
                machine: machine.to_string(),
                what: format!("its {what} connection"),
                status: status.to_string(),
                tail: String::new(),
            });
        }
        if Instant::now() > deadline {
            return Err(VmError::Timeout {
                machine: machine.to_string(),
                what: format!("QEMU's {what} connection"),
                seconds: 60,
                tail: String::new(),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Machine {
    /// Creates the machine's temp dir (and its OVMF variable store); does not start it.
    pub fn new(config: MachineConfig) -> Result<Self, VmError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sovereign-vm-{}-", config.name))
            .tempdir()
            .map_err(|source| VmError::Io {
                what: format!("{}: creating the machine dir", config.name),
                source,
            })?;
        if let Boot::Uefi { .. } = config.boot {
            fs::copy(OVMF_VARS, dir.path().join("OVMF_VARS.fd")).map_err(|source| VmError::Io {
                what: format!("{}: copying {OVMF_VARS} (install ovmf)", config.name),
                source,
            })?;
        }
        Ok(Self {
            config,
            dir,
            running: None,
            cursor: 0,
            sticks: 0,
            nonce: 0,
        })
    }

    /// The role name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The machine's temp dir (console log, QEMU log, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The MAC address of ring link `index` (in [`MachineConfig::link`]
    /// order): how a test finds that NIC in the guest.
    pub fn link_mac(&self, index: usize) -> String {
        format!("52:54:00:5b:{:02x}:{index:02x}", self.machine_byte())
    }

    /// A byte of the role name's hash that tells this machine's MACs apart.
    fn machine_byte(&self) -> u8 {
        blake3::hash(self.config.name.as_bytes()).as_bytes()[0]
    }

    /// The QEMU command line this machine runs (program first).
    pub fn qemu_command(&self) -> Vec<String> {
        let dir = self.dir.path();
        let p = |path: &Path| path.display().to_string();
        let mut args: Vec<String> = vec![
            "qemu-system-x86_64".into(),
            "-name".into(),
            self.config.name.clone(),
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            self.config.accel.flag().into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-m".into(),
            self.config.memory_mib.to_string(),
            "-smp".into(),
            self.config.cpus.to_string(),
            "-chardev".into(),
            format!("socket,id=console,path={}", p(&dir.join("console.sock"))),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=qmp,path={}", p(&dir.join("qmp.sock"))),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        if let Some(model) = &self.config.cpu_model {
            args.extend(["-cpu".into(), model.clone()]);
        }
        args.extend([
            // Never a host network device; ring links below are unix sockets.
            "-nic".into(),
            "none".into(),
            "-device".into(),
            "qemu-xhci,id=xhci".into(),
        ]);
        let machine_byte = self.machine_byte();
        for (i, end) in self.config.links.iter().enumerate() {
            args.push("-netdev".into());
            args.push(format!(
                "dgram,id=ring{i},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                p(&end.local),
                p(&end.remote)
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-net-pci,netdev=ring{i},mac={},addr=0x{:x},romfile=",
                self.link_mac(i),
                0x10 + i
            ));
        }
        if let Some(lan) = self.config.lan {
            args.push("-netdev".into());
            args.push(format!(
                "user,id=lan,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{}",
                lan.host_port, lan.guest_port
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-net-pci,netdev=lan,mac=52:54:00:5b:{machine_byte:02x}:ff,addr=0x18,romfile="
            ));
        }
        let disk = match &self.config.boot {
            Boot::Uefi { disk } => {
                args.push("-drive".into());
                args.push(format!(
                    "if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on"
                ));
                args.push("-drive".into());
                args.push(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    p(&dir.join("OVMF_VARS.fd"))
                ));
                Some(disk)
            }
            Boot::Kernel {
                kernel,
                initrd,
                append,
                disk,
            } => {
                args.extend([
                    "-kernel".into(),
                    p(kernel),
                    "-initrd".into(),
                    p(initrd),
                    "-append".into(),
                    append.clone(),
                ]);
                disk.as_ref()
            }
        };
        if let Some(disk) = disk {
            args.push("-drive".into());
            args.push(format!("if=none,id=disk0,format=raw,file={}", p(disk)));
            args.push("-device".into());
            args.push(if matches!(self.config.boot, Boot::Uefi { .. }) {
                "virtio-blk-pci,drive=disk0,bootindex=0".into()
            } else {
                "virtio-blk-pci,drive=disk0".into()
            });
        }
        for (i, extra) in self.config.disks.iter().enumerate() {
            args.push("-drive".into());
            args.push(format!(
                "if=none,id=disk{},format=raw,file={}",
                i + 1,
                p(extra)
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=disk{}", i + 1));
        }
        args
    }

    /// Boots the machine; returns once QEMU runs and its console and QMP are connected.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.running.is_some() {
            return Ok(());
        }
        let name = self.config.name.clone();
        let dir = self.dir.path().to_path_buf();
        let io = |what: String| move |source| VmError::Io { what, source };
        for file in ["console.sock", "qmp.sock"] {
            let _ = fs::remove_file(dir.join(file));
        }
        for end in &self.config.links {
            let _ = fs::remove_file(&end.local);
        }
        let console_listener = UnixListener::bind(dir.join("console.sock"))
            .map_err(io(format!("{name}: binding the console socket")))?;
        let qmp_listener = UnixListener::bind(dir.join("qmp.sock"))
            .map_err(io(format!("{name}: binding the QMP socket")))?;
        let log = File::create(dir.join("qemu.log")).map_err(io(format!("{name}: qemu.log")))?;
        let log2 = log.try_clone().map_err(io(format!("{name}: qemu.log")))?;
        let command = self.qemu_command();
        tracing::info!(machine = %name, command = %command.join(" "), "starting");
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("{name}: starting qemu-system-x86_64")))?;
        let connected = accept_within(&console_listener, &mut child, &name, "console")
            .and_then(|console| {
                let qmp_stream = accept_within(&qmp_listener, &mut child, &name, "QMP")?;
                Ok((console, qmp_stream))
            })
            .and_then(|(console, qmp_stream)| Ok((console, Qmp::handshake(&name, qmp_stream)?)));
        let (console, qmp) = match connected {
            Ok(pair) => pair,
            Err(error) => {
                // If QEMU exited by itself, its log says why.
                thread::sleep(Duration::from_millis(200));
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                let error = match exited {
                    Some(status) => VmError::Exited {
                        machine: name.clone(),
                        what: "startup".into(),
                        status: status.to_string(),
                        tail: String::new(),
                    },
                    None => error,
                };
                return Err(self.with_qemu_log(error));
            }
        };
        let console_in = console
            .try_clone()
            .map_err(io(format!("{name}: console socket")))?;
        let shared: Shared = Arc::new((Mutex::new(ConsoleState::default()), Condvar::new()));
        let log_path = dir.join("console.log");
        let reader_shared = shared.clone();
        let reader = thread::spawn(move || read_console(console, &log_path, &reader_shared));
        self.cursor = 0;
        self.running = Some(Running {
            child,
            qmp,
            console_in,
            console: shared,
            reader: Some(reader),
        });
        Ok(())
    }

    fn with_qemu_log(&self, error: VmError) -> VmError {
        let log = fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default();
        match error {
            VmError::Exited {
                machine,
                what,
                status,
                tail,
            } => VmError::Exited {
                machine,
                what,
                status: format!("{status}; qemu: {}", tail_of(&log, 5)),
                tail,
            },
            other => other,
        }
    }

    fn running(&mut self, what: &str) -> Result<&mut Running, VmError> {
        let name = self.config.name.clone();
        self.running.as_mut().ok_or_else(|| VmError::Config {
            machine: name,
            reason: format!("not running (needed for {what})"),
        })
    }

    /// Everything the console printed in the current boot.
    pub fn console_text(&self) -> String {
        match &self.running {
            Some(running) => running
                .console
                .0
                .lock()
                .map(|s| s.text.clone())
                .unwrap_or_default(),
            None => fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default(),
        }
    }

    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail_of(&self.console_text(), lines)
    }

    /// Waits until the console, after the previous match, matches `pattern`;
    /// returns the matched text. Fails early if QEMU exits.
    pub fn wait_for_console(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, VmError> {
        let regex = Regex::new(pattern).map_err(|e| VmError::Config {
            machine: self.config.name.clone(),
            reason: format!("bad pattern {pattern:?}: {e}"),
        })?;
        self.wait_for_regex(&regex, &format!("console /{pattern}/"), timeout)
            .map(|(text, _)| text)
    }

    /// Like [`Self::wait_for_console`] with a compiled regex; also returns the captures' texts.
    fn wait_for_regex(
        &mut self,
        regex: &Regex,
        what: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<Option<String>>), VmError> {
        let name = self.config.name.clone();
        let cursor = self.cursor;
        let running = self.running(what)?;
        let shared = running.console.clone();
        let deadline = Instant::now() + timeout;
        let (lock, condvar) = &*shared;
        let mut state = lock.lock().map_err(|_| VmError::Config {
            machine: name.clone(),
            reason: "console reader panicked".into(),
        })?;
        loop {
            if let Some(found) = regex.captures(state.text.get(cursor..).unwrap_or("")) {
                let whole = found.get(0).map(|m| (m.end(), m.as_str().to_string()));
                let groups = found
                    .iter()
                    .skip(1)
                    .map(|g| g.map(|m| m.as_str().to_string()))
                    .collect();
                if let Some((end, text)) = whole {
                    drop(state);
                    self.cursor = cursor + end;
                    return Ok((text, groups));
                }
            }
            let tail = tail_of(&state.text, 40);
            if state.closed {
                drop(state);
                let status = self
                    .running
                    .as_mut()
                    .and_then(|r| r.child.wait().ok())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown status".into());
                return Err(VmError::Exited {
                    machine: name,
                    what: what.to_string(),
                    status,
                    tail,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout {
                    machine: name,
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                    tail,
                });
            }
            state = condvar
                .wait_timeout(state, deadline - now)
                .map_err(|_| VmError::Config {
                    machine: name.clone(),
                    reason: "console reader panicked".into(),
                })?
                .0;
        }
    }

    /// Waits until systemd has `unit` active (or, for a one-shot unit that
    /// does not remain, finished successfully), polling `systemctl show`
    /// through the console agent like the NixOS driver does; fails at once if
    /// the unit failed.
    pub fn wait_for_unit(&mut self, unit: &str, timeout: Duration) -> Result<(), VmError> {
        if unit.is_empty()
            || !unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "@._-:\\".contains(c))
        {
            return Err(VmError::Config {
                machine: self.config.name.clone(),
                reason: format!("{unit:?} is not a unit name"),
            });
        }
        let deadline = Instant::now() + timeout;
        let query = format!(
            "systemctl show --property=ActiveState,Result,Type,ExecMainExitTimestampMonotonic -- '{unit}'"
        );
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, output) = self.execute(&query, left.max(Duration::from_secs(1)))?;
            let field = |name: &str| {
                output
                    .lines()
                    .find_map(|l| {
                        l.trim()
                            .strip_prefix(&format!("{name}="))
                            .map(str::to_string)
                    })
                    .unwrap_or_default()
            };
            let state = field("ActiveState");
            let done_oneshot = field("Type") == "oneshot"
                && state == "inactive"
                && field("Result") == "success"
                && field("ExecMainExitTimestampMonotonic")
                    .parse::<u64>()
                    .unwrap_or(0)
                    > 0;
            if state == "active" || done_oneshot {
                return Ok(());
            }
            if state == "failed" {
                return Err(VmError::UnitFailed {
                    machine: self.config.name.clone(),
                    unit: unit.to_string(),
                    tail: self.console_tail(40),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    machine: self.config.name.clone(),
                    what: format!("unit {unit} (last state {state:?})"),
                    seconds: timeout.as_secs(),
                    tail: self.console_tail(40),
                });
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Writes text to the serial console (the guest's stdin there).
    pub fn send_console(&mut self, text: &str) -> Result<(), VmError> {
        let name = self.config.name.clone();
        let running = self.running("send_console")?;
        running
            .console_in
            .write_all(text.as_bytes())
            .map_err(|source| VmError::Io {
                what: format!("{name}: writing to the console"),
                source,
            })
    }

    /// Runs a shell command through a console agent (the driver's self-test
    /// initramfs and the test profile's agent: one `<nonce> <command>` per line,
    /// answered by the output and a line `::done <nonce> <status>`).
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<(i32, String), VmError> {
        if command.contains('\n') {
            return Err(VmError::Config {
                machine: self.config.name.clone(),
                reason: "commands are one line".into(),
            });
        }
        self.nonce += 1;
        let nonce = format!("n{}x{}", std::process::id(), self.nonce);
        let start = self.console_text().len().max(self.cursor);
        self.cursor = start;
        self.send_console(&format!("{nonce} {command}\n"))?;
        let pattern = Regex::new(&format!(r"\r?\n::done {nonce} (\d+)\r?\n")).map_err(|e| {
            VmError::Config {
                machine: self.config.name.clone(),
                reason: e.to_string(),
            }
        })?;
        let (matched, groups) =
            self.wait_for_regex(&pattern, &format!("`{command}` to finish"), timeout)?;
        let status = groups
            .first()
            .and_then(|g| g.as_deref())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        let text = self.console_text();
        let end = self.cursor - matched.len();
        let output = text.get(start..end).unwrap_or("").replace('\r', "");
        // Drop the command line itself if the terminal echoed it.
        let output = output
            .split_inclusive('\n')
            .filter(|line| !line.contains(&nonce))
            .collect::<String>();
        Ok((status, output))
    }

    /// Runs a command that must succeed; returns its output.
    pub fn succeed(&mut self, command: &str, timeout: Duration) -> Result<String, VmError> {
        let (status, output) = self.execute(command, timeout)?;
        if status != 0 {
            return Err(VmError::CommandFailed {
                machine: self.config.name.clone(),
                command: command.to_string(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Runs one QMP command.
    pub fn qmp(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, VmError> {
        self.running(command)?.qmp.execute(command, arguments)
    }

    /// Plugs a USB stick (a raw image file) into the machine's xHCI controller;
    /// returns its device id for [`Self::detach_stick`].
    pub fn attach_stick(&mut self, image: &Path) -> Result<String, VmError> {
        if !image.is_file() {
            return Err(VmError::Config {
                machine: self.config.name.clone(),
                reason: format!("stick image {} is not a file", image.display()),
            });
        }
        self.sticks += 1;
        let id = format!("stick{}", self.sticks);
        self.qmp(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": id,
                "file": { "driver": "file", "filename": image.display().to_string() },
            }),
        )?;
        self.qmp(
            "device_add",
            json!({ "driver": "usb-storage", "bus": "xhci.0", "drive": id, "id": id, "removable": true }),
        )?;
        Ok(id)
    }

    /// Unplugs a stick plugged with [`Self::attach_stick`].
    pub fn detach_stick(&mut self, id: &str) -> Result<(), VmError> {
        self.qmp("device_del", json!({ "id": id }))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The block node stays busy until the guest has released the device.
            match self.qmp("blockdev-del", json!({ "node-name": id })) {
                Ok(_) => return Ok(()),
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Pulls (`up == false`) or plugs back the cable of ring link `index`
    /// (NIC `thunderbolt<index>`): the guest sees its carrier go and come.
    pub fn set_link(&mut self, index: usize, up: bool) -> Result<(), VmError> {
        if index >= self.config.links.len() {
            return Err(VmError::Config {
                machine: self.config.name.clone(),
                reason: format!("no ring link {index}"),
            });
        }
        self.qmp(
            "set_link",
            json!({ "name": format!("ring{index}"), "up": up }),
        )
        .map(|_| ())
    }

    /// Kills QEMU at once, like pulling the power cord.
    pub fn crash(&mut self) -> Result<(), VmError> {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
            finish_reader(&mut running);
        }
        Ok(())
    }

    /// Waits for the guest to power itself off (or reboot: QEMU runs with `-no-reboot`).
    pub fn wait_for_shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        let name = self.config.name.clone();
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running("wait_for_shutdown")?;
            match running.child.try_wait() {
                Ok(Some(status)) => {
                    if let Some(mut running) = self.running.take() {
                        finish_reader(&mut running);
                    }
                    return Ok(status);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(VmError::Io {
                        what: format!("{name}: waiting for QEMU"),
                        source,
                    })
                }
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    machine: name,
                    what: "the guest to power off".into(),
                    seconds: timeout.as_secs(),
                    tail: self.console_tail(40),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the guest to power off cleanly (`systemctl poweroff` through the
    /// console agent: images without logind ignore the ACPI power button) and
    /// waits for QEMU to exit.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        self.nonce += 1;
        let nonce = format!("n{}x{}", std::process::id(), self.nonce);
        self.send_console(&format!("{nonce} systemctl poweroff || poweroff -f\n"))?;
        self.wait_for_shutdown(timeout)
    }

    /// Presses the ACPI power button (acted on by guests running logind).
    pub fn press_power_button(&mut self) -> Result<(), VmError> {
        self.qmp("system_powerdown", json!({})).map(|_| ())
    }

    /// Whether QEMU is running.
    pub fn is_running(&mut self) -> bool {
        match self.running.as_mut() {
            Some(running) => matches!(running.child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

fn finish_reader(running: &mut Running) {
    let _ = running.console_in.shutdown(std::net::Shutdown::Both);
    if let Some(reader) = running.reader.take() {
        let _ = reader.join();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

fn read_console(mut stream: UnixStream, log_path: &Path, shared: &Shared) {
    let mut log = File::create(log_path).ok();
    let mut buffer = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(log) = log.as_mut() {
            let _ = log.write_all(&buffer[..read]);
        }
        pending.extend_from_slice(&buffer[..read]);
        // Keep an incomplete UTF-8 sequence for the next read.
        let valid = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let decoded = String::from_utf8_lossy(&pending[..valid]).into_owned();
        pending.drain(..valid);
        let (text, incomplete) = strip_ansi(&decoded);
        // An escape sequence cut by the read waits for its end.
        let mut rest = incomplete.as_bytes().to_vec();
        rest.append(&mut pending);
        pending = rest;
        let (lock, condvar) = &**shared;
        if let Ok(mut state) = lock.lock() {
            state.text.push_str(&text);
        }
        condvar.notify_all();
    }
    let (lock, condvar) = &**shared;
    if let Ok(mut state) = lock.lock() {
        state.closed = true;
    }
    condvar.notify_all();
}

/// Removes terminal escape sequences (colours, cursor moves) so patterns match
/// the text a person reads. Returns the clean text and an unfinished sequence
/// at the end, if any.
fn strip_ansi(text: &str) -> (String, &str) {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            None => return (out, &text[start..]),
            Some((_, '[')) => {
                chars.next();
                let mut finished = false;
                for (_, c) in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        finished = true;
                        break;
                    }
                }
                if !finished {
                    return (out, &text[start..]);
                }
            }
            Some(_) => {
                // A two-character escape (ESC c, ESC 7...).
                chars.next();
            }
        }
    }
    (out, "")
}

/// Boots `config` with KVM and reports whether its console matches `pattern`
/// within `timeout` (on these machines KVM guests hang: the answer is false).
pub fn probe_kvm(config: &MachineConfig, pattern: &str, timeout: Duration) -> bool {
    if fs::metadata("/dev/kvm").is_err() {
        return false;
    }
    let mut probe = config.clone();
    probe.name = format!("{}-kvm-probe", config.name);
    probe.accel = Accel::Kvm;
    probe.links.clear();
    let Ok(mut machine) = Machine::new(probe) else {
        return false;
    };
    machine.start().is_ok() && machine.wait_for_console(pattern, timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn colour_codes_are_removed_and_a_cut_sequence_is_kept_for_later() {
        let (text, rest) =
            strip_ansi("[\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mx.service\u{1b}[0m.");
        assert_eq!(text, "[  OK  ] Started x.service.");
        assert_eq!(rest, "");
        let (text, rest) = strip_ansi("ready\u{1b}[0;3");
        assert_eq!((text.as_str(), rest), ("ready", "\u{1b}[0;3"));
        let (text, rest) = strip_ansi("a\u{1b}cb");
        assert_eq!((text.as_str(), rest), ("ab", ""));
    }
}
