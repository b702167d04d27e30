/*!
What the flash target is, and whether it is safe to overwrite. Everything here
only reads (`/proc/self/mountinfo`, `/proc/swaps`, `/sys/dev/block`); it runs
before a single byte is written.

Refused: a partition (give the whole disk), the disk holding the running
system's root filesystem (through partitions, device-mapper and md layers),
a disk with any partition mounted, used as swap or held by another device
(device-mapper, md, LVM), and a disk whose logical sectors are not 512 bytes.
A regular file stands in for a disk (tests and image preparation use that).
*/

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::FlashError;

/// The kind of flash target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// A regular file standing in for a disk.
    File,
    /// A whole-disk block device, by its kernel name (`sda`, `nvme0n1`).
    BlockDevice(String),
}

/// A flash target that passed every safety check.
#[derive(Debug, Clone)]
pub struct Target {
    /// The path given.
    pub path: PathBuf,
    /// What it is.
    pub kind: TargetKind,
    /// Its size in bytes.
    pub size: u64,
}

/// A `major:minor` device number.
type DevNum = (u32, u32);

fn split_dev(rdev: u64) -> DevNum {
    // glibc's gnu_dev_major/minor encoding.
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn parse_devnum(text: &str) -> Option<DevNum> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn sys_dir(dev: DevNum) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{}:{}", dev.0, dev.1)).ok()
}

fn read_devnum(dir: &Path) -> Option<DevNum> {
    parse_devnum(&fs::read_to_string(dir.join("dev")).ok()?)
}

/// The whole disks underneath a block device: its parent if it is a partition,
/// and recursively the disks under each of its `slaves` (device-mapper, md).
fn underlying_disks(dev: DevNum, out: &mut HashSet<DevNum>, depth: usize) {
    let Some(dir) = sys_dir(dev) else { return };
    if depth > 16 {
        return;
    }
    let disk_dir = if dir.join("partition").exists() {
        match dir.parent() {
            Some(parent) => parent.to_path_buf(),
            None => return,
        }
    } else {
        dir
    };
    let Some(disk) = read_devnum(&disk_dir) else {
        return;
    };
    out.insert(disk);
    if let Ok(slaves) = fs::read_dir(disk_dir.join("slaves")) {
        for slave in slaves.flatten() {
            if let Some(slave_dev) = read_devnum(&slave.path()) {
                underlying_disks(slave_dev, out, depth + 1);
            }
        }
    }
}

/// Mount points and device numbers from `/proc/self/mountinfo`.
fn mounts() -> Result<Vec<(DevNum, String, String)>, FlashError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| FlashError::Io {
        what: "reading /proc/self/mountinfo".into(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = parse_devnum(fields.get(2)?)?;
            let mount_point = fields.get(4)?.to_string();
            let separator = fields.iter().position(|f| *f == "-")?;
            let source = fields.get(separator + 2)?.to_string();
            Some((dev, mount_point, source))
        })
        .collect())
}

/// The whole disks that hold the running system's root filesystem.
pub fn root_disks() -> Result<HashSet<DevNum>, FlashError> {
    let mut disks = HashSet::new();
    for (dev, mount_point, _) in mounts()? {
        if mount_point == "/" {
            underlying_disks(dev, &mut disks, 0);
        }
    }
    Ok(disks)
}

/// Inspects `path` and refuses it if overwriting it is unsafe.
pub fn inspect(path: &Path) -> Result<Target, FlashError> {
    let metadata = fs::metadata(path).map_err(|source| FlashError::Io {
        what: format!("device {}", path.display()),
        source,
    })?;
    let refuse = |reason: String| FlashError::UnsafeTarget {
        path: path.to_owned(),
        reason,
    };
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(Target {
            path: path.to_owned(),
            kind: TargetKind::File,
            size: metadata.len(),
        });
    }
    if !file_type.is_block_device() {
        return Err(refuse(
            "neither a block device nor a regular file".to_string(),
        ));
    }
    let dev = split_dev(metadata.rdev());
    let dir = sys_dir(dev).ok_or_else(|| refuse("not found under /sys/dev/block".into()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if dir.join("partition").exists() {
        return Err(refuse(format!(
            "is a partition ({name}); give the whole disk"
        )));
    }
    if root_disks()?.contains(&dev) {
        return Err(refuse(
            "is the running system's disk (it holds the root filesystem)".into(),
        ));
    }
    // The disk and its partitions.
    let mut parts: Vec<(DevNum, String)> = vec![(dev, name.clone())];
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let sub = entry.path();
            if sub.join("partition").exists() {
                if let Some(sub_dev) = read_devnum(&sub) {
                    parts.push((sub_dev, entry.file_name().to_string_lossy().into_owned()));
                }
            }
        }
    }
    let numbers: HashSet<DevNum> = parts.iter().map(|(d, _)| *d).collect();
    for (mount_dev, mount_point, source) in mounts()? {
        if numbers.contains(&mount_dev) {
            return Err(refuse(format!(
                "is mounted ({source} on {mount_point}); unmount it first"
            )));
        }
    }
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for swap in swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            let swap_dev = fs::metadata(swap).ok().map(|m| split_dev(m.rdev()));
            if swap_dev.is_some_and(|d| numbers.contains(&d)) {
                return Err(refuse(format!("is in use as swap ({swap})")));
            }
        }
    }
    for (_, part_name) in &parts {
        let holders_dir = if *part_name == name {
            dir.join("holders")
        } else {
            dir.join(part_name).join("holders")
        };
        if let Some(holder) = fs::read_dir(&holders_dir)
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|entry| entry.ok())
        {
            return Err(refuse(format!(
                "{part_name} is held by {} (device-mapper, md or LVM)",
                holder.file_name().to_string_lossy()
            )));
        }
    }
    let sectors: u64 = fs::read_to_string(dir.join("size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| refuse("its size cannot be read from sysfs".into()))?;
    let logical: u64 = fs::read_to_string(dir.join("queue/logical_block_size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(512);
    if logical != crate::gpt::SECTOR {
        return Err(refuse(format!(
            "has {logical}-byte logical sectors; images are built for 512"
        )));
    }
    Ok(Target {
        path: path.to_owned(),
        kind: TargetKind::BlockDevice(name),
        size: sectors * 512,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_split_like_glibc() {
        assert_eq!(split_dev(0x0801), (8, 1));
        assert_eq!(split_dev(0xfd00), (253, 0));
        assert_eq!(
            split_dev((259u64 << 8) | 5 | (0x1u64 << 20)),
            (259, 5 | (1 << 8))
        );
        assert_eq!(parse_devnum("254:16\n"), Some((254, 16)));
        assert_eq!(parse_devnum("x:1"), None);
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = inspect(dir.path()).expect_err("a directory is no disk");
        assert!(
            error.to_string().contains("neither a block device"),
            "{error}"
        );
    }
}
