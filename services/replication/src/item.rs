//! What is replicated: an item (a bundle's files, or a trust file) described
//! by its kind, name, version, digest and file sizes. Descriptions come from
//! peers, so [`ItemMeta::validate`] checks every field before any is used in a
//! path or a size computation.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sovereign_signing::{is_bundle_file_name, validate_name, UnverifiedBundle};

use crate::error::{describe, ReplicationError};

/// Most files in one item (a bundle and its parts: at most 1 + 999).
const MAX_FILES: usize = 1000;
/// Largest trust file accepted over the ring.
pub(crate) const MAX_TRUST_LEN: u64 = 64 * 1024;
/// Largest revocation list accepted over the ring.
pub(crate) const MAX_CRL_LEN: u64 = 1 << 20;
/// The file name a revocation item carries.
pub(crate) const CRL_FILE: &str = "ring.crl";
/// The file name a trust item carries.
pub(crate) const TRUST_FILE: &str = "ring.trust";

/// What an item is, which decides how it is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A signed bundle file and its continuation parts.
    Bundle,
    /// A trust file (a signed successor of the installed one).
    Trust,
    /// The cluster CA's revocation list.
    Revocations,
}

/// One file of an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// The file name (no directories).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A replicated item as offered: identical on every node that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMeta {
    /// How it is imported.
    pub kind: Kind,
    /// The model name (`trust` for a trust file).
    pub name: String,
    /// The model's semantic version, or the trust file's sequence.
    pub version: String,
    /// BLAKE3 of the signed manifest bytes (bundle) or of the whole file (trust).
    pub digest: String,
    /// Bytes the import writes into the store (the model files).
    pub content: u64,
    /// The files, in order; a byte offset of the item runs across them.
    pub files: Vec<FileMeta>,
}

impl ItemMeta {
    /// A bundle item `m@1.0.0` of files `m.sovb`, `m.sovb.001`, ... of `sizes`.
    #[cfg(test)]
    pub(crate) fn for_tests(sizes: &[u64]) -> Self {
        Self {
            kind: Kind::Bundle,
            name: "m".into(),
            version: "1.0.0".into(),
            digest: "0".repeat(64),
            content: 0,
            files: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| FileMeta {
                    name: if i == 0 {
                        "m.sovb".into()
                    } else {
                        format!("m.sovb.{i:03}")
                    },
                    size,
                })
                .collect(),
        }
    }

    /// `NAME@VERSION`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The item's directory name in a spool: unique per content.
    pub fn key(&self) -> String {
        let kind = match self.kind {
            Kind::Bundle => "bundle",
            Kind::Trust => "trust",
            Kind::Revocations => "crl",
        };
        format!(
            "{kind}-{}-{}-{}",
            self.name,
            self.version,
            &self.digest[..16]
        )
    }

    /// Bytes of all files together.
    pub fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// `(file index, offset in it)` of byte `offset` of the item; `None` at
    /// or past the end.
    pub fn locate(&self, mut offset: u64) -> Option<(usize, u64)> {
        for (index, file) in self.files.iter().enumerate() {
            if offset < file.size {
                return Some((index, offset));
            }
            offset -= file.size;
        }
        None
    }

    /// Checks every field of a description received from a peer.
    pub fn validate(&self) -> Result<(), ReplicationError> {
        let bad = |what: String| Err(ReplicationError::Malformed(what));
        if self.digest.len() != 64 || !self.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("digest is not 64 hex digits".into());
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return bad(format!("{} files in one item", self.files.len()));
        }
        let mut total = 0u64;
        for file in &self.files {
            total = match total.checked_add(file.size) {
                Some(t) => t,
                None => return bad("file sizes overflow".into()),
            };
        }
        match self.kind {
            Kind::Bundle => {
                validate_name(&self.name).map_err(|e| ReplicationError::Malformed(describe(&e)))?;
                if self.version.parse::<semver::Version>().is_err() {
                    return bad(format!("version {:?} is not semantic", self.version));
                }
                let first = &self.files[0].name;
                if !is_bundle_file_name(first) || first.contains('/') {
                    return bad(format!("{first:?} is not a bundle file name"));
                }
                for (index, file) in self.files.iter().enumerate().skip(1) {
                    if file.name != format!("{first}.{index:03}") {
                        return bad(format!("{:?} is not part {index} of {first}", file.name));
                    }
                }
            }
            Kind::Trust => {
                if self.name != "trust" || self.version.parse::<u64>().is_err() {
                    return bad(format!("trust item {} is not trust@SEQUENCE", self.id()));
                }
                if self.files.len() != 1
                    || self.files[0].name != TRUST_FILE
                    || total > MAX_TRUST_LEN
                {
                    return bad("a trust item is one small ring.trust file".into());
                }
            }
            Kind::Revocations => {
                if self.name != "revocations" || self.version.parse::<u64>().is_err() {
                    return bad(format!("item {} is not revocations@SEQUENCE", self.id()));
                }
                if self.files.len() != 1 || self.files[0].name != CRL_FILE || total > MAX_CRL_LEN {
                    return bad("a revocation item is one ring.crl file of at most 1 MiB".into());
                }
            }
        }
        Ok(())
    }

    /// Describes the bundle whose first file is `first` inside `dir` (its
    /// parts beside it). The manifest is parsed, nothing is trusted yet.
    pub fn from_bundle(dir: &Path, first: &str) -> Result<Self, ReplicationError> {
        let path = dir.join(first);
        let bundle = UnverifiedBundle::open(&path).map_err(|e| ReplicationError::Outbox {
            path: path.clone(),
            reason: describe(&e),
        })?;
        let manifest = bundle.manifest();
        let mut files = Vec::new();
        for index in 0..bundle.part_count() {
            let name = if index == 0 {
                first.to_owned()
            } else {
                format!("{first}.{index:03}")
            };
            let part = dir.join(&name);
            let size = fs::metadata(&part)
                .map_err(|e| ReplicationError::io(&part, e))?
                .len();
            files.push(FileMeta { name, size });
        }
        let meta = Self {
            kind: Kind::Bundle,
            name: manifest.name.clone(),
            version: manifest.version.to_string(),
            digest: blake3::hash(bundle.manifest_bytes()).to_hex().to_string(),
            content: manifest.content_size(),
            files,
        };
        meta.validate()?;
        Ok(meta)
    }

    /// Describes a trust file's or revocation list's text.
    pub fn from_text(kind: Kind, text: &str, sequence: u64) -> Self {
        let (name, file) = match kind {
            Kind::Revocations => ("revocations", CRL_FILE),
            _ => ("trust", TRUST_FILE),
        };
        Self {
            kind,
            name: name.into(),
            version: sequence.to_string(),
            digest: blake3::hash(text.as_bytes()).to_hex().to_string(),
            content: 0,
            files: vec![FileMeta {
                name: file.into(),
                size: text.len() as u64,
            }],
        }
    }
}
