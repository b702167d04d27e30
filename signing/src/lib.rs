/*!
Keys, trust policy and the signed bundle format of Sovereign.

A bundle (`NAME-VERSION.sovb`, see `FORMAT.md`) carries a manifest and the model
files. Reading one goes through three types, so that nothing unverified can be
activated by mistake:

1. [`UnverifiedBundle::open`] parses the header and manifest and checks the
   structure (paths, sizes, parts) without trusting anything;
2. [`UnverifiedBundle::verify`] checks the ed25519 signatures against a
   [`Trust`] policy and returns a [`VerifiedBundle`] (its constructor is private);
3. [`VerifiedBundle::unpack`] streams the payload into a directory while hashing
   every byte and returns a [`VerifiedPayload`] only when all of them matched.

This crate depends on no other crate of the project.
*/
#![deny(missing_docs)]

mod arriving;
mod create;
mod error;
mod format;
mod keys;
mod manifest;
mod parts;
mod pipeline;
mod segments;
pub mod stick;
mod trust;
mod verify;

pub use arriving::Arrival;
pub use create::{create_bundle, sign_bundle, BundleSpec, SignOutcome, DEFAULT_PART_SIZE};
pub use error::{BundleError, KeyError, TrustError};
pub use format::{is_bundle_file_name, is_part_file_name, BUNDLE_EXTENSION};
pub use keys::{
    generate_age_identity, generate_signing_key, read_age_identity, read_age_recipient,
    read_public_key, read_signing_key, write_secret_file, PublicKey, SigningKey,
};
pub use manifest::{validate_name, Encryption, FileEntry, Manifest, MAX_MANIFEST_LEN};
pub use segments::DEFAULT_SEGMENT_SIZE;
pub use trust::{Trust, TrustFile};
pub use verify::{UnverifiedBundle, VerifiedBundle, VerifiedPayload};
