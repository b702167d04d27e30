//! Running the external tools of a build (mmdebstrap, mkfs.erofs, veritysetup,
//! objcopy, sgdisk, mtools): a missing tool names its Debian package, a failed
//! one reports its status and the last lines of its stderr.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::BuildError;

/// The tools a build needs and the Debian packages that ship them.
pub const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("tar", "tar"),
    ("mkfs.erofs", "erofs-utils"),
    ("veritysetup", "cryptsetup-bin"),
    ("objcopy", "binutils"),
    ("sgdisk", "gdisk"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("systemd-sysusers", "systemd"),
    ("systemctl", "systemd"),
];

/// The systemd EFI stub the unified kernel image is built on.
pub const EFI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// Refuses early, before any work, when a tool of the build is missing.
pub fn check_tools() -> Result<(), BuildError> {
    for (tool, package) in TOOLS {
        if !on_path(tool) {
            return Err(BuildError::MissingTool { tool, package });
        }
    }
    if !Path::new(EFI_STUB).is_file() {
        return Err(BuildError::MissingTool {
            tool: "linuxx64.efi.stub",
            package: "systemd-boot-efi",
        });
    }
    Ok(())
}

fn last_lines(text: &[u8], count: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.char_indices().nth(300) {
            Some((cut, _)) => format!("{}...", &l[..cut]),
            None => l.to_owned(),
        })
        .collect();
    lines[lines.len().saturating_sub(count)..].join(" | ")
}

/// Runs `command` with `SOURCE_DATE_EPOCH` set, returning its stdout.
pub fn run(command: &mut Command, epoch: u64) -> Result<Vec<u8>, BuildError> {
    run_with_stderr(command, epoch).map_err(|(error, _)| error)
}

/// [`run`], but a failure also hands back the whole of stderr, for callers
/// that read a tool's own diagnostics.
pub fn run_with_stderr(command: &mut Command, epoch: u64) -> Result<Vec<u8>, (BuildError, String)> {
    let tool = command.get_program().to_string_lossy().into_owned();
    let output = command
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| (BuildError::io(format!("running {tool}"))(e), String::new()))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let error = BuildError::Tool {
        tool,
        status: output.status.to_string(),
        stderr: last_lines(&output.stderr, 3),
    };
    Err((error, String::from_utf8_lossy(&output.stderr).into_owned()))
}
