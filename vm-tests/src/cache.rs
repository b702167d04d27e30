/*!
Build an artifact (a node image) once per set of inputs and reuse it across
tests and test binaries: the whole suite builds the image once per run, and
again only when an input changes.

The key is BLAKE3 over the command line and the bytes of every input file
(directories walked in sorted order). The build writes into a fresh
`<key>.partial` dir that is renamed to `<key>` only on success, under an
exclusive lock so concurrent test binaries wait rather than build twice.
*/

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::VmError;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// Where cached builds live: `$SOVEREIGN_VM_CACHE`, else `~/.cache/sovereign/vm-images`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SOVEREIGN_VM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/sovereign/vm-images")
}

fn hash_path(hasher: &mut blake3::Hasher, path: &Path) -> Result<(), VmError> {
    let metadata = fs::metadata(path).map_err(io(format!("build input {}", path.display())))?;
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update(&[0]);
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(io(format!("build input {}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            hash_path(hasher, &entry)?;
        }
    } else {
        let mut file =
            fs::File::open(path).map_err(io(format!("build input {}", path.display())))?;
        hasher
            .update_reader(&mut file)
            .map_err(io(format!("reading build input {}", path.display())))?;
    }
    Ok(())
}

/// The cache key of a build.
pub fn build_key(command: &[String], inputs: &[PathBuf]) -> Result<String, VmError> {
    let mut hasher = blake3::Hasher::new();
    for arg in command {
        hasher.update(arg.as_bytes());
        hasher.update(&[0]);
    }
    for input in inputs {
        hash_path(&mut hasher, input)?;
    }
    Ok(hasher.finalize().to_hex()[..20].to_string())
}

/// Runs `command` (each `{out}` replaced by the output dir) unless a build
/// with the same command and inputs exists; returns the output dir.
pub fn cached_build(
    name: &str,
    command: &[String],
    inputs: &[PathBuf],
) -> Result<PathBuf, VmError> {
    let program = command.first().ok_or_else(|| VmError::Config {
        machine: name.to_string(),
        reason: "empty build command".into(),
    })?;
    let key = build_key(command, inputs)?;
    let root = cache_root();
    fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    let lock_path = root.join(format!("{name}.lock"));
    let lock = fs::File::create(&lock_path).map_err(io(format!("{}", lock_path.display())))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        VmError::Io {
            what: format!("locking {}", lock_path.display()),
            source: e.into(),
        }
    })?;
    let done = root.join(format!("{name}-{key}"));
    if done.is_dir() {
        tracing::info!(dir = %done.display(), "reusing cached build");
        return Ok(done);
    }
    let partial = root.join(format!("{name}-{key}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(io(format!("creating {}", partial.display())))?;
    let out = partial.display().to_string();
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace("{out}", &out))
        .collect();
    tracing::info!(%name, command = %command.join(" "), "building");
    let output = Command::new(program)
        .args(&args)
        .output()
        .map_err(io(format!("running {program}")))?;
    if !output.status.success() {
        let _ = fs::remove_dir_all(&partial);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(VmError::Config {
            machine: name.to_string(),
            reason: format!(
                "build `{}` failed ({}):\n{}",
                command.join(" "),
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    fs::rename(&partial, &done).map_err(io(format!("renaming {}", partial.display())))?;
    // Keep only this build of `name`: images are hundreds of MB.
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with(&format!("{name}-")) && entry.path() != done {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(done)
}
