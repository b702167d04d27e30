//! The package lock: every Debian package of the base root filesystem with
//! its exact version, architecture and the sha256 of its `.deb`, as
//! `Cargo.lock` is for crates. A build writes it; a build given it installs
//! exactly those versions or refuses.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::BuildError;

/// One installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Architecture (`amd64`, `all`).
    pub arch: String,
    /// sha256 of the `.deb` it was installed from.
    pub sha256: String,
}

/// The lock file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The Debian release.
    pub suite: String,
    /// Packages, sorted by name.
    pub packages: Vec<Package>,
}

const HEADER: &str = "# Sovereign image lock: the exact Debian packages of the node's base root\n\
# filesystem (name, version, architecture, sha256 of the .deb). Written by\n\
# `sovereign image build`; `--lock FILE` installs exactly these or refuses.\n";

fn is_hex64(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Lock {
    /// The lock file text.
    pub fn render(&self) -> String {
        let mut text = format!("{HEADER}suite {}\n", self.suite);
        for p in &self.packages {
            let _ = writeln!(
                text,
                "package {} {} {} {}",
                p.name, p.version, p.arch, p.sha256
            );
        }
        text
    }

    /// Parses a lock file, refusing anything malformed with its line number.
    pub fn parse(path: &Path, text: &str) -> Result<Self, BuildError> {
        let bad = |line: usize, reason: &str| BuildError::Lock {
            path: path.to_owned(),
            reason: format!("line {line}: {reason}"),
        };
        let mut suite = None;
        let mut packages: Vec<Package> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["suite", name] if suite.is_none() => suite = Some((*name).to_owned()),
                ["package", name, version, arch, sha256] => {
                    if !is_hex64(sha256) {
                        return Err(bad(number, "the sha256 is not 64 lowercase hex digits"));
                    }
                    let valid_name = name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b)
                    });
                    if !valid_name || version.contains('=') {
                        return Err(bad(number, "not a Debian package name and version"));
                    }
                    if packages
                        .last()
                        .is_some_and(|last| last.name.as_str() >= *name)
                    {
                        return Err(bad(number, "packages must be sorted by name, each once"));
                    }
                    packages.push(Package {
                        name: (*name).to_owned(),
                        version: (*version).to_owned(),
                        arch: (*arch).to_owned(),
                        sha256: (*sha256).to_owned(),
                    });
                }
                _ => {
                    return Err(bad(
                        number,
                        "expected `suite NAME` or `package NAME VERSION ARCH SHA256`",
                    ))
                }
            }
        }
        let suite = suite.ok_or_else(|| bad(0, "no `suite` line"))?;
        if packages.is_empty() {
            return Err(bad(0, "no packages"));
        }
        Ok(Self { suite, packages })
    }

    /// Reads and parses a lock file.
    pub fn read(path: &Path) -> Result<Self, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| BuildError::Lock {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// `name=version` pins for apt.
    pub fn pins(&self) -> Vec<String> {
        self.packages
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect()
    }

    /// Checks that `installed` is exactly this lock (versions and hashes).
    pub fn check_installed(&self, path: &Path, installed: &[Package]) -> Result<(), BuildError> {
        let fail = |reason: String| BuildError::Lock {
            path: path.to_owned(),
            reason,
        };
        for locked in &self.packages {
            match installed.iter().find(|p| p.name == locked.name) {
                None => return Err(fail(format!("{} was not installed", locked.name))),
                Some(p) if p.version != locked.version => {
                    return Err(fail(format!(
                        "{} {} was installed, the lock says {}",
                        p.name, p.version, locked.version
                    )))
                }
                Some(p) if p.sha256 != locked.sha256 => {
                    return Err(fail(format!(
                        "{} {}: the mirror's .deb has sha256 {}, the lock says {}",
                        p.name, p.version, p.sha256, locked.sha256
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = installed
            .iter()
            .find(|p| !self.packages.iter().any(|l| l.name == p.name))
        {
            return Err(fail(format!(
                "{} {} was installed but is not in the lock",
                extra.name, extra.version
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn a_lock_round_trips_and_checks_what_was_installed() {
        let lock = Lock {
            suite: "bookworm".into(),
            packages: vec![
                package("base-files", "12.4+deb12u1"),
                package("systemd", "252.38-1~deb12u1"),
            ],
        };
        let path = Path::new("node.lock");
        assert_eq!(Lock::parse(path, &lock.render()).unwrap(), lock);
        assert_eq!(lock.pins()[1], "systemd=252.38-1~deb12u1");
        lock.check_installed(path, &lock.packages).unwrap();
        let mut newer = lock.packages.clone();
        newer[1].version = "252.39-1~deb12u1".into();
        let err = lock.check_installed(path, &newer).unwrap_err().to_string();
        assert!(
            err.contains("systemd 252.39-1~deb12u1 was installed, the lock says 252.38"),
            "{err}"
        );
        let mut other_bytes = lock.packages.clone();
        other_bytes[0].sha256 = "cd".repeat(32);
        let err = lock
            .check_installed(path, &other_bytes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("base-files 12.4+deb12u1: the mirror's .deb has sha256"),
            "{err}"
        );
    }

    #[test]
    fn malformed_locks_are_refused_with_the_line() {
        let good = Lock {
            suite: "bookworm".into(),
            packages: vec![package("a", "1"), package("b", "2")],
        }
        .render();
        let cases = [
            (good.replace(&"ab".repeat(32), "xyz"), "sha256"),
            (good.replace("package b 2", "package a 2"), "sorted"),
            (good.replace("suite bookworm\n", ""), "no `suite` line"),
            (good.clone() + "colour red\n", "expected"),
        ];
        for (text, needle) in cases {
            let err = Lock::parse(Path::new("l"), &text).unwrap_err().to_string();
            assert!(
                err.starts_with("lock l: ") && err.contains(needle),
                "{needle}: {err}"
            );
        }
    }
}
