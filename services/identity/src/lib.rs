/*!
`sovereign-identity`: what a node needs at run time to know who it is and
who it talks to. Services depend on it; it knows nothing of flashing or of
the CA's secret key (those live in `sovereign-provisioning`).

```text
cluster CA (ed25519, offline) ──signs──▶ node certificate (ed25519 node key)
        │                                   ├── LAN API TLS 1.3   (tls::lan_server_config)
        │                                   ├── ring mutual TLS   (tls::server_config / client_config)
        └──signs──▶ revocation list (CRL)   └── audit signatures  (NodeIdentity::signing_key)
```

- [`NodeIdentity`]: the identity file (node key, certificate, CA
  certificate, optional age identity); [`NodeIdentity::load`] checks the
  chain and the key, [`NodeIdentity::require_ca`] the image's CA.
- [`ClusterCa`]: the trust anchor; [`ClusterCa::verify_peer`] checks a node
  certificate (issuer, signature, validity, key usage, revocation) and
  returns [`PeerInfo`].
- [`RevocationList`]: an X.509 CRL signed by the CA whose CRL number is its
  sequence; [`Revocations`] is the list in force, shared by every verifier,
  and never replaced by an older list.
- [`tls`]: rustls configs (TLS 1.3, ring provider) and [`tls::peer_info`].
- [`clock`]: nodes have no NTP; a node never trusts a time earlier than
  its image's build time or the CA's creation.

One key per node: the ed25519 key the CA certifies signs the TLS
handshakes of the LAN API and of ring links and the audit log's records.
*/

mod ca;
mod cert;
pub mod clock;
mod error;
mod identity;
mod revocation;
pub mod tls;

pub use ca::{ClusterCa, PeerInfo};
pub use cert::first_certificate;
pub use error::IdentityError;
pub use identity::NodeIdentity;
pub use revocation::{RevocationList, Revocations};
