/*!
`flash`: writes a Sovereign disk image to a disk (or a file standing in for
one), reads it back and compares hashes, then adds the state partition holding
the node identity.

Order, chosen so a refusal leaves the target untouched:
1. every check that can fail without writing: node key, image GPT, target
   safety (see [`crate::target`]), sizes; the state filesystem is built in a
   temp dir;
2. the image bytes are written (block devices opened with `O_EXCL`, which the
   kernel refuses for a mounted or claimed disk), synced, dropped from the page
   cache and read back; the BLAKE3 of what was read must equal the image's;
3. `sgdisk` moves the backup GPT to the end of the disk and adds the state
   partition; the state filesystem is written at its offset and read back.

If anything fails once writing has begun, the first MiB (protective MBR and
primary GPT) is zeroed so a half-written disk is never taken for a bootable one.
*/

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::num::NonZeroU64;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sovereign_identity::NodeIdentity;

use crate::error::FlashError;
use crate::gpt::{self, Guid, Partition, SECTOR};
use crate::state::{self, run_tool, MIN_STATE_SIZE, STATE_LABEL, VAR_PARTITION_TYPE};
use crate::target::{self, Target, TargetKind};

/// Default size of the state partition that `flash` creates (first boot grows it).
pub const DEFAULT_STATE_SIZE: u64 = 64 << 20;

/// Partitions start on 1 MiB boundaries.
const ALIGN_SECTORS: u64 = 2048;

/// Sectors a backup GPT needs at the end of the disk (header plus 128 entries).
const BACKUP_GPT_SECTORS: u64 = 33;

const CHUNK: usize = 4 << 20;

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// The disk image built by `sovereign image build` (a GPT disk).
    pub image: PathBuf,
    /// The target disk, or a regular file standing in for one.
    pub device: PathBuf,
    /// The node identity file (`sovereign node enroll`).
    pub identity: PathBuf,
    /// Size of the state partition in bytes (a multiple of 1 MiB, at least 16 MiB).
    pub state_size: u64,
    /// More files for the node's identity directory (credentials: `node.age`,
    /// `api-keys`, `cert.pem`, `key.pem`). `cert.pem`/`key.pem` default to the
    /// identity's certificate chain and key, `node.age` to its age identity
    /// (or a fresh one when it has none).
    pub node_files: Vec<NodeFile>,
}

/// A file for the node's identity directory on the state partition.
#[derive(Debug, Clone)]
pub struct NodeFile {
    /// The file name (one of [`crate::state::NODE_FILE_NAMES`]).
    pub name: String,
    /// Its bytes.
    pub contents: Vec<u8>,
}

/// What a completed flash did.
#[derive(Debug, Clone)]
pub struct FlashReport {
    /// The target.
    pub device: PathBuf,
    /// Bytes of image written and verified.
    pub image_size: u64,
    /// BLAKE3 of the image, equal to what was read back.
    pub image_blake3: String,
    /// The state partition as it now stands in the target's GPT.
    pub state_partition: Partition,
    /// The node's name (its certificate's subject).
    pub node_name: String,
    /// The node's public key (`ed25519:...`).
    pub node_public_key: String,
    /// The node's age recipient (`age1...`): bundles encrypted to it can be imported.
    pub age_recipient: String,
}

/// Receives progress; the CLI draws bars, tests ignore it.
pub trait Progress {
    /// A stage begins; `total` bytes will be processed.
    fn stage(&self, name: &str, total: u64);
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
    /// The stage ended.
    fn finish(&self);
}

/// Progress that is discarded.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Progress bars on stderr (hidden when stderr is not a terminal), plus one
/// plain line per finished stage.
pub struct BarProgress {
    bar: std::cell::RefCell<Option<(indicatif::ProgressBar, String, std::time::Instant)>>,
}

