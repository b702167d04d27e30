//! The host side of a scenario: running the operator's tools and finding the
//! workspace's binaries that cargo built beside the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::VmError;

/// Runs a host tool; its stdout, or its status and output as the error.
pub fn host_tool(command: &mut Command) -> Result<String, VmError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|source| VmError::Io {
        what: format!("running {shown}"),
        source,
    })?;
    if !output.status.success() {
        return Err(VmError::CommandFailed {
            machine: "host".into(),
            command: shown,
            status: output.status.code().unwrap_or(-1),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A binary of the workspace (`sovereign`, ...) in the target dir of the
/// running test: `cargo test --workspace` builds every package's binaries.
pub fn workspace_binary(name: &str) -> Result<PathBuf, VmError> {
    let exe = std::env::current_exe().map_err(|source| VmError::Io {
        what: "finding the test binary".into(),
        source,
    })?;
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if !binary.is_file() {
        return Err(VmError::Config {
            machine: "host".into(),
            reason: format!(
                "{} is missing: run `cargo build --workspace` (cargo test --workspace builds it)",
                binary.display()
            ),
        });
    }
    Ok(binary)
}
