/*!
Ring tests on real kernel networking, without VMs: every node is a network
namespace and every Thunderbolt cable a veth pair whose ends are named like
the interfaces `thunderbolt_net` makes (`thunderbolt0`, `thunderbolt1`).

```no_run
# use sovereign_vm_tests::netns::RingNet;
# fn main() -> Result<(), sovereign_vm_tests::VmError> {
let net = RingNet::ring(3)?;                  // node i's thunderbolt0 <-> node i+1's thunderbolt1
let mut node = net.node(1).spawn(net.node(1).command("sovereign").args(["node", "run"]))?;
net.cable_down(0)?;                           // both ends lose carrier: a pulled cable
net.cable_up(0)?;
node.pause()?;                                // SIGSTOP: a hung node with its links up
node.kill()?;
# Ok(()) }
```

**Architecture Invariant:** the namespaces are never connected to the host's
network: the only interfaces in them are `lo` and the veth ends, which carry
IPv6 link-local addresses only (no address is ever configured, no route
added). Namespace names hold the test process's id and a counter, so parallel
tests and parallel runs never share one; [`RingNet`]'s drop kills every
process left in its namespaces and deletes them, also when a test panics, and
a new [`RingNet`] first removes those left behind by dead test processes.
*/

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::process::{kill_process, Pid, Signal};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::error::VmError;
use crate::host::host_tool;

/// The prefix of every namespace this harness makes: `sovring<pid>x<n>n<i>`.
const PREFIX: &str = "sovring";

/// How nodes are cabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cabling {
    /// Node `i`'s `thunderbolt0` to node `i+1`'s `thunderbolt1`, and the last
    /// back to the first (two nodes: two cables between them).
    Ring,
    /// The same without the cable from the last node back to the first.
    Chain,
}

/// One cable: a veth pair between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cable {
    /// The index of the node at one end.
    pub a: usize,
    /// Its interface name.
    pub a_if: String,
    /// The index of the node at the other end.
    pub b: usize,
    /// Its interface name.
    pub b_if: String,
}

/// A node: one network namespace.
#[derive(Debug)]
pub struct NetNode {
    namespace: String,
    interfaces: Vec<String>,
}

/// A process started inside a node's namespace; killed (SIGKILL) and reaped
/// on drop.
#[derive(Debug)]
pub struct NsProcess {
    namespace: String,
    child: Child,
}

/// A set of cabled nodes, removed with everything in them on drop.
#[derive(Debug)]
pub struct RingNet {
    nodes: Vec<NetNode>,
    cables: Vec<Cable>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

fn ip(args: &[&str]) -> Result<String, VmError> {
    host_tool(Command::new("ip").args(args))
}

/// Moves the calling thread into the network namespace mounted at `path`
/// (`/run/netns/NAME`): the sockets it opens from then on live there. Give it
/// to `tokio::runtime::Builder::on_thread_start` to run a whole runtime in a
/// namespace.
pub fn enter_namespace(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(LinkNameSpaceType::Network),
    )
    .map_err(std::io::Error::from)
}

impl RingNet {
    /// `n` nodes cabled as a closed ring.
    pub fn ring(n: usize) -> Result<Self, VmError> {
        Self::new(n, Cabling::Ring)
    }

    /// `n` nodes cabled as an open daisy chain.
    pub fn chain(n: usize) -> Result<Self, VmError> {
        Self::new(n, Cabling::Chain)
    }

    /// `n` nodes cabled as `cabling` says, every interface up with its IPv6
    /// link-local address usable at once (duplicate address detection off).
    pub fn new(n: usize, cabling: Cabling) -> Result<Self, VmError> {
        remove_stale();
        let run = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut net = RingNet {
            nodes: Vec::new(),
            cables: cables(n, cabling),
        };
        for i in 0..n {
            let namespace = format!("{PREFIX}{pid}x{run}n{i}");
            ip(&["netns", "add", &namespace])?;
            let mut interfaces = Vec::new();
            for cable in &net.cables {
                if cable.a == i {
                    interfaces.push(cable.a_if.clone());
                }
                if cable.b == i {
                    interfaces.push(cable.b_if.clone());
                }
            }
            interfaces.sort();
            net.nodes.push(NetNode {
                namespace,
                interfaces,
            });
        }
        for node in &net.nodes {
            ip(&["-n", &node.namespace, "link", "set", "lo", "up"])?;
        }
        for cable in &net.cables {
            let (a, b) = (&net.nodes[cable.a].namespace, &net.nodes[cable.b].namespace);
            #[rustfmt::skip]
            ip(&["link", "add", &cable.a_if, "netns", a, "type", "veth", "peer", "name", &cable.b_if, "netns", b])?;
        }
        for node in &net.nodes {
            node.no_dad()?;
        }
        for i in 0..net.cables.len() {
            net.cable_up(i)?;
        }
        Ok(net)
    }

