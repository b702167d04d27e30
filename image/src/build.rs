//! `sovereign image build`: spec → base root filesystem (cached) → node tree
//! → erofs + dm-verity → unified kernel image → GPT disk image → signed
//! manifest. Each step reports its time; the outputs appear in the output
//! directory only when every step succeeded.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sovereign_signing::SigningKey;

use crate::base::{self, package_names, BaseInputs};
use crate::disk;
use crate::error::BuildError;
use crate::lock::Lock;
use crate::manifest::{self, ImageFacts, Input, Manifest, FORMAT};
use crate::rootfs;
use crate::sources;
use crate::spec::{ImageSpec, Profile};
use crate::tool::{self, EFI_STUB};
use crate::tree::{self, binary_names, TreeInputs};

/// File names in the output directory.
pub const IMAGE_FILE: &str = "node.img";
/// The signed manifest (its signature is `node.manifest.json.sig`).
pub const MANIFEST_FILE: &str = "node.manifest.json";
/// The package lock of this build.
pub const LOCK_FILE: &str = "node.lock";
/// The listing of the root filesystem.
pub const LISTING_FILE: &str = "node.files";

/// What to build and where.
pub struct BuildRequest<'a> {
    /// The spec.
    pub spec: &'a ImageSpec,
    /// Relative paths of the spec are relative to this directory.
    pub spec_dir: &'a Path,
    /// A bundle trust file that replaces the spec's.
    pub bundle_trust: Option<&'a Path>,
    /// A cluster CA certificate that replaces the spec's `trust.cluster_ca`.
    pub cluster_ca: Option<&'a Path>,
    /// A lock file: install exactly its versions.
    pub lock: Option<&'a Path>,
    /// A mirror that replaces the spec's (and the host's sources).
    pub mirror: Option<&'a str>,
    /// Where the service binaries are.
    pub binaries: &'a Path,
    /// The output directory.
    pub out: &'a Path,
    /// Where base root filesystems are cached; `None` builds from scratch.
    pub cache: Option<&'a Path>,
    /// The build key that signs the manifest.
    pub key: &'a SigningKey,
    /// The image version.
    pub version: &'a str,
    /// The build host's `/etc` (apt sources, os-release).
    pub host_etc: &'a Path,
}

