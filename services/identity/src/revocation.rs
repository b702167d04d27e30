//! The cluster's revocation list: an X.509 CRL signed by the cluster CA
//! whose CRL number is its sequence. [`Revocations`] is the list in force
//! on a node, shared by every verifier so that a newer list takes effect
//! at the next handshake.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::{ClusterCa, IdentityError};

/// A verified revocation list: the serials the cluster CA has revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationList {
    der: Option<Vec<u8>>,
    sequence: u64,
    serials: BTreeSet<u64>,
    ca_fingerprint: String,
}

impl RevocationList {
    /// The list a node starts with: sequence 0, nothing revoked.
    pub fn empty(ca: &ClusterCa) -> Self {
        Self {
            der: None,
            sequence: 0,
            serials: BTreeSet::new(),
            ca_fingerprint: ca.fingerprint(),
        }
    }

    /// Reads a CRL (DER) and checks that `ca` signed it; it must carry a
    /// CRL number (the sequence, at least 1).
    pub fn from_der(what: &str, der: &[u8], ca: &ClusterCa) -> Result<Self, IdentityError> {
        let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| {
            IdentityError::malformed(what, format!("not an X.509 revocation list ({e})"))
        })?;
        if !rest.is_empty() {
            return Err(IdentityError::malformed(
                what,
                "trailing bytes after the revocation list",
            ));
        }
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate_der())
            .map_err(|e| IdentityError::malformed("cluster CA certificate", e))?;
        if crl.issuer().as_raw() != ca_cert.subject().as_raw()
            || crl.verify_signature(ca_cert.public_key()).is_err()
        {
            return Err(IdentityError::RevocationSignature {
                what: what.into(),
                cluster: ca.name().into(),
            });
        }
        let sequence = crl
            .crl_number()
            .and_then(|n| u64::try_from(n.clone()).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                IdentityError::malformed(what, "revocation list without a CRL number (sequence)")
            })?;
        let mut serials = BTreeSet::new();
        for revoked in crl.iter_revoked_certificates() {
            let serial = u64::try_from(revoked.serial().clone()).map_err(|_| {
                IdentityError::malformed(what, "revoked serial longer than 64 bits")
            })?;
            serials.insert(serial);
        }
        Ok(Self {
            der: Some(der.to_vec()),
            sequence,
            serials,
            ca_fingerprint: ca.fingerprint(),
        })
    }

    /// Reads a CRL from PEM (`X509 CRL`) or DER bytes.
    pub fn parse(what: &str, bytes: &[u8], ca: &ClusterCa) -> Result<Self, IdentityError> {
        if bytes.starts_with(b"-----BEGIN") {
            let block = pem::parse(bytes).map_err(|e| IdentityError::malformed(what, e))?;
            if block.tag() != "X509 CRL" {
                return Err(IdentityError::malformed(
                    what,
                    format!("expected a PEM X509 CRL, found {}", block.tag()),
                ));
            }
            Self::from_der(what, block.contents(), ca)
        } else {
            Self::from_der(what, bytes, ca)
        }
    }

    /// Reads a revocation list file (PEM or DER).
    pub fn load(path: &Path, ca: &ClusterCa) -> Result<Self, IdentityError> {
        let bytes = std::fs::read(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &bytes, ca)
    }

    /// The sequence (CRL number); 0 for the empty starting list.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The revoked serials.
    pub fn serials(&self) -> &BTreeSet<u64> {
        &self.serials
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: u64) -> bool {
        self.serials.contains(&serial)
    }

    /// The signed list as PEM, to store or pass on (`None` for the empty list).
    pub fn to_pem(&self) -> Option<String> {
        self.der
            .as_ref()
            .map(|der| pem::encode(&pem::Pem::new("X509 CRL", der.clone())))
    }

    /// The fingerprint of the CA that signed it.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    /// Whether `self` may replace `current`: `Ok(true)` when newer,
    /// `Ok(false)` when it is the same list, an error when older or when a
    /// different list has the same sequence.
    pub fn supersedes(&self, current: &RevocationList) -> Result<bool, IdentityError> {
        if self.ca_fingerprint != current.ca_fingerprint {
            return Err(IdentityError::malformed(
                "revocation list",
                "signed by another cluster CA than the list in force",
            ));
        }
        match self.sequence.cmp(&current.sequence) {
            std::cmp::Ordering::Greater => Ok(true),
            std::cmp::Ordering::Equal if self == current => Ok(false),
            std::cmp::Ordering::Equal => Err(IdentityError::ConflictingRevocationList {
                sequence: self.sequence,
            }),
            std::cmp::Ordering::Less => Err(IdentityError::StaleRevocationList {
                offered: self.sequence,
                current: current.sequence,
            }),
        }
    }
}

/// The revocation list in force, shared: clones see the same list, and
/// every verifier reads [`Revocations::current`] on each handshake.
#[derive(Clone, Debug)]
pub struct Revocations(Arc<RwLock<Arc<RevocationList>>>);

impl Revocations {
    /// Starts with `list` in force.
    pub fn new(list: RevocationList) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(list))))
    }

    /// The list in force now.
    pub fn current(&self) -> Arc<RevocationList> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `list` in force if it is newer: `Ok(true)` when it replaced the
    /// current list, `Ok(false)` when it is the list already in force; an
    /// older list (or another with the same sequence) is refused.
    pub fn update(&self, list: RevocationList) -> Result<bool, IdentityError> {
        let mut guard = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let newer = list.supersedes(&guard)?;
        if newer {
            *guard = Arc::new(list);
        }
        Ok(newer)
    }
}
