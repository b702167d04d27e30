/*!
The node image builder's spec and the configuration it renders into the
image: hardened systemd units for the Sovereign services and the nftables
ruleset that forbids egress. (The build steps themselves — root filesystem,
verity, UKI, disk image — are issue 5's remaining work.)
*/
#![deny(missing_docs)]

mod firewall;
mod spec;
mod units;

pub use firewall::nftables_ruleset;
pub use spec::{ImageSpec, LanAddress, Network, Profile, Service, SpecError, Trust};
pub use units::{unit_file, unit_name, AUDIT_SOCKET};
