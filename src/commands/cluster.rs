//! `sovereign cluster`: the cluster CA (init), its register (nodes,
//! recipients) and revocation.

use std::path::PathBuf;

use clap::Subcommand;
use sovereign_provisioning::cluster::Cluster;

/// Cluster commands.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster CA in a new directory: ca.key (0600, keep it offline and
    /// backed up), ca.pem (what clients, images and auditors trust), cluster.json, nodes.json.
    Init {
        /// The cluster's name (lowercase letters, digits, '-').
        #[arg(long)]
        name: String,
        /// A DNS name every node certificate carries (one name for all nodes on the LAN).
        #[arg(long)]
        lan_name: Option<String>,
        /// The new cluster directory (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// List the certificates issued to nodes.
    Nodes {
        /// The cluster directory.
        #[arg(long)]
        cluster: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print every enrolled node's age recipient, one a line (for `bundle create --encrypt-to`).
    Recipients {
        /// The cluster directory.
        #[arg(long)]
        cluster: PathBuf,
    },
    /// Revoke a node's certificates: a new CA-signed revocation list in DIR/revoked.crl
    /// (copy it onto a stick: nodes import it like a trust file).
    Revoke {
        /// The cluster directory.
        #[arg(long)]
        cluster: PathBuf,
        /// The node to revoke.
        name: String,
    },
}

/// Runs a cluster command.
pub fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Init {
            name,
            lan_name,
            out,
        } => {
            let cluster = Cluster::init(&out, &name, lan_name.as_deref())?;
            println!(
                "cluster {} in {}: CA {}",
                name,
                out.display(),
                cluster.ca().fingerprint()
            );
            println!(
                "trust {} on clients and in the image spec (trust.cluster_ca); keep {} offline and back it up",
                out.join(sovereign_provisioning::cluster::CA_CERT).display(),
                out.join(sovereign_provisioning::cluster::CA_KEY).display()
            );
        }
        ClusterCommand::Nodes { cluster, json } => {
            let cluster = Cluster::open(&cluster)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&cluster.register().nodes)?
                );
                return Ok(());
            }
            println!(
                "{:<20} {:>6}  {:<8} {:<22} names",
                "name", "serial", "status", "valid until"
            );
            for node in &cluster.register().nodes {
                println!(
                    "{:<20} {:>6}  {:<8} {:<22} {}",
                    node.name,
                    node.serial,
                    if node.revoked { "revoked" } else { "active" },
                    node.not_after,
                    node.subject_alt_names.join(",")
                );
            }
        }
        ClusterCommand::Recipients { cluster } => {
            let cluster = Cluster::open(&cluster)?;
            for node in cluster.register().nodes.iter().filter(|n| !n.revoked) {
                println!("{}", node.age_recipient);
            }
        }
        ClusterCommand::Revoke { cluster, name } => {
            let mut cluster = Cluster::open(&cluster)?;
            let (serials, path) = cluster.revoke(&name)?;
            let serials: Vec<String> = serials.iter().map(u64::to_string).collect();
            println!(
                "revoked {name} (serial {}); revocation list {} in {}: copy it onto a stick for the nodes",
                serials.join(", "),
                cluster.register().revocation_sequence,
                path.display()
            );
        }
    }
    Ok(())
}
