/*!
The node's state partition: an ext4 filesystem labelled `sovereign-state`
that the node mounts on `/var` (model store, audit log, node identity).

```text
lib/sovereign/node/identity.pem  0600  the enrolled identity file (node key, certificate, CA
                                       certificate, age identity): the audit daemon's key
lib/sovereign/node/node.pub      0644  the node's public key (ed25519:...)
lib/sovereign/node/hostname      0644  the node's enrolled name: the node names itself after it at boot
lib/sovereign/node/cert.pem      0644  the LAN API's certificate chain (node, CA) unless overridden
lib/sovereign/node/key.pem       0600  the LAN API's key (the node key, PKCS#8) unless overridden
lib/sovereign/node/node.age      0600  the age identity the import decrypts with
lib/sovereign/node/api-keys      0600  the API's bearer keys (when given)
```

The trust anchor is not here: the cluster CA certificate lives in the
image's verified root (`/etc/sovereign/cluster-ca.pem`).

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

use sovereign_identity::NodeIdentity;

use crate::error::FlashError;

/// Partition name (PARTLABEL) and filesystem label of the state partition.
pub const STATE_LABEL: &str = "sovereign-state";

/// GPT type of the state partition: the discoverable-partitions "Linux /var" type.
pub const VAR_PARTITION_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

/// Directory of the node identity inside the state filesystem (`/var/lib/sovereign/node` on the node).
pub const IDENTITY_DIR: &str = "lib/sovereign/node";

/// The node's identity file inside [`IDENTITY_DIR`] (mode 0600, owned by root).
pub const IDENTITY_FILE: &str = "identity.pem";

/// The node's public key file inside [`IDENTITY_DIR`].
pub const NODE_PUB_FILE: &str = "node.pub";

/// The node's enrolled name inside [`IDENTITY_DIR`] (its certificate's
/// subject): the image's `sovereign-hostname.service` sets the host name
/// from it, so every node is named after its identity.
pub const HOSTNAME_FILE: &str = "hostname";

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

/// Builds the state filesystem holding the node's identity (its file's
/// text is `identity_text`) and `files` (overrides of the derived
/// credentials) into `<work>/state.ext4`, `size` bytes long; returns it and
/// the node's age recipient.
pub fn build(
    work: &Path,
    identity: &NodeIdentity,
    identity_text: &str,
    files: &[crate::NodeFile],
    size: u64,
    uuid: &str,
) -> Result<(PathBuf, String), FlashError> {
    let root = work.join("state-root");
    let dir = root.join(IDENTITY_DIR);
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", dir.display())))?;
    sovereign_signing::write_secret_file(&dir.join(IDENTITY_FILE), identity_text.as_bytes())?;
    let public = sovereign_signing::PublicKey::from_bytes(
        &identity.signing_key().verifying_key().to_bytes(),
    )?;
    let pub_path = dir.join(NODE_PUB_FILE);
    fs::write(&pub_path, format!("{public}\n"))
        .map_err(io(format!("writing {}", pub_path.display())))?;
    let hostname_path = dir.join(HOSTNAME_FILE);
    fs::write(&hostname_path, format!("{}\n", identity.name()))
        .map_err(io(format!("writing {}", hostname_path.display())))?;
    let mut files = files.to_vec();
    let mut derive = |name: &str, contents: Option<Vec<u8>>| {
        if let (false, Some(contents)) = (files.iter().any(|f| f.name == name), contents) {
            files.push(crate::NodeFile {
                name: name.into(),
                contents,
            });
        }
    };
    derive("cert.pem", Some(identity.chain_pem().into_bytes()));
    derive("key.pem", Some(identity.private_key_pem().into_bytes()));
    derive(
        "node.age",
        identity.age_identity().map(|age| {
            use age::secrecy::ExposeSecret;
            format!("{}\n", age.to_string().expose_secret()).into_bytes()
        }),
    );
    for file in &files {
        let Some((_, secret)) = NODE_FILE_NAMES.iter().find(|(n, _)| *n == file.name) else {
            return Err(FlashError::Io {
                what: format!("node file {}", file.name),
                source: std::io::Error::other("not a node file name"),
            });
        };
        let path = dir.join(&file.name);
        if *secret {
            sovereign_signing::write_secret_file(&path, &file.contents)?;
        } else {
            fs::write(&path, &file.contents).map_err(io(format!("writing {}", path.display())))?;
        }
    }
    let age_path = dir.join("node.age");
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
