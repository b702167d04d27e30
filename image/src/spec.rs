//! The image spec (`image/node.toml`): parsed strictly, every refusal names its field.

use serde::{Deserialize, Serialize};

/// Errors reading a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The TOML does not parse or has an unknown field.
    #[error("spec: {0}")]
    Parse(String),
    /// A field has a bad value.
    #[error("spec: {field}: {reason}")]
    Invalid {
        /// The field, dotted (`network.api_port`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What the image contains.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Debian release.
    pub suite: String,
    /// Package mirror; empty: the build host's apt sources.
    #[serde(default)]
    pub mirror: String,
    /// Extra packages.
    #[serde(default)]
    pub packages: Vec<String>,
    /// `production` or `test`.
    pub profile: Profile,
    /// Services to install.
    pub services: Vec<Service>,
    /// Network.
    pub network: Network,
    /// Trust files.
    pub trust: Trust,
    /// Every timestamp in the image (SOURCE_DATE_EPOCH), for reproducible builds.
    #[serde(default = "default_epoch")]
    pub source_date_epoch: u64,
}

/// 2026-01-01T00:00:00Z.
fn default_epoch() -> u64 {
    1_767_225_600
}

/// The image profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// No login path at all.
    Production,
    /// Adds what the VM tests need.
    Test,
}

/// A Sovereign service of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// The audit daemon (`sovereign-audit`).
    Audit,
    /// The one-shot stick import (`sovereign-import`).
    Import,
    /// The node service: the ring and the OpenAI-compatible API
    /// (`sovereign-node`, unit `sovereign-api.service`).
    Api,
}

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// LAN interface match.
    pub lan_match: String,
    /// `dhcp` or an address in CIDR form.
    pub lan_address: String,
    /// API port on the LAN.
    pub api_port: u16,
    /// Ring interface match.
    pub ring_match: String,
    /// Ring port on ring interfaces.
    pub ring_port: u16,
}

/// How the LAN interface gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LanAddress {
    /// DHCP (no default route or DNS is taken from it).
    Dhcp,
    /// A static address, CIDR.
    Static(String),
}

impl LanAddress {
    fn parse(text: &str) -> Option<Self> {
        if text == "dhcp" {
            return Some(Self::Dhcp);
        }
        let (ip, prefix) = text.split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        let ok = match ip.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(_) => prefix <= 32,
            std::net::IpAddr::V6(_) => prefix <= 128,
        };
        ok.then(|| Self::Static(text.to_owned()))
    }
}

impl Network {
    /// How the LAN interface gets its address (checked when the spec is parsed).
    pub fn lan(&self) -> LanAddress {
        LanAddress::parse(&self.lan_address).unwrap_or(LanAddress::Dhcp)
    }
}

/// Trust files installed into the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    /// The initial bundle trust file.
    pub bundle_trust: String,
    /// The cluster CA certificate (PEM, `sovereign cluster init`'s DIR/ca.pem);
    /// empty until the cluster has one. Nodes refuse identities it did not issue.
    #[serde(default)]
    pub cluster_ca: String,
}

fn interface_match(field: &'static str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"*?-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            field,
            reason: format!("{value:?} is not an interface name pattern"),
        })
    }
}

impl ImageSpec {
    /// Parses and checks a spec.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(|e| {
            SpecError::Parse(
                e.message().to_owned()
                    + &e.span()
                        .map(|s| format!(" (at byte {})", s.start))
                        .unwrap_or_default(),
            )
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field, reason: String| Err(SpecError::Invalid { field, reason });
        if !["bookworm", "trixie"].contains(&self.suite.as_str()) {
            return invalid(
                "suite",
                format!(
                    "{:?} is not a supported Debian release (bookworm, trixie)",
                    self.suite
                ),
            );
        }
        if !self.mirror.is_empty() && !crate::sources::is_mirror_url(&self.mirror) {
            return invalid(
                "mirror",
                format!("{:?} is not an http(s):// or file:// URL", self.mirror),
            );
        }
        for package in &self.packages {
            let ok = !package.is_empty()
                && package
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
            if !ok {
                return invalid(
                    "packages",
                    format!("{package:?} is not a Debian package name"),
                );
            }
        }
        let forbidden = ["openssh-server", "apt", "dpkg-dev", "sudo"];
        if self.profile == Profile::Production {
            if let Some(p) = self
                .packages
                .iter()
                .find(|p| forbidden.contains(&p.as_str()))
            {
                return invalid(
                    "packages",
                    format!("{p} is a login or package-management path, not allowed in production"),
                );
            }
        }
        if self.services.is_empty() {
            return invalid("services", "at least one service is needed".into());
        }
        let mut sorted = self.services.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.services.len() {
            return invalid("services", "a service is listed twice".into());
        }
        if self.services.contains(&Service::Import) && !self.services.contains(&Service::Audit) {
            return invalid(
                "services",
                "import needs audit (imports are refused when they cannot be recorded)".into(),
            );
        }
        if LanAddress::parse(&self.network.lan_address).is_none() {
            return invalid(
                "network.lan_address",
                format!(
                    "{:?} is neither \"dhcp\" nor an address like 192.0.2.10/24",
                    self.network.lan_address
                ),
            );
        }
        interface_match("network.lan_match", &self.network.lan_match)?;
        interface_match("network.ring_match", &self.network.ring_match)?;
        if self.network.api_port == 0 {
            return invalid("network.api_port", "0 is not a port".into());
        }
        if self.network.ring_port == 0 || self.network.ring_port == self.network.api_port {
            return invalid(
                "network.ring_port",
                "must be a port other than the API's".into(),
            );
        }
        for (field, path) in [
            ("trust.bundle_trust", &self.trust.bundle_trust),
            ("trust.cluster_ca", &self.trust.cluster_ca),
        ] {
            if field == "trust.cluster_ca" && path.is_empty() {
                continue;
            }
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return invalid(
                    field,
                    format!("{path:?} must be a path inside the build directory"),
                );
            }
        }
        Ok(())
    }
}
