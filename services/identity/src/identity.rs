//! The node identity file: the node's ed25519 key, its certificate from
//! the cluster CA, the CA certificate and (optionally) the node's age
//! identity, as PEM blocks in one secret file (mode 0600).
//!
//! ```text
//! Sovereign node identity: node-a, cluster acme. Secret: keep it 0600.
//! -----BEGIN PRIVATE KEY-----            the node key (PKCS#8, ed25519)
//! -----BEGIN CERTIFICATE-----            the node certificate
//! -----BEGIN CERTIFICATE-----            the cluster CA certificate
//! -----BEGIN SOVEREIGN AGE IDENTITY----- the age identity (optional)
//! ```
//!
//! Loading checks everything it can without a clock: the node certificate
//! is signed by the CA in the file, certifies the file's key, and is not a
//! CA; [`NodeIdentity::require_ca`] then checks the CA against the one the
//! node's image carries.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use age::secrecy::ExposeSecret;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert;
use crate::{ClusterCa, IdentityError};

const KEY_TAG: &str = "PRIVATE KEY";
const CERT_TAG: &str = "CERTIFICATE";
const AGE_TAG: &str = "SOVEREIGN AGE IDENTITY";

/// An enrolled node: its key, its CA-issued certificate, the CA, and the
/// clock floor below which it never trusts its own clock.
pub struct NodeIdentity {
    name: String,
    serial: u64,
    key: SigningKey,
    certificate: CertificateDer<'static>,
    ca: ClusterCa,
    age: Option<age::x25519::Identity>,
    clock_floor: SystemTime,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NodeIdentity({} serial {} of {:?})",
            self.name, self.serial, self.ca
        )
    }
}

