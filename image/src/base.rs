//! The base root filesystem: Debian packages installed by mmdebstrap (the
//! `essential` variant, so no apt inside), the initramfs hook that opens the
//! verified root, kernel modules pruned, every package recorded with the
//! sha256 of its `.deb`. Cached as a tarball under a key of all its inputs,
//! so a rebuild after a code change starts from here in a second.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::BuildError;
use crate::lock::{Lock, Package};
use crate::sources::AptSource;
use crate::tool;
use crate::tree::put;

/// Packages of every node beyond Debian's essential set.
pub const BASE_PACKAGES: &[&str] = &[
    "cryptsetup-bin",
    "e2fsprogs",
    "initramfs-tools",
    "kmod",
    "linux-image-amd64",
    "nftables",
    "systemd",
    "systemd-sysv",
    "udev",
    "zstd",
];

const INITRAMFS_CONF: &str = include_str!("../files/initramfs/conf.d/sovereign");
const INITRAMFS_HOOK: &str = include_str!("../files/initramfs/hooks/sovereign-verity");
const INITRAMFS_SCRIPT: &str =
    include_str!("../files/initramfs/scripts/local-top/sovereign-verity");
const PRUNE_MODULES: &str = include_str!("../files/prune-modules");
const CUSTOMIZE: &str = include_str!("../files/base-customize");

/// Every package a spec asks for: [`BASE_PACKAGES`] and its `extra` ones, sorted, once each.
pub fn package_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Bumped when the way the base is made changes in a way its inputs do not show.
const RECIPE: &str = "sovereign-image-base/1";

/// What the base stage asks for.
pub struct BaseInputs<'a> {
    /// Debian release.
    pub suite: &'a str,
    /// Where packages come from.
    pub sources: &'a [AptSource],
    /// Extra packages of the spec.
    pub packages: &'a [String],
    /// Exact versions to install, if a lock is given (with its path).
    pub lock: Option<(&'a Path, &'a Lock)>,
    /// SOURCE_DATE_EPOCH of the build.
    pub epoch: u64,
}

/// A base root filesystem, ready to be unpacked.
#[derive(Debug, Clone)]
pub struct Base {
    /// The root filesystem tarball.
    pub tar: PathBuf,
    /// The kernel release (`6.1.0-..-amd64`).
    pub kernel: String,
    /// Every installed package.
    pub packages: Vec<Package>,
    /// Whether it came from the cache.
    pub cached: bool,
}

impl BaseInputs<'_> {
    fn includes(&self) -> Vec<String> {
        match self.lock {
            Some((_, lock)) => lock.pins(),
            None => package_names(self.packages),
        }
    }

    /// The cache key: every input of the base, and mmdebstrap's version.
    fn key(&self, mmdebstrap_version: &str) -> String {
        let mut hasher = blake3::Hasher::new();
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(RECIPE.as_bytes());
        field(self.suite.as_bytes());
        for source in self.sources {
            field(source.line().as_bytes());
        }
        for include in self.includes() {
            field(include.as_bytes());
        }
        for file in [
            INITRAMFS_CONF,
            INITRAMFS_HOOK,
            INITRAMFS_SCRIPT,
            PRUNE_MODULES,
            CUSTOMIZE,
        ] {
            field(file.as_bytes());
        }
        field(&self.epoch.to_le_bytes());
        field(mmdebstrap_version.as_bytes());
        hasher.finalize().to_hex()[..24].to_string()
    }
}

fn read_tsv(path: &Path) -> Result<Vec<Vec<String>>, BuildError> {
    let text =
        fs::read_to_string(path).map_err(BuildError::io(format!("reading {}", path.display())))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

/// Joins the installed list with the `.deb` hashes into locked packages.
fn installed_packages(dir: &Path) -> Result<Vec<Package>, BuildError> {
    let debs = read_tsv(&dir.join("debs.tsv"))?;
    let mut packages = Vec::new();
    for row in read_tsv(&dir.join("installed.tsv"))? {
        let [name, version, arch] = row.as_slice() else {
            return Err(BuildError::Unexpected(format!(
                "base root filesystem: bad installed package line {row:?}"
            )));
        };
        let sha256 = debs
            .iter()
            .find(|d| d.len() == 4 && d[0] == *name && d[1] == *version)
            .map(|d| d[3].clone())
            .ok_or_else(|| {
                BuildError::Unexpected(format!(
                    "base root filesystem: no .deb was kept for {name} {version}"
                ))
            })?;
        packages.push(Package {
            name: name.clone(),
            version: version.clone(),
            arch: arch.clone(),
            sha256,
        });
    }
    packages.sort();
    Ok(packages)
}

fn mmdebstrap_version() -> Result<String, BuildError> {
    let out = tool::run(Command::new("mmdebstrap").arg("--version"), 0)?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// The base for `inputs`: from `cache` when it holds one with the same key,
/// else built with mmdebstrap (into the cache, or into `scratch` without one).
pub fn base(inputs: &BaseInputs, cache: Option<&Path>, scratch: &Path) -> Result<Base, BuildError> {
    let key = inputs.key(&mmdebstrap_version()?);
    let dir = match cache {
        Some(cache) => cache.join(&key),
        None => scratch.join("base"),
    };
    // One build of a base at a time per cache; others wait, then reuse it.
    let _lock = match cache {
        Some(cache) => {
            fs::create_dir_all(cache)
                .map_err(BuildError::io(format!("creating {}", cache.display())))?;
            let path = cache.join(".lock");
            let file = fs::File::create(&path)
                .map_err(BuildError::io(format!("creating {}", path.display())))?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| BuildError::io(format!("locking {}", path.display()))(e.into()))?;
            Some(file)
        }
        None => None,
    };
    if dir.join("base.tar").is_file() && dir.join("kernel").is_file() {
        // Marks the base as recently used, so the cache keeps it.
        let _ = fs::File::open(&dir).and_then(|d| d.set_modified(std::time::SystemTime::now()));
        return finish(inputs, &dir, true);
    }
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)
        .map_err(BuildError::io(format!("creating {}", partial.display())))?;
    let result = build(inputs, &partial);
    if let Err(error) = result {
        let _ = fs::remove_dir_all(&partial);
        return Err(error);
    }
    fs::rename(&partial, &dir)
        .map_err(BuildError::io(format!("renaming into {}", dir.display())))?;
    if let Some(cache) = cache {
        // Bases unused for a week are no longer needed.
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        for entry in fs::read_dir(cache).into_iter().flatten().flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > week));
            if entry.path() != dir && stale {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    finish(inputs, &dir, false)
}

