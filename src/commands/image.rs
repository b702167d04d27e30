//! `sovereign image build|verify`: the node image from a spec, and checking
//! an image against its signed build manifest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use sovereign_image::{BuildRequest, ImageSpec, Profile, Progress, DEFAULT_SPEC};

/// `sovereign image ...`.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a node image: OUT/node.img, its signed manifest, lock and root listing.
    Build(BuildArgs),
    /// Check an image against its signed build manifest.
    Verify(VerifyArgs),
}

/// The profile, as the CLI names it.
#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Production,
    Test,
}

/// Arguments of `sovereign image build`.
#[derive(Args)]
pub struct BuildArgs {
    /// The spec (default: the built-in `image/node.toml`, paths relative to the current directory).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// The output directory.
    #[arg(long)]
    out: PathBuf,
    /// Build this profile instead of the spec's.
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
    /// The bundle trust file to install, instead of the spec's `trust.bundle_trust`.
    #[arg(long)]
    bundle_trust: Option<PathBuf>,
    /// The cluster CA certificate (`sovereign cluster init`'s DIR/ca.pem), instead of the
    /// spec's `trust.cluster_ca`: the node refuses an identity it did not issue.
    #[arg(long)]
    cluster_ca: Option<PathBuf>,
    /// Install exactly the package versions of this lock file (refused when the mirror lacks one).
    #[arg(long)]
    lock: Option<PathBuf>,
    /// The Debian mirror (default: the spec's, else the build host's apt sources).
    #[arg(long)]
    mirror: Option<String>,
    /// Directory of the service binaries (default: beside this `sovereign`).
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// The build key signing the manifest (default: OUT/build.key, generated if missing).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Where base root filesystems are cached (default: ~/.cache/sovereign/image-base).
    #[arg(long, conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Build the base from scratch and keep nothing (what the reproducibility check does).
    #[arg(long)]
    no_cache: bool,
}

/// Arguments of `sovereign image verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// The manifest (`node.manifest.json`; its signature is beside it, `.sig`).
    #[arg(long)]
    manifest: PathBuf,
    /// The build key expected to have signed it (`ed25519:...` or a `.pub` file).
    #[arg(long)]
    key: Option<String>,
    /// The image.
    image: PathBuf,
}

fn default_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("sovereign/image-base")
}

fn build_key(args: &BuildArgs) -> anyhow::Result<sovereign_signing::SigningKey> {
    let path = match &args.key {
        Some(path) => path.clone(),
        None => {
            let path = args.out.join("build.key");
            if !path.exists() {
                std::fs::create_dir_all(&args.out)
                    .with_context(|| format!("creating {}", args.out.display()))?;
                let public = sovereign_signing::generate_signing_key(&path)?;
                eprintln!(
                    "generated the build key {} ({public}); keep it to sign later builds",
                    path.display()
                );
            }
            path
        }
    };
    Ok(sovereign_signing::read_signing_key(&path)?)
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let (text, spec_dir) = match &args.spec {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
        None => (DEFAULT_SPEC.to_owned(), PathBuf::from(".")),
    };
    let mut spec = ImageSpec::parse(&text)?;
    if let Some(profile) = args.profile {
        spec.profile = match profile {
            ProfileArg::Production => Profile::Production,
            ProfileArg::Test => Profile::Test,
        };
    }
    let binaries = match &args.binaries {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the directory of this sovereign binary")?
            .to_path_buf(),
    };
    let key = build_key(&args)?;
    let cache = (!args.no_cache).then(|| args.cache.clone().unwrap_or_else(default_cache));
    let request = BuildRequest {
        spec: &spec,
        spec_dir: &spec_dir,
        bundle_trust: args.bundle_trust.as_deref(),
        cluster_ca: args.cluster_ca.as_deref(),
        lock: args.lock.as_deref(),
        mirror: args.mirror.as_deref(),
        binaries: &binaries,
        out: &args.out,
        cache: cache.as_deref(),
        key: &key,
        version: env!("CARGO_PKG_VERSION"),
        host_etc: Path::new("/etc"),
    };
    let started = Instant::now();
    let mut progress = |event: Progress| match event {
        Progress::Start(name) => eprintln!("==> {name}"),
        Progress::Done(name, took, detail) => {
            eprintln!("    {name}: {:.1} s, {detail}", took.as_secs_f64())
        }
    };
    let report = sovereign_image::build(&request, &mut progress)?;
    println!(
        "image {} ({} bytes, sha256 {})",
        report.image.display(),
        report.size,
        report.sha256
    );
    println!("verity root hash {}", report.root_hash);
    println!(
        "manifest {} (signed by {}), lock {}, listing {}",
        report.manifest.display(),
        key.public_key(),
        report.lock.display(),
        report.listing.display()
    );
    println!("built in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let expected = args
        .key
        .as_deref()
        .map(sovereign_signing::read_public_key)
        .transpose()?;
    let (manifest, signer) =
        sovereign_image::verify(&args.manifest, &args.image, expected.as_ref())?;
    println!(
        "{}: verified ({} bytes, sha256 {}), signed by {signer}",
        args.image.display(),
        manifest.image.size,
        manifest.image.sha256
    );
    println!(
        "{} image {}, kernel {}, verity root hash {}, {} packages",
        manifest.profile,
        manifest.version,
        manifest.kernel,
        manifest.verity_root_hash,
        manifest.packages.len()
    );
    if expected.is_none() {
        println!("warning: no --key given: the signature is valid, but by a key you did not name");
    }
    Ok(())
}

/// Runs `sovereign image ...`.
pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Verify(args) => verify(args),
    }
}
