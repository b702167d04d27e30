//! The cluster CA's certificate as a node holds it, and peer verification
//! against it (rustls-webpki builds and checks the chain).

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::KeyUsage;

use crate::cert::{self, rfc3339};
use crate::{IdentityError, RevocationList};

/// Who is on the other end: what a verified node certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node's name (the certificate's subject common name).
    pub name: String,
    /// The certificate's serial, unique within the cluster.
    pub serial: u64,
    /// The node's ed25519 key certified by the CA.
    pub public_key: VerifyingKey,
}

/// The cluster CA's self-signed certificate: the one trust anchor of a
/// cluster (LAN API, ring, audit). Holds no secret.
#[derive(Clone)]
pub struct ClusterCa {
    der: CertificateDer<'static>,
    name: String,
    public_key: VerifyingKey,
    not_before: SystemTime,
    fingerprint: [u8; 32],
    subject_der: Vec<u8>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterCa({} {})", self.name, self.fingerprint())
    }
}

impl ClusterCa {
    /// Reads a CA certificate from DER; refuses anything but a self-signed
    /// ed25519 CA certificate.
    pub fn from_der(what: &str, der: &[u8]) -> Result<Self, IdentityError> {
        let parsed = cert::parse(what, der)?;
        let fields = cert::fields(what, der)?;
        if !fields.is_ca {
            return Err(IdentityError::malformed(
                what,
                format!("certificate of {} is not a CA certificate", fields.name),
            ));
        }
        if parsed.subject().as_raw() != parsed.issuer().as_raw()
            || parsed.verify_signature(None).is_err()
        {
            return Err(IdentityError::malformed(
                what,
                format!(
                    "CA certificate of {} is not validly self-signed",
                    fields.name
                ),
            ));
        }
        let subject_der = parsed.subject().as_raw().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(digest.as_ref());
        Ok(Self {
            der: CertificateDer::from(der.to_vec()),
            name: fields.name,
            public_key: fields.public_key,
            not_before: fields.not_before,
            fingerprint,
            subject_der,
        })
    }

    /// Reads a CA certificate from PEM text holding exactly one certificate.
    pub fn from_pem(what: &str, text: &str) -> Result<Self, IdentityError> {
        let blocks = pem::parse_many(text).map_err(|e| IdentityError::malformed(what, e))?;
        match blocks.as_slice() {
            [one] if one.tag() == "CERTIFICATE" => Self::from_der(what, one.contents()),
            _ => Err(IdentityError::malformed(
                what,
                "expected exactly one PEM CERTIFICATE (the cluster CA certificate)",
            )),
        }
    }

    /// Reads a CA certificate file (PEM).
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&path.display().to_string(), &text)
    }

    /// The cluster's name (the CA certificate's common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The CA certificate, PEM.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.to_vec()))
    }

    /// The CA's ed25519 public key.
    pub fn public_key(&self) -> &VerifyingKey {
        &self.public_key
    }

    /// Start of the CA's validity: the cluster's creation. No certificate
    /// of the cluster is older, so a node never trusts an earlier clock.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// `sha256:<hex>` of the CA certificate's DER (what `openssl x509
    /// -fingerprint -sha256` prints, without colons).
    pub fn fingerprint(&self) -> String {
        let hex: String = self
            .fingerprint
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }

    /// The CA's subject, DER (for TLS certificate requests).
    pub(crate) fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }

    /// Verifies a node certificate: issued by this CA (chain and
    /// signature), valid at `now`, a node (not a CA) certificate for TLS,
    /// and not on `revocations`. `now` should come from the clock rule
    /// ([`crate::clock::trusted_now`]).
    pub fn verify_peer(
        &self,
        cert_der: &[u8],
        revocations: &RevocationList,
        now: SystemTime,
    ) -> Result<PeerInfo, IdentityError> {
        self.verify_for(cert_der, revocations, now, KeyUsage::server_auth())
    }

    /// [`Self::verify_peer`] for a given extended key usage.
    pub(crate) fn verify_for(
        &self,
        cert_der: &[u8],
        revocations: &RevocationList,
        now: SystemTime,
        usage: KeyUsage,
    ) -> Result<PeerInfo, IdentityError> {
        const WHAT: &str = "peer certificate";
        let fields = cert::fields(WHAT, cert_der)?;
        let subject = fields.name.clone();
        let der = CertificateDer::from(cert_der);
        let end_entity = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| IdentityError::malformed(WHAT, format!("{e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&self.der)
            .map_err(|e| IdentityError::malformed("cluster CA certificate", format!("{e}")))?;
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        end_entity
            .verify_for_usage(
                &[webpki::ring::ED25519],
                &[anchor],
                &[],
                UnixTime::since_unix_epoch(since_epoch),
                usage,
                None,
                None,
            )
            .map_err(|e| self.chain_error(e, &fields, now))?;
        if revocations.ca_fingerprint() != self.fingerprint() {
            return Err(IdentityError::malformed(
                "revocation list",
                format!("issued for another CA than cluster {}'s", self.name),
            ));
        }
        if revocations.is_revoked(fields.serial) {
            return Err(IdentityError::Revoked {
                subject,
                serial: fields.serial,
                sequence: revocations.sequence(),
            });
        }
        Ok(PeerInfo {
            name: fields.name,
            serial: fields.serial,
            public_key: fields.public_key,
        })
    }

    /// Names a webpki refusal in Sovereign's terms.
    fn chain_error(
        &self,
        error: webpki::Error,
        fields: &cert::CertFields,
        now: SystemTime,
    ) -> IdentityError {
        let subject = fields.name.clone();
        let cluster = self.name.clone();
        match error {
            webpki::Error::CertExpired { .. } => IdentityError::Expired {
                subject,
                not_after: rfc3339(fields.not_after),
                now: rfc3339(now),
            },
            webpki::Error::CertNotValidYet { .. } => IdentityError::NotYetValid {
                subject,
                not_before: rfc3339(fields.not_before),
                now: rfc3339(now),
            },
            webpki::Error::UnknownIssuer => IdentityError::ForeignCa { subject, cluster },
            webpki::Error::InvalidSignatureForPublicKey => {
                IdentityError::BadSignature { subject, cluster }
            }
            webpki::Error::CaUsedAsEndEntity => IdentityError::NotUsable {
                subject,
                reason: "a CA certificate, not a node's".into(),
            },
            other => IdentityError::NotUsable {
                subject,
                reason: format!("refused by the certificate verifier ({other})"),
            },
        }
    }
}
