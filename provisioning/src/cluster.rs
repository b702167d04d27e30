//! The operator's side of cluster identity: the CA directory made by
//! `sovereign cluster init`, node enrollment and revocation.
//!
//! ```text
//! DIR/ca.key        the CA's ed25519 key, PKCS#8 PEM, 0600: keep it offline, back it up
//! DIR/ca.pem        the CA certificate (self-signed): what clients, images and auditors trust
//! DIR/cluster.json  name, shared LAN name, CA fingerprint
//! DIR/nodes.json    the register: every serial issued, to which name, revoked or not
//! DIR/revoked.crl   the newest revocation list (after the first revocation)
//! ```

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sovereign_identity::{ClusterCa, NodeIdentity, RevocationList};
use time::OffsetDateTime;

/// The CA key file in a cluster directory.
pub const CA_KEY: &str = "ca.key";
/// The CA certificate file in a cluster directory.
pub const CA_CERT: &str = "ca.pem";
/// The cluster file (name, LAN name, CA fingerprint).
pub const CLUSTER_FILE: &str = "cluster.json";
/// The register of issued certificates.
pub const REGISTER_FILE: &str = "nodes.json";
/// The newest revocation list.
pub const REVOCATION_FILE: &str = "revoked.crl";

/// Validity of the CA certificate.
const CA_DAYS: u64 = 100 * 365;
/// Default validity of a node certificate: long, since nodes have no NTP.
pub const DEFAULT_NODE_DAYS: u64 = 10 * 365;

/// Why a cluster operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `cluster init` onto an existing cluster.
    #[error("{0} already holds a cluster; refusing to overwrite it")]
    Exists(PathBuf),
    /// A directory that is not a cluster directory.
    #[error(
        "{path} is not a cluster directory ({reason}); make one with `sovereign cluster init`"
    )]
    NotACluster {
        /// The directory.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A name, DNS name or option that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// Enrolling a name already enrolled.
    #[error("node {name} is already enrolled (serial {serial}); use --renew to re-issue its certificate")]
    AlreadyEnrolled {
        /// The name.
        name: String,
        /// Its current serial.
        serial: u64,
    },
    /// No enrolled node of that name.
    #[error("no certificate in force for node {0} in this cluster")]
    UnknownNode(String),
    /// The output file exists.
    #[error("{0} already exists; refusing to overwrite it")]
    OutputExists(PathBuf),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A certificate or list we made or read does not verify.
    #[error(transparent)]
    Identity(#[from] sovereign_identity::IdentityError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cluster file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The cluster's name (the CA's common name).
    pub name: String,
    /// A DNS name every node certificate carries, so clients may use one
    /// name for all nodes.
    pub lan_name: Option<String>,
    /// `sha256:<hex>` of the CA certificate.
    pub ca_fingerprint: String,
}

/// One issued certificate in the register.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's name.
    pub name: String,
    /// The certificate's serial.
    pub serial: u64,
    /// When it was issued (RFC 3339).
    pub issued: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// The DNS names and addresses it is valid for.
    pub subject_alt_names: Vec<String>,
    /// The node's age recipient.
    pub age_recipient: String,
    /// Whether it has been revoked.
    pub revoked: bool,
}

/// The register of a cluster directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The next serial to issue.
    pub next_serial: u64,
    /// The sequence of the newest revocation list (0: none yet).
    pub revocation_sequence: u64,
    /// Every certificate issued, oldest first.
    pub nodes: Vec<NodeEntry>,
}

/// An opened cluster directory (holds the CA key).
pub struct Cluster {
    dir: PathBuf,
    file: ClusterFile,
    ca: ClusterCa,
    ca_key: ed25519_dalek::SigningKey,
    register: Register,
}

/// What `node enroll` asks for.
#[derive(Clone, Debug, Default)]
pub struct EnrollRequest {
    /// The node's name (letters, digits, `-`).
    pub name: String,
    /// More DNS names the node answers to on the LAN.
    pub lan_names: Vec<String>,
    /// LAN addresses the node answers on.
    pub lan_ips: Vec<IpAddr>,
    /// Validity in days.
    pub days: u64,
    /// Re-issue an enrolled name's certificate and revoke the old one.
    pub renew: bool,
}

