//! One module per noun of the CLI; each parses its arguments and calls a library.

pub mod audit;
pub mod bundle;
pub mod cluster;
pub mod flash;
pub mod generate;
pub mod image;
pub mod import;
pub mod key;
pub mod models;
pub mod node;
pub mod perplexity;
pub mod ring;
pub mod serve;
pub mod trust;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Writes a new file, refusing to overwrite one.
pub fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Replaces a file atomically (write beside it, then rename).
pub fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = path.with_extension("new");
    let mut file = fs::File::create(&temp).with_context(|| format!("{}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, path).with_context(|| format!("{}", path.display()))
}

/// How long a command that opens the model store waits for another holder
/// (a running node's replication imports into it while a bundle arrives).
pub const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Bytes in a human unit (decimal, like `df -H`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
