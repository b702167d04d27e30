//! The audit log on disk and its writer, with group commit.
//!
//! ```text
//! DIR/node               the node's name
//! DIR/node.key           the key that signs now (0600; made on first open when absent,
//!                        replaced by the enrolled key at a key change)
//! DIR/node.pub           the key the log started with (never changes)
//! DIR/records.jsonl      one signed record per line, fsynced before `record` returns
//! DIR/checkpoints.jsonl  one signed checkpoint note per line
//! ```
//!
//! Concurrent writers share fsyncs: whoever finds no flush in progress writes
//! every pending line and syncs once; the others wait for it (group commit).
//! If a write or sync fails the log stops accepting records for good, so no
//! caller is ever told a record is durable when it is not (fail closed).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sovereign_signing::{PublicKey, SigningKey};

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::keychange;
use crate::merkle::{consistency_proof, Frontier, Hash};
use crate::record::{seal_line, Event, Peer, RecordBody};
use crate::verify::{check_line, verify_chain};
use sovereign_identity::NodeIdentity;

pub(crate) const RECORDS: &str = "records.jsonl";
pub(crate) const CHECKPOINTS: &str = "checkpoints.jsonl";
pub(crate) const KEY: &str = "node.key";
pub(crate) const PUBLIC: &str = "node.pub";
pub(crate) const NODE: &str = "node";

struct State {
    file: Arc<File>,
    frontier: Frontier,
    leaves: Vec<Hash>,
    pending: Vec<u8>,
    durable: u64,
    flushing: bool,
    failed: Option<String>,
    checkpointed: u64,
}

/// An open audit log. Cheap to share between threads (`Arc<AuditLog>`).
pub struct AuditLog {
    dir: PathBuf,
    node: String,
    key: SigningKey,
    certificate: Option<String>,
    state: Mutex<State>,
    flushed: Condvar,
}

impl AuditLog {
    /// Opens the log in `dir`, creating it (and the node key) if needed. A torn
    /// last line from a crash is cut off; any other damage refuses to open,
    /// naming the first bad record.
    pub fn open(dir: &Path, node: &str) -> Result<Self, AuditError> {
        Self::open_with(dir, node, None)
    }

    /// Opens the log and makes it sign with the enrolled node key: if the
    /// log is signed by another key, appends the key-change record (signed
    /// by the key in force, carrying the certificate and the new key's
    /// link signature), then signs with the identity's key from then on.
    pub fn open_enrolled(
        dir: &Path,
        node: &str,
        identity: &NodeIdentity,
    ) -> Result<Self, AuditError> {
        Self::open_with(dir, node, Some(identity))
    }

