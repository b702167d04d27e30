/*!
`sovereign-auditctl`: the node's small clients of the audit daemon, run by
root-owned units that do what the daemon's sandbox cannot:

- `firewall-counters`: reads the firewall's drop counters
  (`nft --json list counters`, which needs CAP_NET_ADMIN) and records them;
- `courier STICK`: asks the daemon for a fresh signed checkpoint and the
  consistency proof from the one the stick carries, and writes them onto the
  stick (which the stick unit remounts read-write for just this step); with
  `--ring SOCKET`, every other reachable ring member's too, gathered by the
  node service over the ring.
*/

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sovereign_audit::{
    drop_counters_event, previous_checkpoint, write_package, write_ring_courier, AuditClient,
};

/// Clients of the audit daemon.
#[derive(Parser)]
#[command(name = "sovereign-auditctl", version)]
struct Args {
    /// The audit daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Record the firewall's drop counters.
    FirewallCounters {
        /// The nft program.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
    /// Leave the newest checkpoint and a consistency proof on a mounted stick.
    Courier {
        /// This node's name (the audit daemon's). Default: the host name, which
        /// a node takes from its enrolled identity at boot.
        #[arg(long)]
        node: Option<String>,
        /// The node service's courier socket: every other reachable ring
        /// member's checkpoint and proof are left on the stick too.
        #[arg(long)]
        ring: Option<PathBuf>,
        /// The stick's mount point.
        stick: PathBuf,
    },
}

fn run(args: &Args) -> anyhow::Result<String> {
    let client = AuditClient::connect(&args.socket)?;
    match &args.command {
        Action::FirewallCounters { nft } => {
            let output = Command::new(nft)
                .args(["--json", "list", "counters"])
                .output()
                .with_context(|| format!("running {}", nft.display()))?;
            if !output.status.success() {
                anyhow::bail!(
                    "{} --json list counters: {}",
                    nft.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            let event = drop_counters_event(&String::from_utf8_lossy(&output.stdout))?;
            let seq = client.record(&event)?;
            Ok(format!(
                "recorded the firewall's drop counters (record {seq})"
            ))
        }
        Action::Courier { node, ring, stick } => {
            let node = match node {
                Some(node) => node.clone(),
                None => nix::unistd::gethostname()
                    .context("reading the host name")?
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("the host name is not UTF-8"))?,
            };
            let previous = previous_checkpoint(stick, &node);
            let mut package = client.courier(previous.as_deref())?;
            if package.node != node {
                // The log was begun under another name: its own folder holds the
                // checkpoint to extend.
                let previous = previous_checkpoint(stick, &package.node);
                package = client.courier(previous.as_deref())?;
            }
            let dir = write_package(&package, stick)?;
            let mut done = format!(
                "left the checkpoint at size {} and the proof from size {} in {}",
                package.proof.new_size,
                package.proof.old_size,
                dir.display()
            );
            if let Some(ring) = ring {
                // This node's folder is written; the ring adds the others'.
                match write_ring_courier(ring, stick, Some(&package.node)) {
                    Ok(outcome) => {
                        for line in outcome.lines() {
                            done.push('\n');
                            done.push_str(&line);
                        }
                    }
                    Err(e) => done.push_str(&format!("\nthe ring's members: not carried: {e}")),
                }
            }
            Ok(done)
        }
    }
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
