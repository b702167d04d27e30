//! The bundle manifest: what a bundle holds, in JSON, signed byte for byte.
//!
//! Validation here trusts nothing: names, versions, paths, counts and sizes
//! are all checked before any payload byte is read.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::BundleError;

/// The `format` value of every manifest this crate writes and reads.
pub const FORMAT: &str = "sovereign-bundle/1";
/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_LEN: usize = 1 << 20;
/// The most files one bundle may hold.
pub const MAX_FILES: usize = 4096;
const MAX_PATH_LEN: usize = 1024;
const MAX_COMPONENT_LEN: usize = 255;
/// Smallest part size (the tests use small parts; real bundles use 4 GiB).
pub const MIN_PART_SIZE: u64 = 64 * 1024;
/// Largest part size: a FAT32 file holds at most 4 GiB - 1 byte.
pub const MAX_PART_SIZE: u64 = u32::MAX as u64;
/// Smallest plaintext segment of an encrypted payload.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// Largest plaintext segment (bounds the reader's memory).
pub const MAX_SEGMENT_SIZE: u64 = 256 << 20;
/// Upper bound on age's framing overhead relative to the plaintext (16-byte tag
/// per 64 KiB chunk, plus a header of at most this many bytes).
const AGE_HEADER_ALLOWANCE: u64 = 64 * 1024;

/// A bundle manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Model name: lowercase letters, digits, `.`, `_`, `-`; at most 64 bytes.
    pub name: String,
    /// Semantic version of this model release.
    pub version: semver::Version,
    /// Creation time, RFC 3339 UTC (advisory).
    pub created: String,
    /// Size of every part but the last, in bytes.
    pub part_size: u64,
    /// The payload as stored after the header.
    pub payload: Payload,
    /// The files, in payload order.
    pub files: Vec<FileEntry>,
}

/// The stored payload: the files' bytes concatenated, possibly age-encrypted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Bytes stored after the header.
    pub size: u64,
    /// How the payload is encoded.
    pub encryption: Encryption,
}

/// Payload encryption.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Encryption {
    /// The payload is the plain concatenation of the files.
    None,
    /// The concatenation cut into segments of `segment_size` bytes, each an
    /// age file (X25519 recipients) of its own, so segments decrypt in parallel.
    Age {
        /// BLAKE3 of the stored ciphertext (all segments), hex.
        blake3: String,
        /// Plaintext bytes per segment (the last may be shorter).
        segment_size: u64,
        /// Ciphertext length of every segment, in order.
        segments: Vec<u64>,
    },
}

/// One file of the bundle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path with `/` separators; no `.`, `..`, empty or absolute parts.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the content, hex (verifies while streaming, hashes in parallel).
    pub blake3: String,
}

impl Manifest {
    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(BundleError::Malformed(format!(
                "manifest is {} bytes, at most {MAX_MANIFEST_LEN}",
                bytes.len()
            )));
        }
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| BundleError::Malformed(format!("manifest is not valid: {e}")))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The canonical bytes of this manifest (what is signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Sum of the file sizes (the plaintext payload size).
    pub fn content_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Checks every field; see the module documentation.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |reason: String| Err(BundleError::Malformed(reason));
        if self.format != FORMAT {
            return bad(format!("unknown bundle format {:?}", self.format));
        }
        validate_name(&self.name)?;
        if time::OffsetDateTime::parse(
            &self.created,
            &time::format_description::well_known::Rfc3339,
        )
        .is_err()
        {
            return bad(format!("created time {:?} is not RFC 3339", self.created));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return bad(format!(
                "part size {} is outside {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                self.part_size
            ));
        }
        if self.files.is_empty() {
            return bad("manifest lists no files".into());
        }
        if self.files.len() > MAX_FILES {
            return bad(format!("{} files, at most {MAX_FILES}", self.files.len()));
        }
        let mut total: u64 = 0;
        let mut paths = BTreeSet::new();
        for file in &self.files {
            validate_path(&file.path)?;
            if !is_hex_hash(&file.blake3) {
                return bad(format!("hash of {} is not 64 hex digits", file.path));
            }
            if !paths.insert(file.path.as_str()) {
                return bad(format!("file {} is listed twice", file.path));
            }
            total = total
                .checked_add(file.size)
                .ok_or_else(|| BundleError::Malformed("file sizes overflow".into()))?;
        }
        for path in &paths {
            let mut prefix = String::new();
            for component in path
                .split('/')
                .collect::<Vec<_>>()
                .split_last()
                .map_or(&[][..], |(_, dirs)| dirs)
            {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(component);
                if paths.contains(prefix.as_str()) {
                    return bad(format!("{prefix} is both a file and a directory"));
                }
            }
        }
        match &self.payload.encryption {
            Encryption::None if self.payload.size != total => bad(format!(
                "payload size {} differs from the files' total {total}",
                self.payload.size
            )),
            Encryption::None => Ok(()),
            Encryption::Age {
                blake3,
                segment_size,
                segments,
            } => {
                if !is_hex_hash(blake3) {
                    return bad("payload hash is not 64 hex digits".into());
                }
                validate_segments(total, self.payload.size, *segment_size, segments)
            }
        }
    }
}

