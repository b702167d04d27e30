//! Ed25519 signing keys and age identities, in small text files.
//!
//! - secret key: `sovereign-ed25519-secret-key:<base64 seed>` (mode 0600)
//! - public key: `ed25519:<base64 key>` (also accepted inline on the CLI)
//! - age identity: age's own format (`AGE-SECRET-KEY-1...`), recipient `age1...`

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::Signer;

use crate::error::KeyError;

const SECRET_PREFIX: &str = "sovereign-ed25519-secret-key:";
const PUBLIC_PREFIX: &str = "ed25519:";

/// An ed25519 public key, written `ed25519:<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// The raw 32 bytes of the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Parses raw key bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| malformed("public key", "not a valid ed25519 point"))
    }

    /// Verifies a signature over `message` (strict: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let encoded = text
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| malformed(text, "a public key starts with `ed25519:`"))?;
        let bytes: [u8; 32] = B64
            .decode(encoded)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| malformed(text, "not 32 bytes of base64"))?;
        Self::from_bytes(&bytes)
    }
}

/// An ed25519 signing key.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// The 32-byte seed, for callers that keep keys in other formats.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Builds a key from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The text of a secret key file (keep it 0600).
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", B64.encode(self.0.to_bytes()))
    }
}

/// Generates an ed25519 key pair: the secret at `path` (0600), the public key at `path.pub`.
pub fn generate_signing_key(path: &Path) -> Result<PublicKey, KeyError> {
    let key = SigningKey(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng));
    let public = key.public_key();
    write_key_pair(path, key.to_text().as_bytes(), &format!("{public}\n"))?;
    Ok(public)
}

/// Generates an age X25519 identity: the identity at `path` (0600), the recipient at `path.pub`.
/// Returns the recipient string (`age1...`).
pub fn generate_age_identity(path: &Path) -> Result<String, KeyError> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let secret = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    write_key_pair(path, secret.as_bytes(), &format!("{recipient}\n"))?;
    Ok(recipient)
}

fn write_key_pair(path: &Path, secret: &[u8], public: &str) -> Result<(), KeyError> {
    let public_path = path.with_file_name(format!(
        "{}.pub",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    if public_path.exists() {
        return Err(KeyError::Exists(public_path));
    }
    write_secret_file(path, secret)?;
    fs::write(&public_path, public).map_err(|source| {
        let _ = fs::remove_file(path);
        KeyError::Io {
            path: public_path,
            source,
        }
    })
}

/// Writes `contents` to a new file readable only by its owner (0600), refusing to overwrite.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(path);
            io(e)
        })
}

/// Reads a secret file, refusing one that other users can access.
fn read_secret_file(path: &Path) -> Result<String, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let metadata = fs::metadata(path).map_err(io)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::LoosePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io)
}

/// Reads an ed25519 secret key file written by [`generate_signing_key`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_secret_file(path)?;
    let what = path.display().to_string();
    let encoded = text
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| malformed(&what, "not a Sovereign ed25519 secret key"))?;
    let seed: [u8; 32] = B64
        .decode(encoded)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| malformed(&what, "secret key is not 32 bytes of base64"))?;
    Ok(SigningKey::from_seed(&seed))
}

/// Reads a public key given inline (`ed25519:...`) or as a path to a `.pub` file.
pub fn read_public_key(arg: &str) -> Result<PublicKey, KeyError> {
    if arg.starts_with(PUBLIC_PREFIX) {
        return arg.parse();
    }
    let text = fs::read_to_string(arg).map_err(|source| KeyError::Io {
        path: arg.into(),
        source,
    })?;
    text.parse()
        .map_err(|_| malformed(arg, "not an ed25519 public key file"))
}

/// Reads an age identity file (age's format; comment lines allowed).
pub fn read_age_identity(path: &Path) -> Result<age::x25519::Identity, KeyError> {
    let text = read_secret_file(path)?;
    let what = path.display().to_string();
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'));
    let line = lines
        .next()
        .ok_or_else(|| malformed(&what, "no age identity in the file"))?;
    line.parse::<age::x25519::Identity>()
        .map_err(|_| malformed(&what, "not an age X25519 identity (AGE-SECRET-KEY-1...)"))
}

/// Reads an age recipient given inline (`age1...`) or as a path to a file holding one.
pub fn read_age_recipient(arg: &str) -> Result<age::x25519::Recipient, KeyError> {
    let text = if arg.starts_with("age1") {
        arg.to_owned()
    } else {
        fs::read_to_string(arg).map_err(|source| KeyError::Io {
            path: arg.into(),
            source,
        })?
    };
    text.trim()
        .parse::<age::x25519::Recipient>()
        .map_err(|_| malformed(arg, "not an age X25519 recipient (age1...)"))
}

fn malformed(what: &str, reason: &str) -> KeyError {
    KeyError::Malformed {
        what: what.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_key_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let public = generate_signing_key(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = read_signing_key(&path).unwrap();
        assert_eq!(key.public_key(), public);
        let from_file = read_public_key(dir.path().join("k.pub").to_str().unwrap()).unwrap();
        assert_eq!(from_file, public);
        let signature = key.sign(b"hello");
        assert!(public.verify(b"hello", &signature));
        assert!(!public.verify(b"hellp", &signature));
    }

    #[test]
    fn refuses_to_overwrite_and_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate_signing_key(&path).unwrap();
        assert!(matches!(
            generate_signing_key(&path),
            Err(KeyError::Exists(_))
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_signing_key(&path).err().unwrap();
        assert!(
            matches!(err, KeyError::LoosePermissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn age_identity_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let recipient = generate_age_identity(&path).unwrap();
        let identity = read_age_identity(&path).unwrap();
        assert_eq!(identity.to_public().to_string(), recipient);
        assert_eq!(
            read_age_recipient(&recipient).unwrap().to_string(),
            recipient
        );
    }

    #[test]
    fn malformed_public_keys_are_refused() {
        for text in [
            "",
            "ed25519:",
            "ed25519:AAAA",
            "ssh-ed25519 AAAA",
            "ed25519:!!!!",
        ] {
            assert!(text.parse::<PublicKey>().is_err(), "{text:?} accepted");
        }
    }
}
