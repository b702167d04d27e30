//! The trust policy: which signers are accepted, how many must sign, and its sequence.
//!
//! A trust file is a signed note: a text body, a blank line, then one signature
//! line per signer (`— ed25519:<key> <base64 signature over the body>`).
//!
//! ```text
//! sovereign-trust/1
//! sequence 2
//! threshold 2
//! signer ed25519:...
//! signer ed25519:...
//!
//! — ed25519:... <signature>
//! ```
//!
//! The first trust file of a store is installed by the operator and needs no
//! signatures. A later one replaces it only if its sequence is higher and at
//! least the *current* threshold of the *current* signers signed it.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::error::TrustError;
use crate::keys::{PublicKey, SigningKey};

const HEADER: &str = "sovereign-trust/1";
const SIGNATURE_MARK: &str = "\u{2014} ";
const MAX_SIGNERS: usize = 64;
const MAX_TRUST_FILE_LEN: usize = 64 * 1024;

/// The accepted signers and the number of signatures a bundle needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trust {
    /// Increases with every rotation; an older trust file is never accepted again.
    pub sequence: u64,
    /// Signatures by distinct signers required (m of n).
    pub threshold: usize,
    /// The accepted signer keys, unique.
    pub signers: Vec<PublicKey>,
}

impl Trust {
    /// Builds a trust policy, checking `1 <= threshold <= signers` and unique signers.
    pub fn new(
        sequence: u64,
        threshold: usize,
        signers: Vec<PublicKey>,
    ) -> Result<Self, TrustError> {
        let trust = Self {
            sequence,
            threshold,
            signers,
        };
        trust.validate()?;
        Ok(trust)
    }

    fn validate(&self) -> Result<(), TrustError> {
        if self.signers.is_empty() {
            return Err(TrustError::Malformed("no signers".into()));
        }
        if self.signers.len() > MAX_SIGNERS {
            return Err(TrustError::Malformed(format!(
                "{} signers, at most {MAX_SIGNERS}",
                self.signers.len()
            )));
        }
        let unique: BTreeSet<[u8; 32]> = self.signers.iter().map(PublicKey::to_bytes).collect();
        if unique.len() != self.signers.len() {
            return Err(TrustError::Malformed("a signer is listed twice".into()));
        }
        if self.threshold == 0 || self.threshold > self.signers.len() {
            return Err(TrustError::Malformed(format!(
                "threshold {} must be between 1 and the number of signers ({})",
                self.threshold,
                self.signers.len()
            )));
        }
        if self.sequence == 0 {
            return Err(TrustError::Malformed("sequence must be at least 1".into()));
        }
        Ok(())
    }

    /// Whether `key` is one of the accepted signers.
    pub fn is_signer(&self, key: &PublicKey) -> bool {
        self.signers.contains(key)
    }

    /// Counts distinct accepted signers whose signature over `message` verifies.
    /// A signature by an accepted signer that does not verify is an error naming
    /// that signer (it was made over something else); signatures by other keys
    /// are returned apart.
    pub fn count_signatures<'a>(
        &self,
        message: &[u8],
        signatures: impl IntoIterator<Item = (&'a PublicKey, &'a [u8; 64])>,
    ) -> Result<SignatureCount, String> {
        let mut valid = BTreeSet::new();
        let mut unknown = Vec::new();
        for (key, signature) in signatures {
            if !self.is_signer(key) {
                unknown.push(*key);
            } else if key.verify(message, signature) {
                valid.insert(key.to_bytes());
            } else {
                return Err(key.to_string());
            }
        }
        Ok(SignatureCount {
            valid: valid.len(),
            unknown,
        })
    }

    fn render_body(&self) -> String {
        let mut body = format!(
            "{HEADER}\nsequence {}\nthreshold {}\n",
            self.sequence, self.threshold
        );
        for signer in &self.signers {
            let _ = writeln!(body, "signer {signer}");
        }
        body
    }
}

/// The result of [`Trust::count_signatures`].
#[derive(Debug)]
pub struct SignatureCount {
    /// Distinct accepted signers with a valid signature.
    pub valid: usize,
    /// Signers that the policy does not list.
    pub unknown: Vec<PublicKey>,
}

/// A trust file: the policy, its exact body bytes and the signatures over them.
#[derive(Clone, Debug)]
pub struct TrustFile {
    trust: Trust,
    body: String,
    signatures: Vec<(PublicKey, [u8; 64])>,
}

impl TrustFile {
    /// An unsigned trust file for `trust`.
    pub fn new(trust: Trust) -> Self {
        Self {
            body: trust.render_body(),
            trust,
            signatures: Vec::new(),
        }
    }

    /// The policy it states.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Adds (or replaces) `key`'s signature over the body.
    pub fn sign(&mut self, key: &SigningKey) {
        let public = key.public_key();
        self.signatures.retain(|(k, _)| *k != public);
        self.signatures
            .push((public, key.sign(self.body.as_bytes())));
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut text = self.body.clone();
        text.push('\n');
        for (key, signature) in &self.signatures {
            let _ = writeln!(text, "{SIGNATURE_MARK}{key} {}", B64.encode(signature));
        }
        text
    }