/// Checks the segment table of an encrypted payload against the plaintext
/// size `total` and the stored size `stored`.
fn validate_segments(
    total: u64,
    stored: u64,
    segment_size: u64,
    segments: &[u64],
) -> Result<(), BundleError> {
    let bad = |reason: String| Err(BundleError::Malformed(reason));
    if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
        return bad(format!(
            "segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
        ));
    }
    let expected = total.div_ceil(segment_size).max(1);
    if segments.len() as u64 != expected {
        return bad(format!(
            "{} encrypted segments listed, {expected} expected for {total} bytes",
            segments.len()
        ));
    }
    let mut sum: u64 = 0;
    for (index, &length) in segments.iter().enumerate() {
        let plain = total
            .saturating_sub(index as u64 * segment_size)
            .min(segment_size);
        if length <= plain || length > plain + plain / 4096 + AGE_HEADER_ALLOWANCE {
            return bad(format!(
                "encrypted segment {index} claims {length} bytes, impossible for {plain} bytes of plaintext"
            ));
        }
        sum = sum
            .checked_add(length)
            .ok_or_else(|| BundleError::Malformed("segment sizes overflow".into()))?;
    }
    if sum != stored {
        return bad(format!(
            "encrypted segments total {sum} bytes but the payload is {stored}"
        ));
    }
    Ok(())
}

/// Checks a model name.
pub fn validate_name(name: &str) -> Result<(), BundleError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(BundleError::Malformed(format!(
            "model name {name:?} must be 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

fn validate_path(path: &str) -> Result<(), BundleError> {
    let reject = |why: &str| Err(BundleError::Malformed(format!("file path {path:?} {why}")));
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return reject("is empty or too long");
    }
    if path.starts_with('/') {
        return reject("is absolute");
    }
    for component in path.split('/') {
        match component {
            "" => return reject("has an empty component"),
            "." | ".." => return reject("escapes the store"),
            c if c.len() > MAX_COMPONENT_LEN => return reject("has a component over 255 bytes"),
            c if c.chars().any(|ch| ch.is_control() || ch == '\\') => {
                return reject("contains a control character or backslash")
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_hex_hash(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(paths: &[&str]) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            name: "demo".into(),
            version: "1.0.0".parse().unwrap(),
            created: "2026-01-01T00:00:00Z".into(),
            part_size: MIN_PART_SIZE,
            payload: Payload {
                size: paths.len() as u64,
                encryption: Encryption::None,
            },
            files: paths
                .iter()
                .map(|p| FileEntry {
                    path: (*p).into(),
                    size: 1,
                    blake3: "0".repeat(64),
                })
                .collect(),
        }
    }

    fn check(paths: &[&str], expected: Option<&str>) {
        let result = Manifest::parse(&manifest(paths).to_bytes());
        match (result, expected) {
            (Ok(_), None) => {}
            (Err(e), Some(fragment)) => assert!(e.to_string().contains(fragment), "{e}"),
            (r, e) => panic!("{paths:?}: got {r:?}, expected {e:?}"),
        }
    }

    #[test]
    fn paths_are_checked() {
        check(&["model.gguf", "tok/tokenizer.json"], None);
        check(&["../x"], Some("escapes"));
        check(&["a/../../x"], Some("escapes"));
        check(&["/etc/passwd"], Some("absolute"));
        check(&["a//b"], Some("empty component"));
        check(&["a", "a"], Some("listed twice"));
        check(&["a", "a/b"], Some("both a file and a directory"));
        check(&["a\\..\\b"], Some("backslash"));
        check(&[], Some("no files"));
    }

    #[test]
    fn sizes_are_checked() {
        let mut m = manifest(&["a"]);
        m.payload.size = 1 << 40;
        assert!(Manifest::parse(&m.to_bytes()).is_err());
        let mut m = manifest(&["a", "b"]);
        m.files[0].size = u64::MAX;
        assert!(Manifest::parse(&m.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("overflow"));
        let mut m = manifest(&["a"]);
        m.part_size = 1;
        assert!(Manifest::parse(&m.to_bytes()).is_err());
    }

    #[test]
    fn segment_tables_are_checked() {
        let mut m = manifest(&["a"]);
        m.files[0].size = 200_000;
        let segment = |lengths: Vec<u64>| Encryption::Age {
            blake3: "0".repeat(64),
            segment_size: MIN_SEGMENT_SIZE,
            segments: lengths,
        };
        let good = vec![65_700, 65_700, 65_700, 3_500];
        m.payload = Payload {
            size: good.iter().sum(),
            encryption: segment(good.clone()),
        };
        Manifest::parse(&m.to_bytes()).unwrap();
        let cases = [
            (
                vec![65_700, 65_700, 65_700],
                "3 encrypted segments listed, 4 expected",
            ),
            (vec![65_700, 65_700, 65_700, 3_000], "impossible"),
            (vec![65_536, 65_700, 65_700, 3_500], "impossible"),
            (vec![u64::MAX, 65_700, 65_700, 3_500], "impossible"),
        ];
        for (lengths, fragment) in cases {
            m.payload = Payload {
                size: lengths.iter().fold(0u64, |a, b| a.wrapping_add(*b)),
                encryption: segment(lengths),
            };
            let err = Manifest::parse(&m.to_bytes()).unwrap_err().to_string();
            assert!(err.contains(fragment), "{err}");
        }
        m.payload = Payload {
            size: 1,
            encryption: segment(good),
        };
        let err = Manifest::parse(&m.to_bytes()).unwrap_err().to_string();
        assert!(err.contains("but the payload is 1"), "{err}");
    }

    #[test]
    fn unknown_fields_and_names_are_refused() {
        let text = String::from_utf8(manifest(&["a"]).to_bytes()).unwrap();
        let extra = text.replacen('{', "{\"extra\": 1,", 1);
        assert!(Manifest::parse(extra.as_bytes()).is_err());
        for name in ["", "Demo", "-x", "a b", &"x".repeat(65)] {
            assert!(validate_name(name).is_err(), "{name:?}");
        }
    }
}