/// What `node enroll` did.
#[derive(Debug)]
pub struct Enrolled {
    /// The new identity.
    pub identity: NodeIdentity,
    /// Its register entry.
    pub entry: NodeEntry,
    /// The revocation list issued when renewing revoked the old certificate.
    pub revocation: Option<PathBuf>,
}

/// Checks a node or cluster name: a DNS label (lowercase letters, digits,
/// `-`, not at the ends), 1 to 63 characters.
pub fn check_name(kind: &str, name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Invalid(format!(
            "{kind} {name:?} is not a valid name (1-63 lowercase letters, digits and '-', not at the ends)"
        )))
    }
}

/// Checks a DNS name: dot-separated labels as in [`check_name`].
pub fn check_dns_name(name: &str) -> Result<(), ClusterError> {
    if name.len() > 253 || name.split('.').any(|l| check_name("label", l).is_err()) {
        return Err(ClusterError::Invalid(format!(
            "{name:?} is not a valid DNS name (lowercase labels of letters, digits and '-')"
        )));
    }
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The current time, whole seconds (certificates carry seconds).
fn now() -> OffsetDateTime {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn key_pair(key: &ed25519_dalek::SigningKey) -> Result<KeyPair, ClusterError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| ClusterError::Invalid(format!("encoding an ed25519 key: {e}")))?;
    Ok(KeyPair::try_from(&PrivatePkcs8KeyDer::from(
        der.as_bytes().to_vec(),
    ))?)
}