fn finish(inputs: &BaseInputs, dir: &Path, cached: bool) -> Result<Base, BuildError> {
    let packages = installed_packages(dir)?;
    if let Some((path, lock)) = inputs.lock {
        lock.check_installed(path, &packages)?;
    }
    let kernel = fs::read_to_string(dir.join("kernel"))
        .map_err(BuildError::io("reading the kernel release"))?
        .trim()
        .to_owned();
    Ok(Base {
        tar: dir.join("base.tar"),
        kernel,
        packages,
        cached,
    })
}

fn build(inputs: &BaseInputs, dir: &Path) -> Result<(), BuildError> {
    for (path, text, mode) in [
        ("hooks/conf", INITRAMFS_CONF, 0o644),
        ("hooks/hook", INITRAMFS_HOOK, 0o755),
        ("hooks/local-top", INITRAMFS_SCRIPT, 0o755),
        ("hooks/customize", CUSTOMIZE, 0o755),
        ("prune-modules", PRUNE_MODULES, 0o644),
    ] {
        put(dir, path, text.as_bytes(), mode)?;
    }
    let hooks = dir.join("hooks");
    let h = hooks.display();
    let d = dir.display();
    let mut command = Command::new("mmdebstrap");
    command
        .args([
            "--variant=essential",
            "--format=tar",
            "--skip=essential/unlink",
        ])
        .arg(format!("--include={}", inputs.includes().join(",")))
        .arg("--aptopt=APT::Get::allow-downgrades \"true\"")
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/info/*",
        ]);
    command
        .arg(format!(
            "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" \"$1/etc/initramfs-tools/hooks\" \"$1/etc/initramfs-tools/scripts/local-top\" && \
             cp {h}/conf \"$1/etc/initramfs-tools/conf.d/sovereign\" && \
             cp {h}/hook \"$1/etc/initramfs-tools/hooks/sovereign-verity\" && \
             cp {h}/local-top \"$1/etc/initramfs-tools/scripts/local-top/sovereign-verity\""
        ))
        .arg(format!("--customize-hook={h}/customize \"$1\" {d}"))
        .arg(inputs.suite)
        .arg(dir.join("base.tar"));
    for source in inputs.sources {
        command.arg(source.line());
    }
    match tool::run_with_stderr(&mut command, inputs.epoch) {
        Ok(_) => Ok(()),
        Err((error, stderr)) => {
            let missing = versions_not_found(&stderr);
            if missing.is_empty() {
                Err(error)
            } else {
                Err(BuildError::LockedVersionsGone { missing })
            }
        }
    }
}

/// The `name=version` pins apt could not find (`E: Version 'V' for 'N' was not found`).
fn versions_not_found(apt_stderr: &str) -> Vec<String> {
    let mut missing: Vec<String> = apt_stderr
        .lines()
        .filter_map(|line| {
            let rest = line.split("Version '").nth(1)?;
            let (version, rest) = rest.split_once("' for '")?;
            let (name, _) = rest.split_once("' was not found")?;
            Some(format!("{name}={version}"))
        })
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_pruning_spares_thunderbolt_networking() {
        // Where Debian's kernels keep the Thunderbolt bus and its network
        // driver (6.1: drivers/net/thunderbolt.ko, later drivers/net/thunderbolt/).
        let kept = [
            "drivers/thunderbolt/thunderbolt.ko",
            "drivers/net/thunderbolt.ko",
            "drivers/net/thunderbolt/thunderbolt_net.ko",
            "drivers/net/thunderbolt/thunderbolt-net.ko",
        ];
        for line in PRUNE_MODULES.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for module in kept {
                assert!(
                    !module.starts_with(&format!("{}/", line.trim_end_matches('/'))),
                    "prune-modules entry {line} removes {module}"
                );
            }
        }
    }

    #[test]
    fn apt_names_each_missing_version() {
        let stderr = "I: something\nE: Version '1.0-gone' for 'systemd' was not found\n\
                      E: Version '2:9' for 'udev' was not found\nE: Version '1.0-gone' for 'systemd' was not found\n";
        assert_eq!(versions_not_found(stderr), ["systemd=1.0-gone", "udev=2:9"]);
        assert!(versions_not_found("E: mmdebstrap failed to run").is_empty());
    }
}
