/*!
`sovereign-audit`: the node's audit daemon. Owns the log directory, accepts
events on a unix socket, writes a checkpoint every minute when there is
something new and on SIGTERM/SIGINT.
*/

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use sovereign_audit::{serve, AuditLog, Event, Gate, Policy, Rule};
use tracing_subscriber::prelude::*;

/// The audit daemon.
#[derive(Parser)]
#[command(name = "sovereign-audit", version)]
struct Args {
    /// The log directory (the audit user's alone).
    #[arg(long)]
    log: PathBuf,
    /// The unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// This node's name (the courier folder on sticks), recorded when the log
    /// is created. Default: the enrolled name of `--identity`, else `node`.
    #[arg(long)]
    node: Option<String>,
    /// The node identity file (`sovereign node enroll`): records are signed
    /// with its CA-certified key; a log begun with a raw key is handed over
    /// by a key-change record.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// The cluster CA the image trusts: an identity not issued by it is refused.
    #[arg(long, requires = "identity")]
    cluster_ca: Option<PathBuf>,
    /// Seconds between checkpoints (when there are new records).
    #[arg(long, default_value_t = 60)]
    checkpoint_every: u64,
    /// Who may record what: `USER=SERVICE:KIND[,KIND...]` (repeatable). Each
    /// user's events must carry that service name and one of those kinds.
    /// Without any, only the daemon's own user may record (a dev host).
    #[arg(long = "allow", value_name = "USER=SERVICE:KINDS")]
    allow: Vec<Rule>,
    /// Bytes of events one user may send in a burst.
    #[arg(long, default_value_t = Policy::default().burst_bytes)]
    quota_burst_bytes: u64,
    /// Bytes per second one user's quota refills.
    #[arg(long, default_value_t = Policy::default().bytes_per_sec)]
    quota_bytes_per_sec: u64,
    /// MiB the log's filesystem keeps free: below it, events from the socket
    /// are refused (the store on the same filesystem keeps room).
    #[arg(long, default_value_t = Policy::default().min_free_bytes >> 20)]
    min_free_mb: u64,
    /// Record a boot event: the image's version (os-release) and the verity
    /// root hash the kernel was booted with (a node's unit passes this).
    #[arg(long)]
    boot: bool,
}

/// The boot event's details: what image runs, and the root hash it verified.
fn boot_details() -> serde_json::Value {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |name: &str| {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(|v| v.trim_matches('"').to_owned())
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let root_hash = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("sovereign.verity="))
        .and_then(|v| v.rsplit(',').next())
        .map(str::to_owned);
    serde_json::json!({
        "image": field("IMAGE_ID"),
        "image_version": field("IMAGE_VERSION"),
        "profile": field("SOVEREIGN_PROFILE"),
        "verity_root_hash": root_hash,
    })
}

fn main() -> ExitCode {
    let journald = std::path::Path::new("/run/systemd/journal/socket")
        .exists()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(journald)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Block the shutdown signals in every thread; the main thread waits for them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;

    let log = match &args.identity {
        Some(path) => {
            let identity = sovereign_identity::NodeIdentity::load(path)?;
            if let Some(ca) = &args.cluster_ca {
                identity.require_ca(&sovereign_identity::ClusterCa::load(ca)?)?;
            }
            let node = args.node.as_deref().unwrap_or(identity.name());
            AuditLog::open_enrolled(&args.log, node, &identity)?
        }
        None => AuditLog::open(&args.log, args.node.as_deref().unwrap_or("node"))?,
    };
    let log = Arc::new(log);
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)?;
    // Services in the daemon's group connect; nobody else (the unit's umask is 0077).
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o660))?;
    log.record(Event::new(
        "audit",
        "daemon-start",
        serde_json::json!({ "socket": args.socket }),
    ))?;
    if args.boot {
        log.record(Event::new("audit", "boot", boot_details()))?;
    }
    eprintln!("sovereign-audit: ready on {}", args.socket.display());
    {
        let log = Arc::clone(&log);
        let gate = Arc::new(Gate::new(
            Policy {
                rules: args.allow.clone(),
                burst_bytes: args.quota_burst_bytes,
                bytes_per_sec: args.quota_bytes_per_sec,
                min_free_bytes: args.min_free_mb << 20,
            },
            &args.log,
        ));
        std::thread::spawn(move || serve(listener, log, gate));
    }
    {
        let log = Arc::clone(&log);
        let every = Duration::from_secs(args.checkpoint_every.max(1));
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            if log.unchecked() > 0 {
                if let Err(e) = log.checkpoint() {
                    tracing::error!(error = %e, "periodic checkpoint failed");
                }
            }
        });
    }
    let signal = signals.wait()?;
    log.record(Event::new(
        "audit",
        "daemon-stop",
        serde_json::json!({ "signal": signal.as_str() }),
    ))?;
    log.checkpoint()?;
    Ok(())
}
