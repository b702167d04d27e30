//! `sovereign node`: enroll a node in a cluster, check a certificate, run a node.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;

use clap::Subcommand;
use sovereign_identity::{ClusterCa, RevocationList};
use sovereign_provisioning::cluster::{Cluster, EnrollRequest, DEFAULT_NODE_DAYS};

/// Node commands.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// Run this host as a ring node: find the other nodes on the ring
    /// interfaces, serve this node's share of the model's layers, and answer
    /// the OpenAI-compatible API on the ring (the node image's service).
    Run(Box<sovereign_node::NodeArgs>),
    /// Enroll a node: a fresh ed25519 node key and age identity, a certificate
    /// signed by the cluster CA, all in one identity file (0600) for `sovereign flash --node`.
    Enroll {
        /// The cluster directory (`sovereign cluster init`).
        #[arg(long)]
        cluster: PathBuf,
        /// The node's name, unique in the cluster (lowercase letters, digits, '-').
        #[arg(long)]
        name: String,
        /// Another DNS name the node answers to on the LAN (repeatable).
        #[arg(long)]
        lan_name: Vec<String>,
        /// A LAN address the node answers on (repeatable).
        #[arg(long)]
        lan_ip: Vec<IpAddr>,
        /// Validity of the certificate in days (long: nodes have no NTP).
        #[arg(long, default_value_t = DEFAULT_NODE_DAYS)]
        days: u64,
        /// Re-issue the certificate of an enrolled name and revoke the old one.
        #[arg(long)]
        renew: bool,
        /// Where to write the identity file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a node certificate (a certificate file or an identity file) against
    /// the cluster CA and a revocation list, as a peer does.
    Verify {
        /// The cluster CA certificate.
        #[arg(long)]
        ca: PathBuf,
        /// The revocation list in force (DIR/revoked.crl); default: none revoked.
        #[arg(long)]
        revocations: Option<PathBuf>,
        /// Check as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// The certificate or identity file (PEM).
        file: PathBuf,
    },
}

/// Runs a node command.
pub fn run(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Run(args) => sovereign_node::run(&args)?,
        NodeCommand::Enroll {
            cluster,
            name,
            lan_name,
            lan_ip,
            days,
            renew,
            out,
        } => {
            let mut cluster = Cluster::open(&cluster)?;
            let request = EnrollRequest {
                name,
                lan_names: lan_name,
                lan_ips: lan_ip,
                days,
                renew,
            };
            let enrolled = cluster.enroll(&request, &out)?;
            println!(
                "enrolled {} (serial {}, valid until {}, names {}) in {}",
                enrolled.entry.name,
                enrolled.entry.serial,
                enrolled.entry.not_after,
                enrolled.entry.subject_alt_names.join(","),
                out.display()
            );
            println!("age recipient {}", enrolled.entry.age_recipient);
            if let Some(path) = enrolled.revocation {
                println!(
                    "the previous certificate is revoked: copy {} onto a stick for the nodes",
                    path.display()
                );
            }
        }
        NodeCommand::Verify {
            ca,
            revocations,
            at,
            file,
        } => {
            let ca = ClusterCa::load(&ca)?;
            let list = match revocations {
                Some(path) => RevocationList::load(&path, &ca)?,
                None => RevocationList::empty(&ca),
            };
            let now = match at {
                Some(text) => {
                    let at = time::OffsetDateTime::parse(
                        &text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .with_context(|| format!("--at {text:?} is not an RFC 3339 time"))?;
                    SystemTime::from(at)
                }
                None => SystemTime::now(),
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let der = sovereign_identity::first_certificate(&file.display().to_string(), &text)?;
            let peer = ca.verify_peer(&der, &list, now)?;
            println!(
                "{}: node {} (serial {}) of cluster {}, not revoked (revocation list {})",
                file.display(),
                peer.name,
                peer.serial,
                ca.name(),
                list.sequence()
            );
        }
    }
    Ok(())
}
