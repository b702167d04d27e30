/*!
`sovereign-provisioning`: putting a Sovereign node on its disk.

- [`flash()`] writes a node image to a disk (or a file standing in for one),
  verifies it by reading it back, and creates the state partition holding the
  node identity ([`state`] describes its layout).
- [`target::inspect`] refuses disks that must not be overwritten: mounted, the
  running system's, held by device-mapper, partitions.
- [`gpt`] reads partition tables.

**Architecture Invariant:** nothing is written to a target before every check
has passed and the state filesystem has been built.

Cluster CA and enrollment (`sovereign cluster init`, `sovereign node enroll`)
will live here too.
*/

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