impl BarProgress {
    /// No stage yet.
    pub fn new() -> Self {
        Self {
            bar: std::cell::RefCell::new(None),
        }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for BarProgress {
    fn stage(&self, name: &str, total: u64) {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(name.to_string());
        *self.bar.borrow_mut() = Some((bar, name.to_string(), std::time::Instant::now()));
    }

    fn advance(&self, bytes: u64) {
        if let Some((bar, _, _)) = self.bar.borrow().as_ref() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some((bar, name, started)) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
            eprintln!(
                "{name}: {} bytes in {:.1} s",
                bar.position(),
                started.elapsed().as_secs_f64()
            );
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FlashError {
    let what = what.into();
    move |source| FlashError::Io { what, source }
}

/// The checked plan: nothing has been written when this exists.
struct Plan {
    target: Target,
    image_size: u64,
    state_first_lba: u64,
    state_last_lba: u64,
    state_number: u32,
    state_guid: Guid,
    fs_uuid: Guid,
}

/// Checks the image, target and sizes; writes nothing.
fn plan(options: &FlashOptions, node_public: &[u8; 32]) -> Result<Plan, FlashError> {
    let bad_image = |reason: String| FlashError::BadImage {
        path: options.image.clone(),
        reason,
    };
    if options.state_size < MIN_STATE_SIZE || !options.state_size.is_multiple_of(1 << 20) {
        return Err(FlashError::BadImage {
            path: options.image.clone(),
            reason: format!(
                "state partition size {} must be a multiple of 1 MiB and at least 16 MiB",
                options.state_size
            ),
        });
    }
    let mut image =
        File::open(&options.image).map_err(io(format!("image {}", options.image.display())))?;
    let metadata = image
        .metadata()
        .map_err(io(format!("image {}", options.image.display())))?;
    if !metadata.is_file() {
        return Err(bad_image("not a regular file".into()));
    }
    let image_size = metadata.len();
    if image_size == 0 || !image_size.is_multiple_of(SECTOR) {
        return Err(bad_image(format!(
            "size {image_size} is not a whole number of 512-byte sectors"
        )));
    }
    let table =
        gpt::read(&mut image).map_err(|e| bad_image(format!("not a GPT disk image: {e}")))?;
    if table.partitions.is_empty() {
        return Err(bad_image("the partition table is empty".into()));
    }
    if table.by_name(STATE_LABEL).is_some() {
        return Err(bad_image(format!(
            "already has a `{STATE_LABEL}` partition; flash creates it"
        )));
    }
    if table.last_used_lba() * SECTOR >= image_size {
        return Err(bad_image(
            "a partition extends past the end of the file".into(),
        ));
    }

    // sgdisk runs after the image is written: make sure it exists before writing.
    run_tool(Command::new("sgdisk").arg("--version"))?;
    let target = target::inspect(&options.device)?;
    if target.kind == TargetKind::File {
        let device_meta = std::fs::metadata(&options.device)
            .map_err(io(format!("device {}", options.device.display())))?;
        if device_meta.dev() == metadata.dev() && device_meta.ino() == metadata.ino() {
            return Err(FlashError::UnsafeTarget {
                path: options.device.clone(),
                reason: "is the image itself".into(),
            });
        }
    }
    let image_sectors = image_size / SECTOR;
    let state_first_lba = image_sectors.div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
    let state_last_lba = state_first_lba + options.state_size / SECTOR - 1;
    let needed = (state_last_lba + 1 + BACKUP_GPT_SECTORS) * SECTOR;
    if target.size < needed {
        return Err(FlashError::TooSmall {
            device: options.device.clone(),
            device_size: target.size,
            image_size,
            state_size: options.state_size,
            needed,
        });
    }
    let state_number = table.partitions.iter().map(|p| p.number).max().unwrap_or(0) + 1;
    // Stable identifiers derived from the node key: flashing a node twice gives the same UUIDs.
    let derive = |context: &str| {
        let hash = blake3::derive_key(context, node_public);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash[..16]);
        Guid::from_random_bytes(bytes)
    };
    Ok(Plan {
        target,
        image_size,
        state_first_lba,
        state_last_lba,
        state_number,
        state_guid: derive("sovereign flash 2026 state partition guid"),
        fs_uuid: derive("sovereign flash 2026 state filesystem uuid"),
    })
}

fn open_target(target: &Target, read: bool) -> Result<File, FlashError> {
    let mut options = OpenOptions::new();
    options.write(true).read(read);
    if matches!(target.kind, TargetKind::BlockDevice(_)) {
        // O_EXCL on a block device: the kernel refuses if it is mounted or claimed.
        options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    options.open(&target.path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
            FlashError::UnsafeTarget {
                path: target.path.clone(),
                reason: "is in use (the kernel refused exclusive access)".into(),
            }
        } else {
            FlashError::Io {
                what: format!("opening {}", target.path.display()),
                source: e,
            }
        }
    })
}

/// Copies `len` bytes of `source` to `dest` at `offset`, returning the BLAKE3 of the bytes.
fn copy_hashing(
    source: &mut File,
    source_name: &Path,
    dest: &mut File,
    dest_name: &Path,
    offset: u64,
    len: u64,
    progress: &dyn Progress,
) -> Result<blake3::Hash, FlashError> {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; CHUNK];
    dest.seek(SeekFrom::Start(offset))
        .map_err(io(format!("seeking {}", dest_name.display())))?;
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        source
            .read_exact(&mut buffer[..want])
            .map_err(io(format!("reading {}", source_name.display())))?;
        hasher.update(&buffer[..want]);
        dest.write_all(&buffer[..want])
            .map_err(io(format!("writing {}", dest_name.display())))?;
        progress.advance(want as u64);
        left -= want as u64;
    }
    dest.sync_all()
        .map_err(io(format!("syncing {}", dest_name.display())))?;
    Ok(hasher.finalize())
}