    fn open_with(
        dir: &Path,
        node: &str,
        identity: Option<&NodeIdentity>,
    ) -> Result<Self, AuditError> {
        fs::create_dir_all(dir).map_err(|e| AuditError::io(dir, e))?;
        let key_path = dir.join(KEY);
        if !key_path.exists() {
            sovereign_signing::generate_signing_key(&key_path)?;
            fs::rename(dir.join(format!("{KEY}.pub")), dir.join(PUBLIC))
                .map_err(|e| AuditError::io(dir, e))?;
        }
        let held = sovereign_signing::read_signing_key(&key_path)?;
        let initial = sovereign_signing::read_public_key(&dir.join(PUBLIC).display().to_string())?;
        let node_path = dir.join(NODE);
        let node = match fs::read_to_string(&node_path) {
            Ok(name) => name.trim().to_owned(),
            Err(_) => {
                write_synced(&node_path, format!("{node}\n").as_bytes())?;
                node.to_owned()
            }
        };
        let path = dir.join(RECORDS);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|e| AuditError::io(&path, e))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(
                bytes = text.len() - complete,
                "cutting a torn last audit record"
            );
            file.set_len(complete as u64)
                .map_err(|e| AuditError::io(&path, e))?;
            file.sync_all().map_err(|e| AuditError::io(&path, e))?;
        }
        let text = String::from_utf8(text[..complete].to_vec())
            .map_err(|_| AuditError::Format(format!("{} is not UTF-8", path.display())))?;
        let chain = verify_chain(text.lines(), &initial)?;
        let enrolled = identity.map(|id| SigningKey::from_seed(&id.signing_key().to_bytes()));
        // The key in force: the log's current key, which we must hold.
        let key = match &enrolled {
            Some(new) if new.public_key() == chain.current_key => SigningKey::from_seed(&new.seed()),
            _ if held.public_key() == chain.current_key => held,
            _ => {
                return Err(AuditError::Format(format!(
                    "{}: the log is signed by {} now, and neither {} nor the given identity holds that key",
                    dir.display(),
                    chain.current_key,
                    key_path.display()
                )))
            }
        };
        let certificate = chain.certificate;
        let leaves = chain.leaves;
        let mut frontier = Frontier::default();
        leaves.iter().for_each(|l| frontier.push(*l));
        let checkpointed = read_checkpoints(dir)?
            .last()
            .and_then(|note| Checkpoint::verify(note, &key.public_key()).ok())
            .map_or(0, |cp| cp.size);
        let durable = leaves.len() as u64;
        let mut log = Self {
            dir: dir.to_owned(),
            node,
            key,
            certificate,
            state: Mutex::new(State {
                file: Arc::new(file),
                frontier,
                leaves,
                pending: Vec::new(),
                durable,
                flushing: false,
                failed: None,
                checkpointed,
            }),
            flushed: Condvar::new(),
        };
        if let (Some(identity), Some(new)) = (identity, enrolled) {
            log.hand_over(identity, new)?;
        }
        Ok(log)
    }

    /// Moves the log to the enrolled key (no-op when it already signs with
    /// it): the key-change record first, durable, then `node.key`.
    fn hand_over(&mut self, identity: &NodeIdentity, new: SigningKey) -> Result<(), AuditError> {
        if self.key.public_key() != new.public_key() {
            let event = keychange::event(
                &self.key.public_key(),
                &new,
                &identity.certificate_pem(),
                identity.serial(),
            );
            self.append(event, None)?;
            self.key = SigningKey::from_seed(&new.seed());
            self.certificate = Some(identity.certificate_pem());
        }
        let key_path = self.dir.join(KEY);
        let held = sovereign_signing::read_signing_key(&key_path)?;
        if held.public_key() != new.public_key() {
            let temp = self.dir.join(format!("{KEY}.new"));
            let _ = fs::remove_file(&temp);
            sovereign_signing::write_secret_file(&temp, new.to_text().as_bytes())?;
            fs::rename(&temp, &key_path).map_err(|e| AuditError::io(&key_path, e))?;
        }
        Ok(())
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA-issued certificate (PEM) of the key that signs now, once enrolled.
    pub fn certificate(&self) -> Option<&str> {
        self.certificate.as_deref()
    }

    /// The key that signs records and checkpoints now.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Every model id (`details.model`) that an `import` service record
    /// says was imported (`details.outcome` = `imported`), each once: the
    /// store's rollback anchor, which no one can delete from the log.
    pub fn imported_models(&self) -> Result<BTreeSet<String>, AuditError> {
        // Under the writers' lock: no half-appended line is read.
        let _state = self.lock()?;
        let path = self.dir.join(RECORDS);
        let text = fs::read_to_string(&path).map_err(|e| AuditError::io(&path, e))?;
        let mut models = BTreeSet::new();
        for line in text.lines() {
            let stored: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| AuditError::Format(format!("{}: {e}", path.display())))?;
            let event = &stored["record"];
            if event["service"] == "import"
                && event["kind"] == "import"
                && event["details"]["outcome"] == "imported"
            {
                if let Some(model) = event["details"]["model"].as_str() {
                    models.insert(model.to_owned());
                }
            }
        }
        Ok(models)
    }

    /// Whether the log still records (a failed write closes it for good).
    pub fn is_open(&self) -> bool {
        self.lock().is_ok_and(|state| state.failed.is_none())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, AuditError> {
        self.state
            .lock()
            .map_err(|_| AuditError::Closed("a writer panicked".into()))
    }

    /// Appends one record made in-process and returns its sequence number
    /// once it is on disk.
    pub fn record(&self, event: Event) -> Result<u64, AuditError> {
        self.record_from(event, None)
    }

    /// Appends one record sent by `peer` (stamped into the record) and returns
    /// its sequence number once it is on disk. An event that breaks
    /// [`Event::check`] is refused; the stored line is checked exactly as a
    /// verifier will read it before anyone is told it is recorded.
    /// Key changes are the log's own: an event posing as one is refused.
    pub fn record_from(&self, event: Event, peer: Option<Peer>) -> Result<u64, AuditError> {
        if event.service == keychange::SERVICE && event.kind == keychange::KIND {
            return Err(AuditError::Refused(
                "key-change records are written by the log itself at enrollment".into(),
            ));
        }
        self.append(event, peer)
    }

    fn append(&self, event: Event, peer: Option<Peer>) -> Result<u64, AuditError> {
        event.check().map_err(AuditError::Refused)?;
        let mut state = self.lock()?;
        if let Some(reason) = &state.failed {
            return Err(AuditError::Closed(reason.clone()));
        }
        let seq = state.frontier.size();
        let body = RecordBody {
            seq,
            time: now(),
            node: self.node.clone(),
            peer,
            event,
        };
        let bytes = body.to_bytes();
        let mut frontier = state.frontier.clone();
        let mut probe = frontier.clone();
        probe.push(crate::merkle::leaf_hash(&bytes));
        let line = seal_line(seq, &bytes, &probe.root(), &self.key);
        let line = String::from_utf8(line)
            .map_err(|_| AuditError::Refused("the record is not UTF-8".into()))?;
        let leaf = check_line(&line, seq, &mut frontier, &self.key.public_key())
            .map_err(|reason| AuditError::Refused(format!("would not verify: {reason}")))?;
        state.frontier = frontier;
        state.leaves.push(leaf);
        tracing::info!(
            target: "sovereign_audit",
            seq,
            service = %body.event.service,
            kind = %body.event.kind,
            details = %body.event.details,
            "audit record"
        );
        state.pending.extend_from_slice(line.as_bytes());
        state.pending.push(b'\n');
        drop(self.wait_durable(state, seq + 1)?);
        Ok(seq)
    }

    /// Blocks until the first `target` records are on disk, flushing if no
    /// one else is.
    fn wait_durable<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        target: u64,
    ) -> Result<MutexGuard<'a, State>, AuditError> {
        loop {
            if let Some(reason) = &state.failed {
                return Err(AuditError::Closed(reason.clone()));
            }
            if state.durable >= target {
                return Ok(state);
            }
            if state.flushing {
                state = self
                    .flushed
                    .wait(state)
                    .map_err(|_| AuditError::Closed("a writer panicked".into()))?;
                continue;
            }
            state.flushing = true;
            let batch = std::mem::take(&mut state.pending);
            let upto = state.frontier.size();
            let file = Arc::clone(&state.file);
            drop(state);
            let result = (&*file).write_all(&batch).and_then(|_| file.sync_data());
            state = self.lock()?;
            state.flushing = false;
            match result {
                Ok(()) => state.durable = upto,
                Err(e) => {
                    state.failed = Some(format!("{}: {e}", self.dir.join(RECORDS).display()));
                }
            }
            self.flushed.notify_all();
        }
    }

    /// Signs and stores a checkpoint of everything recorded so far.
    pub fn checkpoint(&self) -> Result<Checkpoint, AuditError> {
        let state = self.lock()?;
        let target = state.frontier.size();
        let mut state = self.wait_durable(state, target)?;
        let checkpoint = Checkpoint::sign(&self.node, target, &state.frontier.root(), &self.key);
        let line = serde_json::json!({ "note": checkpoint.note }).to_string();
        let path = self.dir.join(CHECKPOINTS);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(|e| AuditError::io(&path, e))?;
        state.checkpointed = target;
        Ok(checkpoint)
    }

    /// Records since the last checkpoint.
    pub fn unchecked(&self) -> u64 {
        self.lock()
            .map_or(0, |s| s.frontier.size() - s.checkpointed)
    }

    /// A consistency proof from the first `old` records to the first `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        let state = self.lock()?;
        if old > new || new > state.leaves.len() as u64 {
            return Err(AuditError::Inconsistent(format!(
                "no proof from size {old} to {new}: the log holds {} records",
                state.leaves.len()
            )));
        }
        Ok(consistency_proof(
            old as usize,
            &state.leaves[..new as usize],
        ))
    }

    /// The tree head over the first `size` records.
    pub fn root_at(&self, size: u64) -> Result<Hash, AuditError> {
        let state = self.lock()?;
        let leaves = state.leaves.get(..size as usize).ok_or_else(|| {
            AuditError::Inconsistent(format!("the log holds fewer than {size} records"))
        })?;
        Ok(crate::merkle::root(leaves))
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if self.unchecked() > 0 {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "could not write the shutdown checkpoint");
            }
        }
    }
}

/// The stored checkpoint notes of a log directory, oldest first.
pub(crate) fn read_checkpoints(dir: &Path) -> Result<Vec<String>, AuditError> {
    let path = dir.join(CHECKPOINTS);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AuditError::io(&path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["note"].as_str().map(str::to_owned))
                .ok_or_else(|| {
                    AuditError::Checkpoint(format!(
                        "{}: a line is not a checkpoint",
                        path.display()
                    ))
                })
        })
        .collect()
}

/// Writes `bytes` beside `path`, syncs and renames into place. The temporary
/// file is made anew (`O_EXCL`): a link planted under its name (on a stick)
/// is removed, never written through.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let temp = path.with_extension("tmp");
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuditError::io(&temp, e)),
    }
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| AuditError::io(&temp, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| AuditError::io(&temp, e))?;
    fs::rename(&temp, path).map_err(|e| AuditError::io(path, e))
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
