//! Boot and disk: the unified kernel image (systemd's EFI stub with the
//! kernel, initramfs, os-release and a command line that pins the verity root
//! hash), an ESP holding it at the removable-media path, and the GPT disk
//! image: ESP, root, root verity (discoverable partition types; the root
//! partitions' UUIDs are the halves of the root hash, as systemd does it).

use std::fs;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::KERNEL_HARDENING;
use crate::error::BuildError;
use crate::rootfs::{derived_uuid, uuid_text, VerifiedRoot};
use crate::tool::{self, EFI_STUB};

const MIB: u64 = 1 << 20;
/// Size of the ESP (room for a second UKI when A/B updates come).
pub const ESP_SIZE: u64 = 64 * MIB;
/// GPT type of an EFI system partition.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// GPT type of an x86-64 root partition (discoverable partitions).
pub const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// GPT type of an x86-64 root verity partition.
pub const ROOT_VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";

/// The partition UUIDs of the root and its hash tree, from the root hash.
pub fn root_partition_uuids(root_hash: &str) -> Result<(String, String), BuildError> {
    let bytes: Vec<u8> = (0..root_hash.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&root_hash[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| BuildError::Unexpected(format!("root hash {root_hash} is not hex")))?;
    if bytes.len() != 32 {
        return Err(BuildError::Unexpected(format!(
            "root hash {root_hash} is not 32 bytes"
        )));
    }
    Ok((uuid_text(&bytes[..16]), uuid_text(&bytes[16..])))
}

/// The kernel command line of an image whose root has `root_hash`.
pub fn kernel_cmdline(root_hash: &str) -> Result<String, BuildError> {
    let (data, hash) = root_partition_uuids(root_hash)?;
    Ok(format!(
        "root=/dev/mapper/sovereign-root ro rootfstype=erofs sovereign.verity={data},{hash},{root_hash} \
         console=tty0 console=ttyS0,115200 panic=10 {KERNEL_HARDENING}"
    ))
}

/// Builds the unified kernel image `work/BOOTX64.EFI`.
pub fn unified_kernel_image(
    vmlinuz: &Path,
    initrd: &Path,
    os_release: &str,
    cmdline: &str,
    work: &Path,
    epoch: u64,
) -> Result<PathBuf, BuildError> {
    let osrel = work.join("uki-os-release");
    let cmd = work.join("uki-cmdline");
    fs::write(&osrel, os_release).map_err(BuildError::io("writing the UKI os-release"))?;
    fs::write(&cmd, cmdline).map_err(BuildError::io("writing the UKI command line"))?;
    let uki = work.join("BOOTX64.EFI");
    let mut command = Command::new("objcopy");
    for (section, file, vma) in [
        (".osrel", &osrel, "0x20000"),
        (".cmdline", &cmd, "0x30000"),
        (".linux", &vmlinuz.to_path_buf(), "0x2000000"),
        (".initrd", &initrd.to_path_buf(), "0x3000000"),
    ] {
        command
            .arg("--add-section")
            .arg(format!("{section}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{section}={vma}"));
    }
    tool::run(command.arg(EFI_STUB).arg(&uki), epoch)?;
    let mut bytes = fs::read(&uki).map_err(BuildError::io("reading the UKI"))?;
    crate::pe::set_timestamp(&mut bytes, epoch)?;
    fs::write(&uki, bytes).map_err(BuildError::io("writing the UKI"))?;
    // mcopy -m carries the file's time into the ESP.
    let stamp = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    fs::File::options()
        .write(true)
        .open(&uki)
        .and_then(|f| f.set_modified(stamp))
        .map_err(BuildError::io("setting the UKI's time"))?;
    Ok(uki)
}

fn round_up(size: u64) -> u64 {
    size.div_ceil(MIB) * MIB
}

fn copy_at(image: &mut fs::File, from: &Path, offset: u64) -> Result<(), BuildError> {
    let mut source =
        fs::File::open(from).map_err(BuildError::io(format!("opening {}", from.display())))?;
    image
        .seek(SeekFrom::Start(offset))
        .map_err(BuildError::io("seeking in the disk image"))?;
    std::io::copy(&mut source, image)
        .map(|_| ())
        .map_err(BuildError::io(format!(
            "copying {} into the disk image",
            from.display()
        )))
}

/// Builds the ESP holding `uki` and writes the GPT disk image `out`.
pub fn disk_image(
    uki: &Path,
    root: &VerifiedRoot,
    work: &Path,
    out: &Path,
    epoch: u64,
) -> Result<u64, BuildError> {
    let esp = work.join("esp.img");
    let volume_id =
        &blake3::derive_key("sovereign-image esp volume id", root.root_hash.as_bytes())[..4];
    let volume_id: String = volume_id.iter().map(|b| format!("{b:02x}")).collect();
    tool::run(
        Command::new("mkfs.vfat")
            .args(["--invariant", "-F", "32", "-n", "SOVEREIGN", "-i"])
            .arg(&volume_id)
            .arg("-C")
            .arg(&esp)
            .arg((ESP_SIZE / 1024).to_string()),
        epoch,
    )?;
    tool::run(
        Command::new("mmd")
            .arg("-i")
            .arg(&esp)
            .args(["::/EFI", "::/EFI/BOOT"]),
        epoch,
    )?;
    tool::run(
        Command::new("mcopy")
            .arg("-m")
            .arg("-i")
            .arg(&esp)
            .arg(uki)
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
        epoch,
    )?;

    let size_of = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.len())
            .map_err(BuildError::io(format!("stat {}", p.display())))
    };
    let (root_size, hash_size) = (
        round_up(size_of(&root.data)?),
        round_up(size_of(&root.hash)?),
    );
    let total = MIB + ESP_SIZE + root_size + hash_size + MIB;
    let (data_uuid, hash_uuid) = root_partition_uuids(&root.root_hash)?;
    let seed = root.root_hash.as_bytes();
    let partial = out.with_extension("img.partial");
    let file = fs::File::create(&partial)
        .map_err(BuildError::io(format!("creating {}", partial.display())))?;
    file.set_len(total)
        .map_err(BuildError::io("sizing the disk image"))?;
    drop(file);
    let sectors = |bytes: u64| bytes / 512;
    let first = sectors(MIB);
    let root_start = first + sectors(ESP_SIZE);
    let hash_start = root_start + sectors(root_size);
    tool::run(
        Command::new("sgdisk")
            .arg(format!("--disk-guid={}", derived_uuid("disk guid", seed)))
            .arg(format!("--new=1:{first}:{}", root_start - 1))
            .arg(format!("--typecode=1:{ESP_TYPE}"))
            .arg(format!(
                "--partition-guid=1:{}",
                derived_uuid("esp guid", seed)
            ))
            .arg("--change-name=1:esp")
            .arg(format!("--new=2:{root_start}:{}", hash_start - 1))
            .arg(format!("--typecode=2:{ROOT_TYPE}"))
            .arg(format!("--partition-guid=2:{data_uuid}"))
            .arg("--change-name=2:root-x86-64")
            .arg(format!(
                "--new=3:{hash_start}:{}",
                hash_start + sectors(hash_size) - 1
            ))
            .arg(format!("--typecode=3:{ROOT_VERITY_TYPE}"))
            .arg(format!("--partition-guid=3:{hash_uuid}"))
            .arg("--change-name=3:root-x86-64-verity")
            .arg(&partial),
        epoch,
    )?;
    let mut image = fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .map_err(BuildError::io(format!("opening {}", partial.display())))?;
    copy_at(&mut image, &esp, MIB)?;
    copy_at(&mut image, &root.data, root_start * 512)?;
    copy_at(&mut image, &root.hash, hash_start * 512)?;
    image
        .sync_all()
        .map_err(BuildError::io("syncing the disk image"))?;
    drop(image);
    fs::rename(&partial, out)
        .map_err(BuildError::io(format!("renaming into {}", out.display())))?;
    Ok(total)
}
