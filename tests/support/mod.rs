//! A small lab for CLI tests: a temp dir, signing keys, a trust file, model
//! files, and helpers that run the real `sovereign` binary.
#![allow(dead_code)]

pub mod cluster;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Lab {
    pub dir: tempfile::TempDir,
}

/// The result of one CLI run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts success.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts a clean refusal: exit 1 and an `error:` line containing `fragment`,
    /// and no panic.
    pub fn refused(self, fragment: &str) -> Self {
        assert_eq!(
            self.code, 1,
            "expected exit 1:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "panicked: {}",
            self.stderr
        );
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error:") && l.contains(fragment))
            .unwrap_or_else(|| {
                panic!(
                    "no `error:` line containing {fragment:?} in:\n{}",
                    self.stderr
                )
            });
        assert!(!line.is_empty());
        self
    }
}

impl Lab {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `sovereign ARGS` in the lab directory.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(env!("CARGO_BIN_EXE_sovereign"))
                .args(args)
                .current_dir(self.dir.path())
                .output()
                .expect("run sovereign"),
        )
    }

    /// A signing key named `name` (files `name`, `name.pub`).
    pub fn key(&self, name: &str) -> String {
        if !self.path(name).exists() {
            self.run(&["key", "generate", "--out", name]).ok();
        }
        format!("{name}.pub")
    }

    /// A trust file `out` over `signers` with `threshold`.
    pub fn trust(&self, out: &str, signers: &[&str], threshold: usize, sequence: u64) {
        let pubs: Vec<String> = signers.iter().map(|s| self.key(s)).collect();
        let mut args = vec!["trust", "init", "--out", out, "--threshold"];
        let threshold = threshold.to_string();
        let sequence = sequence.to_string();
        args.push(&threshold);
        args.extend(["--sequence", &sequence]);
        for p in &pubs {
            args.extend(["--signer", p.as_str()]);
        }
        self.run(&args).ok();
    }

    /// A model directory with a few files of pseudo-random bytes.
    pub fn model(&self, name: &str, size: usize, seed: u8) -> String {
        let dir = self.path(name);
        fs::create_dir_all(dir.join("tokenizer")).unwrap();
        let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        fs::write(dir.join("model.gguf"), &bytes).unwrap();
        fs::write(
            dir.join("tokenizer/tokenizer.json"),
            format!("{{\"seed\": {seed}}}"),
        )
        .unwrap();
        name.to_owned()
    }

    /// Creates and signs `out` from `model` with the given keys.
    pub fn bundle(
        &self,
        out: &str,
        name: &str,
        version: &str,
        model: &str,
        signers: &[&str],
        extra: &[&str],
    ) {
        let mut args = vec![
            "bundle",
            "create",
            "--name",
            name,
            "--version",
            version,
            "--out",
            out,
        ];
        args.extend(extra);
        args.push(model);
        self.run(&args).ok();
        for signer in signers {
            self.key(signer);
            self.run(&["bundle", "sign", "--key", signer, out]).ok();
        }
    }

    /// Imports the real demo model (scripts/fetch-model) into `store` as
    /// `smollm2@1.0.0`, signed by `alice` under `node.trust`.
    /// The demo model's file (fetched once per machine by `scripts/fetch-model`).
    pub fn demo_model(&self) -> String {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-model"))
            .output()
            .expect("run scripts/fetch-model");
        assert!(
            out.status.success(),
            "fetch-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 path")
            .trim()
            .to_owned()
    }

    pub fn import_demo_model(&self) {
        let model = self.demo_model();
        self.trust("node.trust", &["alice"], 1, 1);
        self.bundle(
            "smollm2-1.0.0.sovb",
            "smollm2",
            "1.0.0",
            &model,
            &["alice"],
            &[],
        );
        self.run(&[
            "import",
            "--store",
            "store",
            "--trust",
            "node.trust",
            "smollm2-1.0.0.sovb",
        ])
        .ok();
    }

    /// Everything that makes the store's state visible: the live tree with
    /// file hashes and the installed trust file (the index only adds history).
    pub fn snapshot(&self, store: &str) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let root = self.path(store);
        walk(&root.join("models"), &root, &mut map);
        if let Ok(trust) = fs::read_to_string(root.join("trust")) {
            map.insert("trust".into(), trust);
        }
        if let Ok(entries) = fs::read_dir(root.join("staging")) {
            for entry in entries.flatten() {
                map.insert(
                    format!("staging leftover {:?}", entry.file_name()),
                    String::new(),
                );
            }
        }
        map
    }
}

fn walk(dir: &Path, root: &Path, map: &mut BTreeMap<String, String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        if path.is_dir() {
            map.insert(rel.clone(), "dir".into());
            walk(&path, root, map);
        } else {
            map.insert(
                rel,
                blake3::hash(&fs::read(&path).unwrap()).to_hex().to_string(),
            );
        }
    }
}

/// Flips one bit of `path` at `offset` (from the end if negative).
pub fn flip(path: &Path, offset: i64) {
    let mut bytes = fs::read(path).unwrap();
    let index = if offset < 0 {
        bytes.len() - (-offset) as usize
    } else {
        offset as usize
    };
    bytes[index] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// A Python with the official `openai` client (a venv made once per target dir).
pub fn python_with_openai() -> std::path::PathBuf {
    python_venv("openai-venv", "openai", &["openai==1.99.9"])
}

/// A virtual environment in the test's temporary directory with `packages`
/// (pinned) installed, made once and reused while `module` imports.
pub fn python_venv(name: &str, module: &str, packages: &[&str]) -> std::path::PathBuf {
    // Several tests may want the same venv: one makes it while the others wait.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    let has_module = |p: &std::path::Path| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            // LiteLLM fetches its cost map from the internet on import unless told not to.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_module(&python) {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(
            made.success(),
            "python3 -m venv failed (apt-get install python3-venv)"
        );
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(packages)
            .status()
            .expect("pip install");
        assert!(pip.success(), "pip install {packages:?} failed");
    }
    python
}
