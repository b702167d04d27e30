/*!
`sovereign-vm-tests`: a QEMU test driver in the spirit of the NixOS test
driver, and the scenario tests that boot real Sovereign images with it.

A test names machines by role, starts them, and reads top to bottom:

```no_run
# use std::time::Duration;
# use sovereign_vm_tests::{Boot, Machine, MachineConfig};
# fn main() -> Result<(), sovereign_vm_tests::VmError> {
let mut node = Machine::new(MachineConfig::new(
    "node",
    Boot::Uefi { disk: "flashed.img".into() },
))?;
node.start()?;
node.wait_for_unit("sovereign-api.service", Duration::from_secs(120))?;
node.shutdown(Duration::from_secs(60))?;
# Ok(()) }
```

**Architecture Invariant:** no guest is ever connected to the host network:
every machine runs with `-nic none`, and its NICs are point-to-point [`Link`]s
over unix datagram sockets in temp dirs, plus at most one LAN stand-in
([`MachineConfig::lan_forward`]): QEMU's user-mode network with `restrict=on`,
through which the guest reaches nothing and the host reaches one forwarded
port on `127.0.0.1`. QEMU uses TCG unless
`SOVEREIGN_VM_ACCEL=kvm` (KVM guests hang on the project's machines;
[`probe_kvm`] tells whether it works elsewhere).
*/

pub mod cache;
pub mod error;
pub mod host;
pub mod machine;
pub mod netns;
pub mod qmp;
pub mod sink;

pub use cache::cached_build;
pub use error::VmError;
pub use host::{host_tool, workspace_binary};
pub use machine::{probe_kvm, Accel, Boot, LanForward, Link, LinkEnd, Machine, MachineConfig};
pub use netns::{enter_namespace, Cabling, NetNode, NsProcess, RingNet};
pub use sink::{Sink, SinkCounts, SINK_MAC, SINK_V4, SINK_V6};