impl NodeIdentity {
    /// Puts an identity together, checking that `certificate` is a node
    /// certificate signed by `ca` for `key`.
    pub fn from_parts(
        what: &str,
        key: SigningKey,
        certificate: Vec<u8>,
        ca: ClusterCa,
        age: Option<age::x25519::Identity>,
    ) -> Result<Self, IdentityError> {
        let fields = cert::fields(what, &certificate)?;
        let parsed = cert::parse(what, &certificate)?;
        if fields.is_ca {
            return Err(IdentityError::NotUsable {
                subject: fields.name,
                reason: "a CA certificate, not a node's".into(),
            });
        }
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate_der())
            .map_err(|e| IdentityError::malformed("cluster CA certificate", e))?;
        if parsed.issuer().as_raw() != ca.subject_der() {
            return Err(IdentityError::ForeignCa {
                subject: fields.name,
                cluster: ca.name().into(),
            });
        }
        if parsed.verify_signature(Some(ca_cert.public_key())).is_err() {
            return Err(IdentityError::BadSignature {
                subject: fields.name,
                cluster: ca.name().into(),
            });
        }
        if fields.public_key != key.verifying_key() {
            return Err(IdentityError::KeyMismatch { what: what.into() });
        }
        let clock_floor = ca.not_before();
        Ok(Self {
            name: fields.name,
            serial: fields.serial,
            key,
            certificate: CertificateDer::from(certificate),
            ca,
            age,
            clock_floor,
        })
    }

    /// Reads an identity file's text.
    pub fn parse(what: &str, text: &str) -> Result<Self, IdentityError> {
        let blocks = pem::parse_many(text).map_err(|e| IdentityError::malformed(what, e))?;
        let tags: Vec<&str> = blocks.iter().map(|b| b.tag()).collect();
        let (key, node, ca, age) = match tags.as_slice() {
            [KEY_TAG, CERT_TAG, CERT_TAG] => (&blocks[0], &blocks[1], &blocks[2], None),
            [KEY_TAG, CERT_TAG, CERT_TAG, AGE_TAG] => {
                (&blocks[0], &blocks[1], &blocks[2], Some(&blocks[3]))
            }
            [] => {
                return Err(IdentityError::malformed(
                    what,
                    "not a node identity file (a bare key?): enroll the node with `sovereign node enroll --cluster DIR --name NAME --out FILE` and use that file",
                ))
            }
            _ => {
                return Err(IdentityError::malformed(
                    what,
                    format!("expected PEM blocks PRIVATE KEY, CERTIFICATE (node), CERTIFICATE (CA) and optionally SOVEREIGN AGE IDENTITY; found {tags:?}"),
                ))
            }
        };
        let key = SigningKey::from_pkcs8_der(key.contents())
            .map_err(|e| IdentityError::malformed(what, format!("node key: {e}")))?;
        let ca = ClusterCa::from_der(&format!("{what}: CA certificate"), ca.contents())?;
        let age = age
            .map(|block| {
                std::str::from_utf8(block.contents())
                    .ok()
                    .and_then(|s| age::x25519::Identity::from_str(s.trim()).ok())
                    .ok_or_else(|| IdentityError::malformed(what, "age identity is not valid"))
            })
            .transpose()?;
        Self::from_parts(what, key, node.contents().to_vec(), ca, age)
    }

    /// Reads an identity file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The identity file's text (secret: write it 0600).
    pub fn to_pem(&self) -> String {
        let mut text = format!(
            "Sovereign node identity: {}, cluster {} (CA {}). Secret: keep it 0600.\n",
            self.name,
            self.ca.name(),
            self.ca.fingerprint()
        );
        let mut blocks = vec![
            pem::Pem::new(KEY_TAG, self.pkcs8().secret_pkcs8_der().to_vec()),
            pem::Pem::new(CERT_TAG, self.certificate.to_vec()),
            pem::Pem::new(CERT_TAG, self.ca.certificate_der().to_vec()),
        ];
        if let Some(age) = &self.age {
            blocks.push(pem::Pem::new(
                AGE_TAG,
                age.to_string().expose_secret().as_bytes().to_vec(),
            ));
        }
        text.push_str(&pem::encode_many(&blocks));
        text
    }

    /// Refuses the identity unless its CA is `trusted` (the CA certificate
    /// in the node's verified image).
    pub fn require_ca(&self, trusted: &ClusterCa) -> Result<(), IdentityError> {
        if self.ca.certificate_der() == trusted.certificate_der() {
            return Ok(());
        }
        Err(IdentityError::WrongCluster {
            what: format!("identity of {}", self.name),
            expected: trusted.name().into(),
            expected_fingerprint: trusted.fingerprint(),
            found: self.ca.name().into(),
            found_fingerprint: self.ca.fingerprint(),
        })
    }

    /// Raises the clock floor (see [`crate::clock`]): the node never
    /// trusts a time earlier than `floor` (its image's build time). The
    /// floor is never below the CA's creation.
    pub fn with_clock_floor(mut self, floor: SystemTime) -> Self {
        self.clock_floor = self.clock_floor.max(floor);
        self
    }

    /// The clock floor in force.
    pub fn clock_floor(&self) -> SystemTime {
        self.clock_floor
    }

    /// The time this node trusts now: its clock, never below the floor.
    pub fn now(&self) -> SystemTime {
        crate::clock::trusted_now(self.clock_floor)
    }

    /// The node's name (its certificate's subject).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node certificate's serial.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The node's ed25519 key, the one the CA certified: it signs TLS
    /// handshakes (LAN API, ring) and audit records.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The node certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The node certificate, PEM.
    pub fn certificate_pem(&self) -> String {
        pem::encode(&pem::Pem::new(CERT_TAG, self.certificate.to_vec()))
    }

    /// The node key as PKCS#8 PEM (secret), for TLS servers that read PEM files.
    pub fn private_key_pem(&self) -> String {
        pem::encode(&pem::Pem::new(
            KEY_TAG,
            self.pkcs8().secret_pkcs8_der().to_vec(),
        ))
    }

    /// The certificate chain as PEM: the node certificate, then the CA's.
    pub fn chain_pem(&self) -> String {
        pem::encode_many(&[
            pem::Pem::new(CERT_TAG, self.certificate.to_vec()),
            pem::Pem::new(CERT_TAG, self.ca.certificate_der().to_vec()),
        ])
    }

    /// The cluster CA this identity was enrolled in.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The node's age identity, when the file carries one (bundles may be
    /// encrypted to its recipient).
    pub fn age_identity(&self) -> Option<&age::x25519::Identity> {
        self.age.as_ref()
    }

    /// The node key as PKCS#8 for rustls.
    pub(crate) fn pkcs8(&self) -> PrivatePkcs8KeyDer<'static> {
        let der = self
            .key
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            .unwrap_or_default();
        PrivatePkcs8KeyDer::from(der)
    }

    /// The node key for rustls.
    pub(crate) fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.pkcs8())
    }
}
