//! The Debian mirror of a build: the spec's `mirror`, or else the build host's
//! own apt sources (deb822 `*.sources` and one-line `*.list` files), with the
//! host's release name replaced by the spec's suite. No mirror is built in.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::BuildError;

/// One apt source as a one-line `deb` entry for mmdebstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// The repository URI.
    pub uri: String,
    /// The suite (`bookworm`, `bookworm-security`, ...).
    pub suite: String,
    /// Components (`main`, ...).
    pub components: Vec<String>,
    /// The keyring file, if the source names one.
    pub signed_by: Option<String>,
}

impl AptSource {
    /// The one-line form, as mmdebstrap takes it.
    pub fn line(&self) -> String {
        let options = self
            .signed_by
            .as_ref()
            .map(|k| format!("[signed-by={k}] "))
            .unwrap_or_default();
        format!(
            "deb {options}{} {} {}",
            self.uri,
            self.suite,
            self.components.join(" ")
        )
    }
}

/// Where apt keeps its sources on a Debian host.
pub fn host_source_files(etc_apt: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let list = etc_apt.join("sources.list");
    if list.is_file() {
        files.push(list);
    }
    if let Ok(entries) = fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sources" || x == "list"))
            .collect();
        found.sort();
        files.extend(found);
    }
    files
}

fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for paragraph in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in paragraph.lines() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((key, value)) = line.split_once(':') {
                fields.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        if !get("types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let components: Vec<String> = get("components")
            .unwrap_or("main")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let signed_by = get("signed-by")
            .filter(|k| k.starts_with('/'))
            .map(str::to_owned);
        for uri in get("uris").unwrap_or("").split_whitespace() {
            for suite in get("suites").unwrap_or("").split_whitespace() {
                sources.push(AptSource {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                    components: components.clone(),
                    signed_by: signed_by.clone(),
                });
            }
        }
    }
    sources
}

fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut signed_by = None;
        let rest = match rest.trim_start().strip_prefix('[') {
            Some(options) => {
                let (options, after) = options.split_once(']').unwrap_or((options, ""));
                signed_by = options
                    .split_whitespace()
                    .find_map(|o| o.strip_prefix("signed-by="))
                    .map(str::to_owned);
                after
            }
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            sources.push(AptSource {
                uri: uri.to_owned(),
                suite: suite.to_owned(),
                components: words.map(str::to_owned).collect(),
                signed_by: signed_by.clone(),
            });
        }
    }
    sources
}

/// The host's release name (`VERSION_CODENAME` of its os-release).
pub fn host_codename(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        l.strip_prefix("VERSION_CODENAME=")
            .map(|v| v.trim_matches('"').to_owned())
    })
}

/// Reads the host's sources and retargets them at `suite`: `bookworm-security`
/// on a bookworm host becomes `trixie-security` for a trixie image.
pub fn from_host(
    files: &[PathBuf],
    host_codename: Option<&str>,
    suite: &str,
) -> Result<Vec<AptSource>, BuildError> {
    let mut sources = Vec::new();
    for file in files {
        let text = fs::read_to_string(file)
            .map_err(|e| BuildError::Sources(format!("{}: {e}", file.display())))?;
        if file.extension().is_some_and(|x| x == "sources") {
            sources.extend(parse_deb822(&text));
        } else {
            sources.extend(parse_one_line(&text));
        }
    }
    if let Some(host) = host_codename.filter(|h| *h != suite) {
        for source in &mut sources {
            if let Some(rest) = source.suite.strip_prefix(host) {
                source.suite = format!("{suite}{rest}");
            }
        }
    }
    sources.retain(|s| s.suite == suite || s.suite.starts_with(&format!("{suite}-")));
    sources.dedup();
    if sources.is_empty() {
        return Err(BuildError::Sources(format!(
            "no Debian source for {suite} in {} (give the spec a mirror, or --mirror)",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(sources)
}

/// Whether `mirror` is a URL apt can fetch from (http, https or file).
pub fn is_mirror_url(mirror: &str) -> bool {
    ["http://", "https://", "file://"]
        .iter()
        .any(|s| mirror.starts_with(s))
}

/// The sources of a build: `mirror` if given, else the host's.
pub fn resolve(mirror: &str, suite: &str, etc: &Path) -> Result<Vec<AptSource>, BuildError> {
    if !mirror.is_empty() {
        if !is_mirror_url(mirror) {
            return Err(BuildError::Sources(format!(
                "mirror {mirror:?} is not an http(s):// or file:// URL"
            )));
        }
        return Ok(vec![AptSource {
            uri: mirror.trim_end_matches('/').to_owned(),
            suite: suite.to_owned(),
            components: vec!["main".into()],
            signed_by: None,
        }]);
    }
    let os_release = fs::read_to_string(etc.join("os-release")).unwrap_or_default();
    from_host(
        &host_source_files(&etc.join("apt")),
        host_codename(&os_release).as_deref(),
        suite,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_become_lines_for_the_image_suite() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("debian.sources");
        fs::write(
            &file,
            "Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\
             Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             # a comment\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
             Types: deb\nEnabled: no\nURIs: http://off.invalid/\nSuites: bookworm\n",
        )
        .unwrap();
        let sources = from_host(std::slice::from_ref(&file), Some("bookworm"), "bookworm").unwrap();
        let lines: Vec<String> = sources.iter().map(AptSource::line).collect();
        assert_eq!(
            lines,
            [
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian bookworm main contrib",
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian bookworm-updates main contrib",
                "deb http://mirror.invalid/debian-security bookworm-security main",
            ]
        );
        let trixie = from_host(&[file], Some("bookworm"), "trixie").unwrap();
        assert_eq!(trixie[2].suite, "trixie-security");
    }

    #[test]
    fn one_line_sources_and_a_host_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sources.list");
        fs::write(
            &file,
            "deb [arch=amd64 signed-by=/k.gpg] http://m.invalid/debian bookworm main # x\ndeb-src http://m.invalid/debian bookworm main\n",
        )
        .unwrap();
        let sources = from_host(&[file], None, "bookworm").unwrap();
        assert_eq!(
            sources[0].line(),
            "deb [signed-by=/k.gpg] http://m.invalid/debian bookworm main"
        );
        let err = from_host(&[], None, "bookworm").unwrap_err().to_string();
        assert!(err.contains("no Debian source for bookworm"), "{err}");
    }
}