/// Reads `len` bytes at `offset` from the device itself (page cache dropped first).
fn read_back(
    device: &Path,
    offset: u64,
    len: u64,
    progress: &dyn Progress,
) -> Result<blake3::Hash, FlashError> {
    let mut file = File::open(device).map_err(io(format!("opening {}", device.display())))?;
    // Written pages were synced; dropping them makes the read come from the disk.
    let _ = rustix::fs::fadvise(
        &file,
        offset,
        NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
    file.seek(SeekFrom::Start(offset))
        .map_err(io(format!("seeking {}", device.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        file.read_exact(&mut buffer[..want])
            .map_err(io(format!("reading back {}", device.display())))?;
        hasher.update(&buffer[..want]);
        progress.advance(want as u64);
        left -= want as u64;
    }
    Ok(hasher.finalize())
}

/// Zeroes the first MiB (protective MBR and primary GPT) after a failed write.
fn invalidate(target: &Target) {
    let result = open_target(target, false).and_then(|mut file| {
        file.write_all(&vec![0u8; 1 << 20])
            .and_then(|_| file.sync_all())
            .map_err(io("zeroing the partition table"))
    });
    if let Err(error) = result {
        tracing::error!(device = %target.path.display(), %error, "could not invalidate a half-written disk");
    } else {
        tracing::warn!(device = %target.path.display(), "flash failed; partition table zeroed");
    }
}

/// Reads the node identity file, refusing one that others can read and a
/// bare key (the node must be enrolled).
fn read_identity(path: &Path) -> Result<(NodeIdentity, String), FlashError> {
    let metadata = std::fs::metadata(path).map_err(io(format!("reading {}", path.display())))?;
    let mode = metadata.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FlashError::NodeKey(
            sovereign_signing::KeyError::LoosePermissions {
                path: path.to_owned(),
                mode,
            },
        ));
    }
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    let identity = NodeIdentity::parse(&path.display().to_string(), &text)?;
    // The node names itself after its identity (the host name, courier folders).
    crate::cluster::check_name("node name", identity.name())
        .map_err(|e| FlashError::NodeName(e.to_string()))?;
    Ok((identity, text))
}

/// Flashes `options.image` to `options.device` with the node identity; see the module docs.
pub fn flash(options: &FlashOptions, progress: &dyn Progress) -> Result<FlashReport, FlashError> {
    let (identity, identity_text) = read_identity(&options.identity)?;
    let public = sovereign_signing::PublicKey::from_bytes(
        &identity.signing_key().verifying_key().to_bytes(),
    )?;
    let plan = plan(options, &public.to_bytes())?;
    let work = tempfile::Builder::new()
        .prefix("sovereign-flash-")
        .tempdir()
        .map_err(io("creating a temp dir"))?;
    let state_size = (plan.state_last_lba + 1 - plan.state_first_lba) * SECTOR;
    let (state_fs, age_recipient) = state::build(
        work.path(),
        &identity,
        &identity_text,
        &options.node_files,
        state_size,
        &plan.fs_uuid.to_string(),
    )?;
    tracing::info!(device = %options.device.display(), "all checks passed; writing");
    match write_all(options, &plan, &state_fs, progress) {
        Ok(report) => Ok(FlashReport {
            node_name: identity.name().to_owned(),
            node_public_key: public.to_string(),
            age_recipient,
            ..report
        }),
        Err(error) => {
            invalidate(&plan.target);
            Err(error)
        }
    }
}

fn write_all(
    options: &FlashOptions,
    plan: &Plan,
    state_fs: &Path,
    progress: &dyn Progress,
) -> Result<FlashReport, FlashError> {
    let device = &options.device;
    let mut image =
        File::open(&options.image).map_err(io(format!("image {}", options.image.display())))?;
    let written = {
        let mut out = open_target(&plan.target, false)?;
        progress.stage("write", plan.image_size);
        let hash = copy_hashing(
            &mut image,
            &options.image,
            &mut out,
            device,
            0,
            plan.image_size,
            progress,
        )?;
        progress.finish();
        hash
    };
    progress.stage("verify", plan.image_size);
    let read = read_back(device, 0, plan.image_size, progress)?;
    progress.finish();
    if read != written {
        return Err(FlashError::VerifyMismatch {
            device: device.clone(),
            what: "the image",
            written: written.to_hex().to_string(),
            read: read.to_hex().to_string(),
        });
    }

    let n = plan.state_number;
    run_tool(
        Command::new("sgdisk")
            .arg("--move-second-header")
            .arg(format!(
                "--new={n}:{}:{}",
                plan.state_first_lba, plan.state_last_lba
            ))
            .arg(format!("--typecode={n}:{VAR_PARTITION_TYPE}"))
            .arg(format!("--change-name={n}:{STATE_LABEL}"))
            .arg(format!("--partition-guid={n}:{}", plan.state_guid))
            .arg(device),
    )?;

    let state_len = (plan.state_last_lba + 1 - plan.state_first_lba) * SECTOR;
    let offset = plan.state_first_lba * SECTOR;
    let mut state_file =
        File::open(state_fs).map_err(io(format!("opening {}", state_fs.display())))?;
    let state_written = {
        let mut out = open_target(&plan.target, false)?;
        progress.stage("state", state_len);
        let hash = copy_hashing(
            &mut state_file,
            state_fs,
            &mut out,
            device,
            offset,
            state_len,
            progress,
        )?;
        progress.finish();
        hash
    };
    progress.stage("verify state", state_len);
    let state_read = read_back(device, offset, state_len, progress)?;
    progress.finish();
    if state_read != state_written {
        return Err(FlashError::VerifyMismatch {
            device: device.clone(),
            what: "the state partition",
            written: state_written.to_hex().to_string(),
            read: state_read.to_hex().to_string(),
        });
    }

    let mut check = File::open(device).map_err(io(format!("opening {}", device.display())))?;
    let table = gpt::read(&mut check).map_err(|e| FlashError::Io {
        what: format!("re-reading the partition table of {}", device.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let state_partition = table
        .by_name(STATE_LABEL)
        .filter(|p| p.first_lba == plan.state_first_lba && p.last_lba == plan.state_last_lba)
        .cloned()
        .ok_or_else(|| FlashError::Io {
            what: format!("re-reading the partition table of {}", device.display()),
            source: std::io::Error::other("the state partition is not where it was written"),
        })?;
    if let TargetKind::BlockDevice(_) = plan.target.kind {
        // Let the kernel see the new partition; not fatal if it is busy.
        let _ = Command::new("partx").arg("-u").arg(device).status();
    }
    Ok(FlashReport {
        device: device.clone(),
        image_size: plan.image_size,
        image_blake3: written.to_hex().to_string(),
        state_partition,
        node_name: String::new(),
        node_public_key: String::new(),
        age_recipient: String::new(),
    })
}
