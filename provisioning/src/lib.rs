/*!
`sovereign-provisioning`: the operator's side of a cluster, and putting a
Sovereign node on its disk.

- [`cluster`]: the cluster CA directory (`sovereign cluster init`), node
  enrollment (`sovereign node enroll`), the register of issued
  certificates and revocation (`sovereign cluster revoke`). What a node
  needs at run time lives in `sovereign-identity`, which services use.

- [`flash()`] writes a node image to a disk (or a file standing in for one),
  verifies it by reading it back, and creates the state partition holding the
  node identity ([`state`] describes its layout).
- [`target::inspect`] refuses disks that must not be overwritten: mounted, the
  running system's, held by device-mapper, partitions.
- [`gpt`] reads partition tables.

**Architecture Invariant:** nothing is written to a target before every check
has passed and the state filesystem has been built.
*/

pub mod cluster;
pub mod error;
pub mod flash;
pub mod gpt;
pub mod state;
pub mod target;

pub use error::FlashError;
pub use flash::{
    flash, BarProgress, FlashOptions, FlashReport, NoProgress, NodeFile, Progress,
    DEFAULT_STATE_SIZE,
};
pub use state::NODE_FILE_NAMES;
