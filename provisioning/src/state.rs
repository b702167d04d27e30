/*!
The node's state partition: an ext4 filesystem labelled `sovereign-state`
that the node mounts on `/var` (model store, audit log, node identity).

`sovereign flash` creates it small (64 MiB by default) right after the image's
partitions, holding the node identity; the node's first boot grows the
partition and the filesystem to the end of the disk. It is built with
`mkfs.ext4 -d` into a file of its own and copied in at the partition's offset,
so no loop device or mount is needed.
*/

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sovereign_signing::SigningKey;

use crate::error::FlashError;

/// Partition name (PARTLABEL) and filesystem label of the state partition.
pub const STATE_LABEL: &str = "sovereign-state";

/// GPT type of the state partition: the discoverable-partitions "Linux /var" type.
pub const VAR_PARTITION_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

/// Directory of the node identity inside the state filesystem (`/var/lib/sovereign/node` on the node).
pub const IDENTITY_DIR: &str = "lib/sovereign/node";

/// The node's secret key file inside [`IDENTITY_DIR`] (mode 0600, owned by root).
pub const NODE_KEY_FILE: &str = "node.key";

/// The node's public key file inside [`IDENTITY_DIR`].
pub const NODE_PUB_FILE: &str = "node.pub";

/// The smallest state partition `flash` creates (ext4 with a journal needs room).
pub const MIN_STATE_SIZE: u64 = 16 << 20;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FlashError {
    let what = what.into();
    move |source| FlashError::Io { what, source }
}

/// Runs a tool, turning a failure into [`FlashError::Tool`] with its last stderr line.
pub(crate) fn run_tool(command: &mut Command) -> Result<(), FlashError> {
    let tool = format!("{:?}", command.get_program());
    let output = command
        .output()
        .map_err(io(format!("running {}", tool.trim_matches('"'))))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(FlashError::Tool {
        tool: tool.trim_matches('"').to_string(),
        status: output.status.to_string(),
        stderr: stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string(),
    })
}

/// Names a node file may have, and whether it is secret (mode 0600; else 0644).
pub const NODE_FILE_NAMES: &[(&str, bool)] = &[
    ("node.age", true),
    ("api-keys", true),
    ("cert.pem", false),
    ("key.pem", true),
];

/// Builds the state filesystem holding `key` and `files` into
/// `<work>/state.ext4`, `size` bytes long; returns it and the node's age recipient.
pub fn build(
    work: &Path,
    key: &SigningKey,
    key_text: &str,
    files: &[crate::NodeFile],
    size: u64,
    uuid: &str,
) -> Result<(PathBuf, String), FlashError> {
    let root = work.join("state-root");
    let identity = root.join(IDENTITY_DIR);
    fs::create_dir_all(&identity).map_err(io(format!("creating {}", identity.display())))?;
    fs::set_permissions(&identity, fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", identity.display())))?;
    sovereign_signing::write_secret_file(&identity.join(NODE_KEY_FILE), key_text.as_bytes())?;
    let public = format!("{}\n", key.public_key());
    let pub_path = identity.join(NODE_PUB_FILE);
    fs::write(&pub_path, public).map_err(io(format!("writing {}", pub_path.display())))?;
    for file in files {
        let Some((_, secret)) = NODE_FILE_NAMES.iter().find(|(n, _)| *n == file.name) else {
            return Err(FlashError::Io {
                what: format!("node file {}", file.name),
                source: std::io::Error::other("not a node file name"),
            });
        };
        let path = identity.join(&file.name);
        if *secret {
            sovereign_signing::write_secret_file(&path, &file.contents)?;
        } else {
            fs::write(&path, &file.contents).map_err(io(format!("writing {}", path.display())))?;
        }
    }
    let age_path = identity.join("node.age");
    if !age_path.exists() {
        sovereign_signing::generate_age_identity(&age_path)?;
    }
    let age_recipient = sovereign_signing::read_age_identity(&age_path)?
        .to_public()
        .to_string();
    let image = work.join("state.ext4");
    run_tool(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-L",
                STATE_LABEL,
                "-U",
                uuid,
            ])
            .args(["-E", &format!("root_owner=0:0,hash_seed={uuid}")])
            .arg("-d")
            .arg(&root)
            .arg(&image)
            .arg(format!("{}k", size / 1024)),
    )?;
    Ok((image, age_recipient))
}