/// A progress event of a build.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A step starts.
    Start(&'a str),
    /// A step ended, with its time and a short result.
    Done(&'a str, Duration, String),
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The disk image.
    pub image: PathBuf,
    /// The signed manifest.
    pub manifest: PathBuf,
    /// The lock file written.
    pub lock: PathBuf,
    /// The root listing.
    pub listing: PathBuf,
    /// The verity root hash.
    pub root_hash: String,
    /// The image's sha256.
    pub sha256: String,
    /// The image's size in bytes.
    pub size: u64,
    /// Whether the base came from the cache.
    pub base_cached: bool,
}

fn read_input(field: &'static str, path: &Path) -> Result<Vec<u8>, BuildError> {
    fs::read(path).map_err(|e| BuildError::Trust {
        field,
        path: path.to_owned(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => {
                "not found (make one with `sovereign trust init`)".into()
            }
            _ => e.to_string(),
        },
    })
}

fn step<T>(
    progress: &mut dyn FnMut(Progress),
    name: &str,
    work: impl FnOnce() -> Result<(T, String), BuildError>,
) -> Result<T, BuildError> {
    progress(Progress::Start(name));
    let started = Instant::now();
    let (value, detail) = work()?;
    progress(Progress::Done(name, started.elapsed(), detail));
    Ok(value)
}

/// Checks that `bytes` is one PEM CA certificate (`sovereign cluster init`
/// makes `DIR/ca.pem`); nodes check identities against it.
fn check_ca_certificate(bytes: &[u8]) -> Result<(), String> {
    const HINT: &str = "not a PEM CA certificate (`sovereign cluster init` writes DIR/ca.pem)";
    let (rest, pem) = x509_parser::pem::parse_x509_pem(bytes).map_err(|_| HINT.to_string())?;
    if !String::from_utf8_lossy(rest).trim().is_empty() {
        return Err("holds more than the CA certificate".into());
    }
    let cert = pem.parse_x509().map_err(|_| HINT.to_string())?;
    if !cert.is_ca() {
        return Err("the certificate is not a CA certificate".into());
    }
    Ok(())
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Builds the image `request` describes.
pub fn build(
    request: &BuildRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<BuildReport, BuildError> {
    let mut with_ca;
    let spec = match request.cluster_ca {
        Some(path) => {
            with_ca = request.spec.clone();
            with_ca.trust.cluster_ca = path.display().to_string();
            &with_ca
        }
        None => request.spec,
    };
    let epoch = spec.source_date_epoch;
    if !is_root() {
        return Err(BuildError::NotRoot);
    }
    tool::check_tools()?;

    // Every input is read and checked before any long step starts.
    let trust_path = match request.bundle_trust {
        Some(path) => path.to_owned(),
        None => request.spec_dir.join(&spec.trust.bundle_trust),
    };
    let bundle_trust = read_input("trust.bundle_trust", &trust_path)?;
    sovereign_signing::TrustFile::parse(&String::from_utf8_lossy(&bundle_trust)).map_err(|e| {
        BuildError::Trust {
            field: "trust.bundle_trust",
            path: trust_path.clone(),
            reason: e.to_string(),
        }
    })?;
    let cluster_ca = match spec.trust.cluster_ca.as_str() {
        "" => None,
        path => {
            let path = request.spec_dir.join(path);
            let bytes = read_input("trust.cluster_ca", &path)?;
            check_ca_certificate(&bytes).map_err(|reason| BuildError::Trust {
                field: "trust.cluster_ca",
                path,
                reason,
            })?;
            Some(bytes)
        }
    };
    let mut binaries = Vec::new();
    for name in spec.services.iter().flat_map(|s| binary_names(*s)) {
        let path = request.binaries.join(name);
        let bytes =
            fs::read(&path).map_err(|_| BuildError::MissingBinary { path: path.clone() })?;
        binaries.push((*name, bytes));
    }
    let lock = match request.lock {
        Some(path) => {
            let text = fs::read_to_string(path).map_err(|e| BuildError::Lock {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            let lock = Lock::parse(path, &text)?;
            let bad = |reason: String| BuildError::Lock {
                path: path.to_owned(),
                reason,
            };
            if lock.suite != spec.suite {
                return Err(bad(format!(
                    "it locks {}, the spec builds {}",
                    lock.suite, spec.suite
                )));
            }
            for name in package_names(&spec.packages) {
                if !lock.packages.iter().any(|p| p.name == name) {
                    return Err(bad(format!("{name} is not in it (the spec needs it; build without --lock to resolve anew)")));
                }
            }
            Some((path, lock, manifest::sha256_hex(text.as_bytes())))
        }
        None => None,
    };
    let mirror = request.mirror.unwrap_or(&spec.mirror);
    let apt_sources = sources::resolve(mirror, &spec.suite, request.host_etc)?;
    let work = tempfile::Builder::new()
        .prefix("sovereign-image-")
        .tempdir()
        .map_err(BuildError::io("creating a work directory"))?;
    let work = work.path();

    let base_inputs = BaseInputs {
        suite: &spec.suite,
        sources: &apt_sources,
        packages: &spec.packages,
        lock: lock.as_ref().map(|(p, l, _)| (*p, l)),
        epoch,
    };
    let base = step(progress, "base root filesystem", || {
        let base = base::base(&base_inputs, request.cache, work)?;
        let detail = format!(
            "{} packages, kernel {}{}",
            base.packages.len(),
            base.kernel,
            if base.cached { " (cached)" } else { "" }
        );
        Ok((base, detail))
    })?;

    let tree_inputs = TreeInputs {
        spec,
        binaries: &binaries,
        bundle_trust: &bundle_trust,
        cluster_ca: cluster_ca.as_deref(),
        version: request.version,
        epoch,
    };
    let (tree, listing) = step(progress, "node tree", || {
        let tree = tree::assemble(&base, &tree_inputs, work)?;
        let listing = tree::listing(&tree.root)?;
        let detail = format!("{} paths", listing.lines().count());
        Ok(((tree, listing), detail))
    })?;

    let root = step(progress, "verified root (erofs + dm-verity)", || {
        let root = rootfs::pack(&tree.root, listing.as_bytes(), work, epoch)?;
        let size = fs::metadata(&root.data).map(|m| m.len()).unwrap_or(0);
        let detail = format!("{} MB, root hash {}", size / 1_000_000, root.root_hash);
        Ok((root, detail))
    })?;

    let cmdline = disk::kernel_cmdline(&root.root_hash)?;
    let uki = step(progress, "unified kernel image", || {
        let uki = disk::unified_kernel_image(
            &tree.vmlinuz,
            &tree.initrd,
            &tree.os_release,
            &cmdline,
            work,
            epoch,
        )?;
        let size = fs::metadata(&uki).map(|m| m.len()).unwrap_or(0);
        Ok((uki, format!("{} MB", size / 1_000_000)))
    })?;

    fs::create_dir_all(request.out).map_err(BuildError::io(format!(
        "creating {}",
        request.out.display()
    )))?;
    let staging = request.out.join(".build-partial");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)
        .map_err(BuildError::io(format!("creating {}", staging.display())))?;
    let result = (|| {
        let image = staging.join(IMAGE_FILE);
        let size = step(progress, "GPT disk image", || {
            let size = disk::disk_image(&uki, &root, work, &image, epoch)?;
            Ok((size, format!("{} MB", size / 1_000_000)))
        })?;
        let (manifest_bytes, signature, sha256) = step(progress, "signed manifest", || {
            let sha256 =
                manifest::sha256_file(&image).map_err(BuildError::io("hashing the image"))?;
            let mut inputs = vec![
                Input {
                    name: "bundle trust".into(),
                    sha256: manifest::sha256_hex(&bundle_trust),
                },
                Input {
                    name: "efi stub".into(),
                    sha256: manifest::sha256_file(Path::new(EFI_STUB))
                        .map_err(BuildError::io("hashing the EFI stub"))?,
                },
            ];
            if let Some(ca) = &cluster_ca {
                inputs.push(Input {
                    name: "cluster ca".into(),
                    sha256: manifest::sha256_hex(ca),
                });
            }
            for (name, bytes) in &binaries {
                inputs.push(Input {
                    name: format!("binary {name}"),
                    sha256: manifest::sha256_hex(bytes),
                });
            }
            if let Some((_, _, sha256)) = &lock {
                inputs.push(Input {
                    name: "lock".into(),
                    sha256: sha256.clone(),
                });
            }
            let manifest = Manifest {
                format: FORMAT.into(),
                image: ImageFacts {
                    file: IMAGE_FILE.into(),
                    size,
                    sha256: sha256.clone(),
                },
                profile: match spec.profile {
                    Profile::Production => "production".into(),
                    Profile::Test => "test".into(),
                },
                spec: serde_json::to_value(spec)
                    .map_err(|e| BuildError::Unexpected(format!("serialising the spec: {e}")))?,
                version: request.version.into(),
                source_date_epoch: epoch,
                kernel: base.kernel.clone(),
                cmdline: cmdline.clone(),
                verity_root_hash: root.root_hash.clone(),
                inputs,
                sources: apt_sources.iter().map(|s| s.line()).collect(),
                packages: base.packages.clone(),
            };
            let (bytes, signature) = manifest::sign(&manifest, request.key)?;
            Ok((
                (bytes, signature, sha256.clone()),
                format!("image sha256 {sha256}"),
            ))
        })?;
        let lock_text = Lock {
            suite: spec.suite.clone(),
            packages: base.packages.clone(),
        }
        .render();
        let manifest_path = staging.join(MANIFEST_FILE);
        for (path, bytes) in [
            (manifest_path.clone(), manifest_bytes),
            (
                manifest::signature_path(&manifest_path),
                signature.into_bytes(),
            ),
            (staging.join(LOCK_FILE), lock_text.into_bytes()),
            (staging.join(LISTING_FILE), listing.clone().into_bytes()),
        ] {
            fs::write(&path, bytes)
                .map_err(BuildError::io(format!("writing {}", path.display())))?;
        }
        Ok((size, sha256))
    })();
    let (size, sha256) = match result {
        Ok(done) => done,
        Err(error) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(error);
        }
    };
    let names = [
        IMAGE_FILE.to_owned(),
        MANIFEST_FILE.to_owned(),
        format!("{MANIFEST_FILE}.sig"),
        LOCK_FILE.to_owned(),
        LISTING_FILE.to_owned(),
    ];
    for name in &names {
        fs::rename(staging.join(name), request.out.join(name)).map_err(BuildError::io(format!(
            "moving {name} into {}",
            request.out.display()
        )))?;
    }
    let _ = fs::remove_dir_all(&staging);
    Ok(BuildReport {
        image: request.out.join(IMAGE_FILE),
        manifest: request.out.join(MANIFEST_FILE),
        lock: request.out.join(LOCK_FILE),
        listing: request.out.join(LISTING_FILE),
        root_hash: root.root_hash,
        sha256,
        size,
        base_cached: base.cached,
    })
}