/// Writes `bytes` to `path` atomically (beside it, fsync, rename).
fn replace(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let temp = path.with_extension("new");
    let result = (|| {
        use std::io::Write;
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(io(path))
}

impl Cluster {
    /// Makes a cluster directory at `dir`: a fresh CA key and self-signed
    /// certificate, the cluster file and an empty register. Refuses a
    /// directory that exists and is not empty; writes into a temporary
    /// directory beside it and renames it into place.
    pub fn init(dir: &Path, name: &str, lan_name: Option<&str>) -> Result<Cluster, ClusterError> {
        check_name("cluster name", name)?;
        if let Some(lan) = lan_name {
            check_dns_name(lan)?;
        }
        if let Ok(mut entries) = fs::read_dir(dir) {
            if entries.next().is_some() {
                return Err(ClusterError::Exists(dir.to_path_buf()));
            }
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let staging = tempfile::Builder::new()
            .prefix(".cluster-init-")
            .tempdir_in(parent)
            .map_err(io(parent))?;

        let ca_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Sovereign cluster");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let created = now();
        params.not_before = created;
        params.not_after = created + Duration::from_secs(CA_DAYS * 86_400);
        params.serial_number = Some(SerialNumber::from(1u64));
        let certificate = params.self_signed(&key_pair(&ca_key)?)?;
        let ca = ClusterCa::from_der("new CA certificate", certificate.der())?;

        let key_pem = ca_key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| ClusterError::Invalid(format!("encoding the CA key: {e}")))?;
        let key_path = staging.path().join(CA_KEY);
        sovereign_signing::write_secret_file(&key_path, key_pem.as_bytes()).map_err(|e| {
            ClusterError::Io {
                path: key_path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let file = ClusterFile {
            name: name.into(),
            lan_name: lan_name.map(str::to_string),
            ca_fingerprint: ca.fingerprint(),
        };
        let register = Register {
            next_serial: 1,
            ..Register::default()
        };
        replace(&staging.path().join(CA_CERT), ca.to_pem().as_bytes())?;
        replace(&staging.path().join(CLUSTER_FILE), &json(&file))?;
        replace(&staging.path().join(REGISTER_FILE), &json(&register))?;
        let staged = staging.keep();
        // rename(2) replaces an empty directory; a non-empty one makes it fail.
        if let Err(e) = fs::rename(&staged, dir) {
            let _ = fs::remove_dir_all(&staged);
            return Err(if dir.exists() {
                ClusterError::Exists(dir.to_path_buf())
            } else {
                ClusterError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                }
            });
        }
        Ok(Cluster {
            dir: dir.to_path_buf(),
            file,
            ca,
            ca_key,
            register,
        })
    }

    /// Opens a cluster directory, checking that its CA key, certificate and
    /// cluster file belong together.
    pub fn open(dir: &Path) -> Result<Cluster, ClusterError> {
        let not = |reason: String| ClusterError::NotACluster {
            path: dir.to_path_buf(),
            reason,
        };
        let read = |name: &str| -> Result<String, ClusterError> {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|e| not(format!("{}: {e}", path.display())))
        };
        let file: ClusterFile = serde_json::from_str(&read(CLUSTER_FILE)?)
            .map_err(|e| not(format!("{CLUSTER_FILE}: {e}")))?;
        let register: Register = serde_json::from_str(&read(REGISTER_FILE)?)
            .map_err(|e| not(format!("{REGISTER_FILE}: {e}")))?;
        let ca = ClusterCa::from_pem(&dir.join(CA_CERT).display().to_string(), &read(CA_CERT)?)?;
        let key_path = dir.join(CA_KEY);
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let ca_key = ed25519_dalek::SigningKey::from_pkcs8_pem(&key_pem)
            .map_err(|e| not(format!("{CA_KEY}: {e}")))?;
        if ca_key.verifying_key() != *ca.public_key() || file.ca_fingerprint != ca.fingerprint() {
            return Err(not(format!(
                "{CA_KEY}, {CA_CERT} and {CLUSTER_FILE} do not belong together"
            )));
        }
        Ok(Cluster {
            dir: dir.to_path_buf(),
            file,
            ca,
            ca_key,
            register,
        })
    }

    /// The cluster file.
    pub fn file(&self) -> &ClusterFile {
        &self.file
    }

    /// The CA certificate.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The register.
    pub fn register(&self) -> &Register {
        &self.register
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest revocation list (the empty list before any revocation).
    pub fn revocation_list(&self) -> Result<RevocationList, ClusterError> {
        let path = self.dir.join(REVOCATION_FILE);
        if self.register.revocation_sequence == 0 {
            return Ok(RevocationList::empty(&self.ca));
        }
        Ok(RevocationList::load(&path, &self.ca)?)
    }

    /// The register's entry in force for `name` (issued, not revoked).
    pub fn active(&self, name: &str) -> Option<&NodeEntry> {
        self.register
            .nodes
            .iter()
            .rev()
            .find(|e| e.name == name && !e.revoked)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, ClusterError> {
        Ok(Issuer::from_ca_cert_der(
            &CertificateDer::from(self.ca.certificate_der().to_vec()),
            key_pair(&self.ca_key)?,
        )?)
    }

    /// Enrolls a node: a fresh node key and age identity, a certificate
    /// signed by the CA, recorded in the register. Renewing revokes the
    /// name's previous certificate. Writes the identity file `out` (0600)
    /// first and the register last; nothing is left on refusal.
    pub fn enroll(
        &mut self,
        request: &EnrollRequest,
        out: &Path,
    ) -> Result<Enrolled, ClusterError> {
        check_name("node name", &request.name)?;
        if out.exists() {
            return Err(ClusterError::OutputExists(out.to_path_buf()));
        }
        for lan in &request.lan_names {
            check_dns_name(lan)?;
        }
        if request.days == 0 || request.days > 100 * 365 {
            return Err(ClusterError::Invalid(format!(
                "--days {} is out of range (1 to 36500)",
                request.days
            )));
        }
        let previous: Vec<u64> = self
            .register
            .nodes
            .iter()
            .filter(|e| e.name == request.name && !e.revoked)
            .map(|e| e.serial)
            .collect();
        if let (Some(serial), false) = (previous.last(), request.renew) {
            return Err(ClusterError::AlreadyEnrolled {
                name: request.name.clone(),
                serial: *serial,
            });
        }
        if previous.is_empty() && request.renew {
            return Err(ClusterError::UnknownNode(request.name.clone()));
        }

        let node_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let age = age::x25519::Identity::generate();
        let serial = self.register.next_serial.max(1);
        let issued = now();
        let mut dns = vec![request.name.clone()];
        for name in request.lan_names.iter().chain(&self.file.lan_name) {
            if !dns.contains(name) {
                dns.push(name.clone());
            }
        }
        let mut params = CertificateParams::new(dns.clone())?;
        for ip in &request.lan_ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.name.as_str());
        dn.push(DnType::OrganizationName, self.file.name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.serial_number = Some(SerialNumber::from(serial));
        // Valid from the cluster's creation: a node's clock is never trusted
        // below that (see sovereign_identity::clock).
        params.not_before = OffsetDateTime::from(self.ca.not_before());
        params.not_after = issued + Duration::from_secs(request.days * 86_400);
        let certificate = params.signed_by(&key_pair(&node_key)?, &self.issuer()?)?;
        let identity = NodeIdentity::from_parts(
            "new node certificate",
            node_key,
            certificate.der().to_vec(),
            self.ca.clone(),
            Some(age.clone()),
        )?;
        let mut sans = dns;
        sans.extend(request.lan_ips.iter().map(IpAddr::to_string));
        let entry = NodeEntry {
            name: request.name.clone(),
            serial,
            issued: rfc3339(issued),
            not_after: rfc3339(params.not_after),
            subject_alt_names: sans,
            age_recipient: age.to_public().to_string(),
            revoked: false,
        };

        write_identity(out, &identity)?;
        let mut register = self.register.clone();
        register.next_serial = serial + 1;
        register.nodes.push(entry.clone());
        let recorded = (|| {
            let revocation = if previous.is_empty() {
                None
            } else {
                for e in register.nodes.iter_mut() {
                    if previous.contains(&e.serial) {
                        e.revoked = true;
                    }
                }
                Some(self.write_revocations(&mut register)?)
            };
            replace(&self.dir.join(REGISTER_FILE), &json(&register))?;
            Ok(revocation)
        })();
        let revocation = match recorded {
            Ok(revocation) => revocation,
            Err(e) => {
                let _ = fs::remove_file(out);
                return Err(e);
            }
        };
        self.register = register;
        Ok(Enrolled {
            identity,
            entry,
            revocation,
        })
    }

    /// Revokes every certificate issued to `name`: a new revocation list
    /// (sequence + 1) in `DIR/revoked.crl`, the register updated. Returns
    /// the revoked serials and the list's path.
    pub fn revoke(&mut self, name: &str) -> Result<(Vec<u64>, PathBuf), ClusterError> {
        let serials: Vec<u64> = self
            .register
            .nodes
            .iter()
            .filter(|e| e.name == name && !e.revoked)
            .map(|e| e.serial)
            .collect();
        if serials.is_empty() {
            return Err(ClusterError::UnknownNode(name.into()));
        }
        let mut register = self.register.clone();
        for e in register.nodes.iter_mut() {
            if serials.contains(&e.serial) {
                e.revoked = true;
            }
        }
        let path = self.write_revocations(&mut register)?;
        replace(&self.dir.join(REGISTER_FILE), &json(&register))?;
        self.register = register;
        Ok((serials, path))
    }

    /// Signs the list of `register`'s revoked serials with the next
    /// sequence and writes it to `DIR/revoked.crl`.
    fn write_revocations(&self, register: &mut Register) -> Result<PathBuf, ClusterError> {
        register.revocation_sequence += 1;
        let issued = now();
        let params = CertificateRevocationListParams {
            this_update: issued,
            next_update: issued + Duration::from_secs(CA_DAYS * 86_400),
            crl_number: SerialNumber::from(register.revocation_sequence),
            issuing_distribution_point: None,
            revoked_certs: register
                .nodes
                .iter()
                .filter(|e| e.revoked)
                .map(|e| RevokedCertParams {
                    serial_number: SerialNumber::from(e.serial),
                    revocation_time: issued,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        let list = RevocationList::from_der("new revocation list", crl.der(), &self.ca)?;
        let path = self.dir.join(REVOCATION_FILE);
        replace(&path, list.to_pem().unwrap_or_default().as_bytes())?;
        Ok(path)
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Writes an identity file (0600), refusing to overwrite one.
fn write_identity(path: &Path, identity: &NodeIdentity) -> Result<(), ClusterError> {
    if path.exists() {
        return Err(ClusterError::OutputExists(path.to_path_buf()));
    }
    sovereign_signing::write_secret_file(path, identity.to_pem().as_bytes()).map_err(|e| {
        ClusterError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        }
    })
}