    /// The nodes, in cabling order.
    pub fn nodes(&self) -> &[NetNode] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NetNode {
        &self.nodes[i]
    }

    /// The cables: cable `i` leaves node `i` by its `thunderbolt0`.
    pub fn cables(&self) -> &[Cable] {
        &self.cables
    }

    /// Pulls cable `i`: both ends go down, so both nodes lose carrier at once.
    pub fn cable_down(&self, i: usize) -> Result<(), VmError> {
        self.set_cable(i, "down")
    }

    /// Plugs cable `i` back in.
    pub fn cable_up(&self, i: usize) -> Result<(), VmError> {
        self.set_cable(i, "up")
    }

    fn set_cable(&self, i: usize, state: &str) -> Result<(), VmError> {
        let cable = &self.cables[i];
        for (node, iface) in [(cable.a, &cable.a_if), (cable.b, &cable.b_if)] {
            let namespace = &self.nodes[node].namespace;
            ip(&["-n", namespace, "link", "set", iface, state])?;
        }
        Ok(())
    }
}

impl Drop for RingNet {
    fn drop(&mut self) {
        for node in &self.nodes {
            remove_namespace(&node.namespace);
        }
    }
}

fn cables(n: usize, cabling: Cabling) -> Vec<Cable> {
    let count = match cabling {
        Cabling::Ring if n >= 2 => n,
        _ => n.saturating_sub(1),
    };
    (0..count)
        .map(|i| Cable {
            a: i,
            a_if: "thunderbolt0".into(),
            b: (i + 1) % n,
            b_if: "thunderbolt1".into(),
        })
        .collect()
}

/// Kills what runs in `namespace` and deletes it (its veth ends go with it).
fn remove_namespace(namespace: &str) {
    if let Ok(pids) = ip(&["netns", "pids", namespace]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", namespace])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of test processes that died without cleaning up.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            remove_namespace(name);
        }
    }
}

impl NetNode {
    /// The namespace's name (for `ip netns exec` and `ip -n`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The namespace's mount, for [`enter_namespace`].
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.namespace)
    }

    /// The node's ring interfaces (`thunderbolt0`, `thunderbolt1`).
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// `program` to be run inside the namespace (`ip netns exec NS program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    /// Runs a command inside the namespace; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, VmError> {
        host_tool(self.command(program).args(args))
    }

    /// Starts `command` (from [`NetNode::command`]); `ip netns exec` execs
    /// the program, so the process is the program itself.
    pub fn spawn(&self, command: &mut Command) -> Result<NsProcess, VmError> {
        let child = command.spawn().map_err(io_error(format!(
            "{}: starting {command:?}",
            self.namespace
        )))?;
        Ok(NsProcess {
            namespace: self.namespace.clone(),
            child,
        })
    }

    /// Turns duplicate address detection off on the node's interfaces, so the
    /// link-local addresses are usable as soon as a link is up.
    fn no_dad(&self) -> Result<(), VmError> {
        let path = self.path();
        let interfaces = self.interfaces.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            enter_namespace(&path)?;
            for iface in interfaces {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{iface}/accept_dad"), "0")?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
        .map_err(io_error(format!("{}: turning DAD off", self.namespace)))
    }
}

impl NsProcess {
    fn signal(&self, signal: Signal) -> Result<(), VmError> {
        let pid = Pid::from_raw(self.child.id() as i32).ok_or_else(|| VmError::Config {
            machine: self.namespace.clone(),
            reason: "process has no pid".into(),
        })?;
        kill_process(pid, signal).map_err(|e| VmError::Io {
            what: format!("{}: sending {signal:?}", self.namespace),
            source: e.into(),
        })
    }

    /// The process's id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, to take its stdout or stderr pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Freezes the process (SIGSTOP): a hung node whose links stay up.
    pub fn pause(&self) -> Result<(), VmError> {
        self.signal(Signal::STOP)
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) -> Result<(), VmError> {
        self.signal(Signal::CONT)
    }

    /// Kills the process (SIGKILL, a power cut for that node) and reaps it.
    pub fn kill(&mut self) -> Result<(), VmError> {
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(io_error(format!("{}: reaping", self.namespace)))?;
        Ok(())
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_of_three_has_three_cables_and_a_chain_two() {
        let ring = cables(3, Cabling::Ring);
        assert_eq!(ring.len(), 3);
        assert_eq!((ring[2].a, ring[2].b), (2, 0));
        assert_eq!(cables(3, Cabling::Chain).len(), 2);
        assert_eq!(cables(2, Cabling::Ring).len(), 2);
        assert!(cables(1, Cabling::Ring).is_empty());
    }
}