    /// Parses a trust file, strictly: the body must be exactly as this crate writes it.
    pub fn parse(text: &str) -> Result<Self, TrustError> {
        let bad = |reason: &str| TrustError::Malformed(reason.to_owned());
        if text.len() > MAX_TRUST_FILE_LEN {
            return Err(bad("larger than 64 KiB"));
        }
        let (body, signature_block) = text
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line after the body"))?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad("first line must be `sovereign-trust/1`"));
        }
        let field = |line: Option<&str>, name: &str| -> Result<u64, TrustError> {
            line.and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .and_then(|v| v.parse::<u64>().ok().filter(|n| n.to_string() == v))
                .ok_or_else(|| TrustError::Malformed(format!("expected `{name} <number>`")))
        };
        let sequence = field(lines.next(), "sequence")?;
        let threshold = field(lines.next(), "threshold")?;
        let signers = lines
            .map(|line| {
                line.strip_prefix("signer ")
                    .ok_or_else(|| bad("expected `signer ed25519:...`"))?
                    .parse::<PublicKey>()
                    .map_err(|e| TrustError::Malformed(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = usize::try_from(threshold).map_err(|_| bad("threshold too large"))?;
        let trust = Trust::new(sequence, threshold, signers)?;
        if trust.render_body() != body {
            return Err(bad("body is not in canonical form"));
        }
        let mut signatures = Vec::new();
        for line in signature_block.lines().filter(|l| !l.is_empty()) {
            let rest = line
                .strip_prefix(SIGNATURE_MARK)
                .ok_or_else(|| bad("signature lines start with `— `"))?;
            let (key, signature) = rest
                .split_once(' ')
                .ok_or_else(|| bad("signature line needs a key and a signature"))?;
            let key: PublicKey = key
                .parse()
                .map_err(|e: crate::KeyError| TrustError::Malformed(e.to_string()))?;
            let signature: [u8; 64] = B64
                .decode(signature)
                .ok()
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad("signature is not 64 bytes of base64"))?;
            signatures.push((key, signature));
        }
        Ok(Self {
            trust,
            body,
            signatures,
        })
    }

    /// Checks that `next` may replace this trust file: a higher sequence and at
    /// least this file's threshold of this file's signers signed `next`.
    pub fn accepts_successor(&self, next: &TrustFile) -> Result<(), TrustError> {
        if next.trust.sequence <= self.trust.sequence {
            return Err(TrustError::NotNewer {
                offered: next.trust.sequence,
                installed: self.trust.sequence,
            });
        }
        let count = self
            .trust
            .count_signatures(
                next.body.as_bytes(),
                next.signatures.iter().map(|(k, s)| (k, s)),
            )
            .map_err(TrustError::BadSignature)?;
        if count.valid < self.trust.threshold {
            return Err(TrustError::TooFewSignatures {
                sequence: next.trust.sequence,
                found: count.valid,
                needed: self.trust.threshold,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32])
    }

    fn trust_of(sequence: u64, threshold: usize, keys: &[&SigningKey]) -> TrustFile {
        TrustFile::new(
            Trust::new(
                sequence,
                threshold,
                keys.iter().map(|k| k.public_key()).collect(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn text_round_trips() {
        let (a, b) = (key(1), key(2));
        let mut file = trust_of(3, 2, &[&a, &b]);
        file.sign(&a);
        let parsed = TrustFile::parse(&file.to_text()).unwrap();
        assert_eq!(parsed.trust(), file.trust());
        assert_eq!(parsed.to_text(), file.to_text());
    }

    #[test]
    fn rotation_needs_current_threshold_and_higher_sequence() {
        let (a, b, c) = (key(1), key(2), key(3));
        let current = trust_of(1, 2, &[&a, &b]);
        let mut next = trust_of(2, 1, &[&c]);
        assert!(matches!(
            current.accepts_successor(&next),
            Err(TrustError::TooFewSignatures {
                found: 0,
                needed: 2,
                ..
            })
        ));
        next.sign(&a);
        next.sign(&c); // the new signer's signature does not count
        assert!(matches!(
            current.accepts_successor(&next),
            Err(TrustError::TooFewSignatures { found: 1, .. })
        ));
        next.sign(&b);
        current.accepts_successor(&next).unwrap();
        let mut older = trust_of(1, 1, &[&c]);
        older.sign(&a);
        older.sign(&b);
        assert!(matches!(
            current.accepts_successor(&older),
            Err(TrustError::NotNewer {
                offered: 1,
                installed: 1
            })
        ));
    }

    #[test]
    fn a_signature_over_another_body_is_rejected() {
        let (a, b) = (key(1), key(2));
        let current = trust_of(1, 1, &[&a]);
        let mut next = trust_of(2, 1, &[&b]);
        next.sign(&a);
        let tampered =
            TrustFile::parse(&next.to_text().replace("sequence 2", "sequence 9")).unwrap();
        assert!(matches!(
            current.accepts_successor(&tampered),
            Err(TrustError::BadSignature(_))
        ));
    }

    #[test]
    fn malformed_files_are_refused() {
        let a = key(1);
        let good = trust_of(1, 1, &[&a]).to_text();
        for bad in [
            String::new(),
            good.replace("sovereign-trust/1", "sovereign-trust/2"),
            good.replace("threshold 1", "threshold 2"),
            good.replace("threshold 1", "threshold 0"),
            good.replace("sequence 1", "sequence 01"),
            good.replace("\n\n", "\n"),
            format!("{good}— ed25519:zz zz\n"),
        ] {
            assert!(TrustFile::parse(&bad).is_err(), "accepted {bad:?}");
        }
    }
}
