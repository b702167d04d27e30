//! Why an identity, a certificate or a revocation list is refused: one
//! line each, naming the file or the certificate's subject.

use std::path::PathBuf;

/// Why an identity, a peer certificate or a revocation list is refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file or value is not in the expected format.
    #[error("{what}: {reason}")]
    Malformed {
        /// What was being read (a path, or "peer certificate").
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate was issued by another CA than this cluster's.
    #[error("certificate of {subject} is not issued by the CA of cluster {cluster}")]
    ForeignCa {
        /// The certificate's subject.
        subject: String,
        /// The cluster whose CA was expected.
        cluster: String,
    },
    /// The certificate names this cluster's CA as its issuer but the CA's
    /// signature does not verify: forged or altered.
    #[error("certificate of {subject} has a signature that does not verify against the CA of cluster {cluster} (forged or altered)")]
    BadSignature {
        /// The certificate's subject.
        subject: String,
        /// The cluster.
        cluster: String,
    },
    /// The certificate's validity ended before the (trusted) current time.
    #[error("certificate of {subject} expired at {not_after} (now {now})")]
    Expired {
        /// The certificate's subject.
        subject: String,
        /// End of validity (RFC 3339).
        not_after: String,
        /// The time it was checked at (RFC 3339).
        now: String,
    },
    /// The certificate's validity starts after the (trusted) current time.
    #[error("certificate of {subject} is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The certificate's subject.
        subject: String,
        /// Start of validity (RFC 3339).
        not_before: String,
        /// The time it was checked at (RFC 3339).
        now: String,
    },
    /// The certificate's serial is on the cluster's revocation list.
    #[error("certificate of {subject} (serial {serial}) is revoked by revocation list {sequence}")]
    Revoked {
        /// The certificate's subject.
        subject: String,
        /// Its serial.
        serial: u64,
        /// The revocation list's sequence number.
        sequence: u64,
    },
    /// The certificate is fine but not for what it is used for (another
    /// name, a CA certificate as a node's, a missing key usage).
    #[error("certificate of {subject}: {reason}")]
    NotUsable {
        /// The certificate's subject.
        subject: String,
        /// Why it cannot be used here.
        reason: String,
    },
    /// The identity's key is not the key its certificate certifies.
    #[error("{what}: the private key does not match the certificate's public key")]
    KeyMismatch {
        /// The identity file.
        what: String,
    },
    /// The identity belongs to another cluster than the CA this node trusts.
    #[error("{what}: the identity is enrolled in cluster {found} (CA {found_fingerprint}), not in cluster {expected} (CA {expected_fingerprint}) that this node trusts")]
    WrongCluster {
        /// The identity file.
        what: String,
        /// The trusted cluster's name.
        expected: String,
        /// Its CA fingerprint.
        expected_fingerprint: String,
        /// The identity's cluster name.
        found: String,
        /// Its CA fingerprint.
        found_fingerprint: String,
    },
    /// A revocation list whose CA signature does not verify, or from another CA.
    #[error("{what}: revocation list is not signed by the CA of cluster {cluster}")]
    RevocationSignature {
        /// The list's file or origin.
        what: String,
        /// The cluster.
        cluster: String,
    },
    /// A revocation list older than the one in force.
    #[error("revocation list {offered} is older than revocation list {current} already in force")]
    StaleRevocationList {
        /// The offered list's sequence.
        offered: u64,
        /// The sequence in force.
        current: u64,
    },
    /// Two different revocation lists with the same sequence number.
    #[error("revocation list {sequence} differs from the list {sequence} already in force")]
    ConflictingRevocationList {
        /// The sequence number.
        sequence: u64,
    },
}

impl IdentityError {
    /// An [`IdentityError::Malformed`] for `what`.
    pub(crate) fn malformed(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
