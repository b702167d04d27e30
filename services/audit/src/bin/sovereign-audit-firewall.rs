/*!
`sovereign-audit-firewall`: records the node firewall's drop counters in the
audit log. A node's timer runs it (as root with only CAP_NET_ADMIN, the
capability `nft` needs to read counters); it reads them with
`nft --json list counters` and sends one `firewall`/`drop-counters` event to
the audit daemon.
*/

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Parser;
use sovereign_audit::{drop_counters_event, AuditClient};

/// Record the firewall's drop counters.
#[derive(Parser)]
#[command(name = "sovereign-audit-firewall", version)]
struct Args {
    /// The audit daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The nft program.
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
}

fn run(args: &Args) -> anyhow::Result<u64> {
    let output = Command::new(&args.nft)
        .args(["--json", "list", "counters"])
        .output()
        .with_context(|| format!("running {}", args.nft.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "{} --json list counters: {}",
            args.nft.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let event = drop_counters_event(&String::from_utf8_lossy(&output.stdout))?;
    Ok(AuditClient::connect(&args.socket)?.record(&event)?)
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(seq) => {
            println!("recorded the firewall's drop counters (record {seq})");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
