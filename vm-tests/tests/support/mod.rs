//! What the operator prepares once and every VM scenario of a test run
//! shares: signing and build keys, the cluster CA with three enrolled nodes,
//! the node trust, the test-profile image built and signed, the demo model as
//! a signed bundle (and a tampered one), and the nodes' API keys. It is one
//! [`cached_build`], so the single-node and the cluster scenarios build the
//! image once per set of binaries and image sources.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sovereign_vm_tests::{cached_build, host_tool, workspace_binary, Machine};

/// The API key every test node accepts (`operator`).
pub const API_KEY: &str = "sk-node-test";

/// The enrolled nodes of the kit's cluster.
pub const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Runs a host tool, failing the test with its output if it fails.
pub fn run(command: &mut Command) -> String {
    host_tool(command).unwrap_or_else(|e| panic!("{e}"))
}

/// The operator's prepared material (a read-only cache dir).
pub struct Kit {
    /// The kit's directory: `signer`, `build.key`, `cluster/` (with
    /// `revoked.crl` revoking `node-d`), `NODE.identity` (node-a to node-d),
    /// `node.trust`, `out/node.img`, `good/` (1.0.0 and 1.1.0) and `bad/`
    /// bundles, `api-keys`.
    pub dir: PathBuf,
    /// The `sovereign` CLI.
    pub sovereign: PathBuf,
}

/// The kit, built now or reused from an earlier test of this run.
pub fn operator_kit() -> Kit {
    let sovereign = workspace_binary("sovereign").expect("the sovereign binary");
    let bin = sovereign.parent().expect("target dir").to_path_buf();
    let model = PathBuf::from(
        run(&mut Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/fetch-model"
        )))
        .trim(),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut inputs = vec![
        root.join("image"),
        root.join("provisioning/files"),
        model.clone(),
    ];
    for name in [
        "sovereign",
        "sovereign-node",
        "sovereign-audit",
        "sovereign-auditctl",
        "sovereign-import",
    ] {
        inputs.push(workspace_binary(name).expect("a workspace binary"));
    }
    let script = format!(
        r#"set -eu
cd "{{out}}"
s() {{ "{bin}/sovereign" "$@"; }}
s key generate --out signer
s key generate --out build.key
s cluster init --name test --out cluster
# The LAN stand-in is the host's loopback: every node answers on 127.0.0.1.
for node in {nodes}; do
  s node enroll --cluster cluster --name "$node" --lan-ip 127.0.0.1 --out "$node.identity"
done
# node-d: enrolled, then revoked (cluster/revoked.crl goes onto the model stick).
s node enroll --cluster cluster --name node-d --lan-ip 127.0.0.1 --out node-d.identity
s cluster revoke --cluster cluster node-d
s trust init --signer signer.pub --threshold 1 --out node.trust
started=$(date +%s)
s image build --profile test --bundle-trust node.trust --cluster-ca cluster/ca.pem \
  --key build.key --out out > build.log
echo "image build (test profile): $(( $(date +%s) - started )) s" >> build.log
mkdir good bad
for release in good:1.0.0 good:1.1.0 bad:2.0.0; do
  dir=${{release%%:*}} version=${{release#*:}}
  s bundle create --name smollm2 --version "$version" --out "$dir/smollm2-$version.sovb" "{model}"
  s bundle sign --key signer "$dir/smollm2-$version.sovb"
done
# The tampered release: one byte of the payload flipped after signing.
python3 -c 'import sys; p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[-4096] ^= 0x55; open(p, "wb").write(b)' \
  bad/smollm2-2.0.0.sovb
echo "operator blake3:{key_hash}" > api-keys
"#,
        bin = bin.display(),
        nodes = NODES.join(" "),
        model = model.display(),
        key_hash = blake3::hash(API_KEY.as_bytes()).to_hex(),
    );
    let dir = cached_build(
        "operator-kit",
        &["bash".into(), "-c".into(), script],
        &inputs,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{}",
        fs::read_to_string(dir.join("build.log")).unwrap_or_default()
    );
    Kit { dir, sovereign }
}

impl Kit {
    /// Runs `sovereign ARGS` in `cwd` (paths in ARGS relative to it).
    pub fn sov(&self, cwd: &Path, args: &[&str]) -> String {
        run(Command::new(&self.sovereign).args(args).current_dir(cwd))
    }

    /// `sovereign audit verify` of an audit log, export or courier folder
    /// with the kit's cluster CA alone, as an auditor runs it; its output.
    pub fn verify_audit(&self, path: &Path) -> String {
        self.sov(
            &self.dir,
            &[
                "audit",
                "verify",
                "--cluster-ca",
                self.path("cluster/ca.pem").to_str().expect("utf8"),
                path.to_str().expect("utf8"),
            ],
        )
    }

    /// A file of the kit.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Flashes the kit's image onto a new 1 GiB disk file `disk` for `node`
    /// (its enrolled identity and the kit's API keys).
    pub fn flash(&self, node: &str, disk: &Path) {
        fs::File::create(disk)
            .and_then(|f| f.set_len(1 << 30))
            .expect("disk");
        let flashed = self.sov(
            &self.dir,
            &[
                "flash",
                "--image",
                "out/node.img",
                "--device",
                disk.to_str().expect("utf8"),
                "--node",
                &format!("{node}.identity"),
                "--api-keys",
                "api-keys",
            ],
        );
        assert!(flashed.contains("verified by read-back"), "{flashed}");
    }
}

/// A FAT32 stick image holding `files`.
pub fn stick(dir: &Path, name: &str, files: &[&Path]) -> PathBuf {
    let image = dir.join(name);
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "STICK", "-C"])
        .arg(&image)
        .arg("196608"));
    for file in files {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&image)
            .arg(file)
            .arg("::/")
            .env("MTOOLS_SKIP_CHECK", "1"));
    }
    image
}

/// Waits until the node's stick units have left `count` courier checkpoints
/// of their own node in all (the ring members' lines, `NODE: left ...`, are
/// not counted) and no stick is mounted any more (safe to unplug).
pub fn wait_for_couriers(node: &mut Machine, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let wanted = [count.to_string(), "0".to_owned()];
    loop {
        let state = node
            .succeed(
                "journalctl -b -o cat -u 'sovereign-stick@*' | grep -c '^left the checkpoint'; \
                 findmnt -rn -o TARGET | grep -c sovereign/stick; true",
                Duration::from_secs(60),
            )
            .expect("journal");
        if state.split_whitespace().collect::<Vec<_>>() == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "couriers written, sticks mounted: {state}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Copies the courier folders off the stick image `stick` into `out`;
/// returns `out/sovereign-audit` (one folder per node, named after it).
pub fn courier_folders(stick: &Path, out: &Path) -> PathBuf {
    fs::create_dir_all(out).expect("dir");
    run(Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(stick)
        .arg("::/sovereign-audit")
        .arg(out)
        .env("MTOOLS_SKIP_CHECK", "1"));
    out.join("sovereign-audit")
}
