/*!
The model store of a Sovereign node and the verified import path: the only
code that writes the store.

```text
STORE/
  lock                     held by the one process that writes the store
  trust                    the installed trust file (highest sequence accepted)
  revoked.crl              the cluster's revocation list (highest sequence accepted)
  index/                   sled: versions, highest version per name, history
  staging/                 imports in progress (emptied on open)
  outbox/NAME@VERSION/     only on a node that replicates: the bundle files as
                           imported, left for the ring to pass on
  models/NAME/VERSION/     live: manifest.json (the signed bytes) + files/...
```

A model version becomes live by one `rename(2)` of a fully written, fully
verified and fsynced staging directory, so a crash at any moment leaves the
previous state or the new one, never a half. Readers (the inference engine)
use [`live_model`] and never open the index.
*/
#![deny(missing_docs)]

mod error;
mod import;
mod index;
mod layout;
mod live;
mod outbox;
mod revocation_state;
mod store;
mod trust_state;

pub use error::StoreError;
pub use import::{ImportAudit, ImportEvent, ImportOptions, Imported, Outcome, ReportEntry};
pub use index::{HistoryRecord, VersionRecord};
pub use live::{live_model, live_models, live_versions, LiveModel};
pub use outbox::OUTBOX;
pub use revocation_state::installed_revocations;
pub use store::Store;
pub use trust_state::installed_trust;
