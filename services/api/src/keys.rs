//! API keys: the operator's keys file holds only hashes.
//!
//! One key per line, `NAME blake3:<hex of BLAKE3(key)>`; `#` starts a comment.
//! A request presents `Authorization: Bearer <key>`; its hash is compared with
//! the stored ones (BLAKE3 hashes compare in constant time).

use std::path::Path;

/// The accepted keys.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<(String, blake3::Hash)>,
}

impl ApiKeys {
    /// Reads a keys file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                format!(
                    "{}:{}: expected `NAME blake3:<64 hex digits>`",
                    path.display(),
                    n + 1
                )
            };
            let (name, hash) = line.split_once(' ').ok_or_else(bad)?;
            let hash = hash
                .trim()
                .strip_prefix("blake3:")
                .and_then(|h| blake3::Hash::from_hex(h).ok())
                .ok_or_else(bad)?;
            keys.push((name.to_owned(), hash));
        }
        if keys.is_empty() {
            return Err(format!("{} holds no keys", path.display()));
        }
        Ok(Self { keys })
    }

    /// The line to put in a keys file for `key`.
    pub fn line_for(name: &str, key: &str) -> String {
        format!("{name} blake3:{}", blake3::hash(key.as_bytes()).to_hex())
    }

    /// The name of the key presented, if it is accepted.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let hash = blake3::hash(presented.as_bytes());
        self.keys
            .iter()
            .find(|(_, h)| *h == hash)
            .map(|(n, _)| n.as_str())
    }
}

/// The key presented as `Authorization: Bearer <key>` (scheme case-insensitive), if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    match value.trim_start().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
        _ => None,
    }
}
