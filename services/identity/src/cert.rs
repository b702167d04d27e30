//! Reading the fields Sovereign uses from an X.509 certificate (x509-parser):
//! subject name, serial, ed25519 key, validity. Nothing here verifies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::IdentityError;

/// The fields of a certificate that Sovereign relies on.
#[derive(Clone, Debug)]
pub(crate) struct CertFields {
    /// The subject's common name.
    pub name: String,
    /// The serial number.
    pub serial: u64,
    /// The certified ed25519 key.
    pub public_key: VerifyingKey,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basic constraints say it is a CA.
    pub is_ca: bool,
}

/// Parses one DER certificate (and nothing after it).
pub(crate) fn parse<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| IdentityError::malformed(what, format!("not an X.509 certificate ({e})")))?;
    if !rest.is_empty() {
        return Err(IdentityError::malformed(
            what,
            "trailing bytes after the certificate",
        ));
    }
    Ok(cert)
}

/// The subject's common name, or the whole subject when it has none.
pub(crate) fn subject_name(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| cert.subject().to_string())
}

/// Reads the fields of `der`; refuses keys other than ed25519 and serials
/// longer than 64 bits (Sovereign issues small sequential serials).
pub(crate) fn fields(what: &str, der: &[u8]) -> Result<CertFields, IdentityError> {
    let cert = parse(what, der)?;
    let name = subject_name(&cert);
    let spki = cert.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(IdentityError::malformed(
            what,
            format!("certificate of {name} does not certify an ed25519 key"),
        ));
    }
    let key_bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| IdentityError::malformed(what, "ed25519 key is not 32 bytes"))?;
    let public_key = VerifyingKey::from_bytes(&key_bytes)
        .map_err(|e| IdentityError::malformed(what, format!("ed25519 key: {e}")))?;
    let serial = u64::try_from(cert.serial.clone()).map_err(|_| {
        IdentityError::malformed(
            what,
            format!("certificate of {name} has a serial longer than 64 bits"),
        )
    })?;
    let validity = cert.validity();
    Ok(CertFields {
        serial,
        public_key,
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        is_ca: cert.is_ca(),
        name,
    })
}

/// A Unix timestamp as a `SystemTime` (times before 1970 clamp to 1970).
fn system_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// A time in RFC 3339, for messages.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s after 1970"))
}

/// The first PEM `CERTIFICATE` in `text` (a certificate file, or an
/// identity file whose first certificate is the node's).
pub fn first_certificate(what: &str, text: &str) -> Result<Vec<u8>, IdentityError> {
    pem::parse_many(text)
        .map_err(|e| IdentityError::malformed(what, e))?
        .into_iter()
        .find(|block| block.tag() == "CERTIFICATE")
        .map(|block| block.into_contents())
        .ok_or_else(|| IdentityError::malformed(what, "holds no PEM CERTIFICATE"))
}
