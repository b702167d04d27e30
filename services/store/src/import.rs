//! The verified import: signatures, policy, space, then every byte into
//! staging, then one atomic rename. The only code that writes model files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sovereign_signing::{
    is_bundle_file_name, is_part_file_name, UnverifiedBundle, VerifiedPayload,
};

use crate::error::{describe, StoreError};
use crate::index::{HistoryRecord, VersionRecord};
use crate::layout;
use crate::revocation_state;
use crate::store::Store;
use crate::trust_state::{self, Offered};

/// Records import outcomes in the audit log. Recording must be durable when
/// it returns `Ok`; an error before a commit aborts the import (fail closed).
pub trait ImportAudit {
    /// Records one event.
    fn record(&self, event: &ImportEvent<'_>) -> Result<(), String>;

    /// Every `NAME@VERSION` the log records as imported: the rollback anchor.
    fn imported_models(&self) -> Result<Vec<String>, String>;
}

impl ImportAudit for sovereign_audit::Auditor {
    fn record(&self, event: &ImportEvent<'_>) -> Result<(), String> {
        let details = serde_json::json!({
            "source": event.source.display().to_string(),
            "model": event.model,
            "outcome": event.outcome,
            "reason": event.reason,
        });
        sovereign_audit::Auditor::record(
            self,
            sovereign_audit::Event::new("import", "import", details),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn imported_models(&self) -> Result<Vec<String>, String> {
        sovereign_audit::Auditor::imported_models(self)
            .map(|models| models.into_iter().collect())
            .map_err(|e| e.to_string())
    }
}

/// The highest version of `name` among the anchor's `NAME@VERSION` ids.
fn anchored_version(models: &[String], name: &str) -> Option<semver::Version> {
    models
        .iter()
        .filter_map(|id| id.rsplit_once('@'))
        .filter(|(n, _)| *n == name)
        .filter_map(|(_, v)| v.parse().ok())
        .max()
}

/// One import outcome, as the audit log sees it.
#[derive(Debug)]
pub struct ImportEvent<'a> {
    /// The bundle or trust file.
    pub source: &'a Path,
    /// `NAME@VERSION`, when the manifest could be read.
    pub model: Option<String>,
    /// `imported`, `already-present`, `rejected`, `skipped`, `trust-installed`,
    /// `revocations-installed`.
    pub outcome: &'static str,
    /// Why, for refusals and skips.
    pub reason: Option<String>,
}

/// How to import.
#[derive(Default)]
pub struct ImportOptions<'a> {
    /// The operator's trust file (installed if the store has none).
    pub trust: Option<&'a Path>,
    /// The age identity for encrypted bundles.
    pub identity: Option<&'a age::x25519::Identity>,
    /// Accept a version older than the newest imported (audited).
    pub allow_downgrade: bool,
    /// Where outcomes are recorded; `None` on a dev host without an audit log.
    pub audit: Option<&'a dyn ImportAudit>,
    /// The cluster CA that signs revocation lists (`*.crl` on a stick);
    /// without it such files are skipped.
    pub cluster_ca: Option<&'a sovereign_identity::ClusterCa>,
    /// Where a copy of each newly imported bundle file (and its parts) is left
    /// for the node's replication to pass on: [`Store::outbox`].
    pub outbox: Option<&'a Path>,
    /// The bundle is still arriving (a replication transfer into a spool):
    /// verify and unpack each byte as it lands
    /// ([`UnverifiedBundle::open_arriving`]).
    pub arrival: Option<std::sync::Arc<dyn sovereign_signing::Arrival>>,
}

/// A version that became live.
#[derive(Debug, Clone)]
pub struct Imported {
    /// `NAME@VERSION`.
    pub id: String,
    /// Bytes of model files written.
    pub bytes: u64,
    /// Files written.
    pub files: usize,
    /// Wall time of the import.
    pub seconds: f64,
    /// Whether this was an allowed downgrade.
    pub downgrade: bool,
}

/// What happened to one file of an import.
#[derive(Debug)]
pub enum Outcome {
    /// The bundle verified and is live.
    Imported(Imported),
    /// This exact version was already installed.
    AlreadyPresent(String),
    /// A newer trust file was installed.
    TrustInstalled(u64),
    /// A newer revocation list was installed (its sequence).
    RevocationsInstalled(u64),
    /// The file was refused; the store is unchanged.
    Rejected(String),
    /// Not a bundle or trust file; ignored.
    Skipped(String),
}

/// One line of an import report.
#[derive(Debug)]
pub struct ReportEntry {
    /// The file on the stick (or the bundle given).
    pub file: PathBuf,
    /// What happened to it.
    pub outcome: Outcome,
}

impl Store {
    /// Imports one bundle file. Every outcome is recorded in the history (and
    /// in the audit log when one is configured).
    pub fn import_bundle(
        &self,
        path: &Path,
        options: &ImportOptions<'_>,
    ) -> Result<Outcome, StoreError> {
        self.bootstrap_trust(options)?;
        let mut model = None;
        let result = self.import_verified(path, options, &mut model);
        let (label, detail) = match &result {
            Ok(Some(imported)) if imported.downgrade => {
                ("imported", "downgrade allowed".to_owned())
            }
            Ok(Some(_)) => ("imported", String::new()),
            Ok(None) => ("already-present", String::new()),
            Err(e) => ("rejected", describe(e)),
        };
        let noted = self.note(
            path,
            model.clone(),
            label,
            &detail,
            options,
            result.is_err(),
        );
        let outcome = match result? {
            Some(imported) => {
                if let Some(outbox) = options.outbox {
                    crate::outbox::keep(path, outbox, &imported.id);
                }
                Outcome::Imported(imported)
            }
            None => Outcome::AlreadyPresent(model.unwrap_or_default()),
        };
        noted?;
        Ok(outcome)
    }

    /// Imports a bundle file, or every bundle in a directory as on a mounted
    /// USB stick: newer trust files (`*.trust`) and revocation lists (`*.crl`)
    /// first, then bundles (`*.sovb`); anything else is skipped and reported.
    /// Returns one entry per file.
    pub fn import_path(
        &self,
        path: &Path,
        options: &ImportOptions<'_>,
    ) -> Result<Vec<ReportEntry>, StoreError> {
        let meta = fs::symlink_metadata(path).map_err(|e| StoreError::io(path, e))?;
        if !meta.is_dir() {
            let outcome = self.import_bundle(path, options)?;
            return Ok(vec![ReportEntry {
                file: path.to_owned(),
                outcome,
            }]);
        }
        self.bootstrap_trust(options)?;
        let mut names: Vec<String> = fs::read_dir(path)
            .map_err(|e| StoreError::io(path, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::io(path, e))?;
        names.sort();
        let mut report = Vec::new();
        let (trusts, rest): (Vec<_>, Vec<_>) = names
            .into_iter()
            .partition(|n| n.ends_with(".trust") && !n.starts_with('.'));
        let (lists, rest): (Vec<_>, Vec<_>) = rest
            .into_iter()
            .partition(|n| n.ends_with(".crl") && !n.starts_with('.'));
        for name in lists {
            let file = path.join(&name);
            let outcome = match options.cluster_ca {
                None => Outcome::Skipped("no cluster CA to check a revocation list against".into()),
                Some(ca) => match revocation_state::offer(&self.root, &file, ca, &|sequence| {
                    self.record_first(&file, "revocations-installed", sequence, options)
                }) {
                    Ok(Some(sequence)) => Outcome::RevocationsInstalled(sequence),
                    Ok(None) => Outcome::Skipped("revocation list is already installed".into()),
                    Err(StoreError::Audit(reason)) => return Err(StoreError::Audit(reason)),
                    Err(e) => Outcome::Rejected(describe(&e)),
                },
            };
            let (label, reason) = match &outcome {
                Outcome::RevocationsInstalled(_) => ("revocations-installed", String::new()),
                Outcome::Rejected(reason) => ("rejected", reason.clone()),
                Outcome::Skipped(reason) => ("skipped", reason.clone()),
                _ => ("skipped", String::new()),
            };
            self.note(&file, None, label, &reason, options, false)?;
            report.push(ReportEntry { file, outcome });
        }
        for name in trusts {
            let file = path.join(&name);
            let outcome = match self.rotate_trust(&file, options) {
                Ok(Offered::Installed(sequence)) => Outcome::TrustInstalled(sequence),
                Ok(Offered::Kept(_)) => Outcome::Skipped("trust file is already installed".into()),
                Err(StoreError::Audit(reason)) => return Err(StoreError::Audit(reason)),
                Err(e) => Outcome::Rejected(describe(&e)),
            };
            let (label, reason) = match &outcome {
                Outcome::TrustInstalled(_) => ("trust-installed", String::new()),
                Outcome::Rejected(reason) => ("rejected", reason.clone()),
                _ => ("skipped", "already installed".to_owned()),
            };
            self.note(&file, None, label, &reason, options, false)?;
            report.push(ReportEntry { file, outcome });
        }
        for name in rest {
            let file = path.join(&name);
            if is_part_file_name(&name) {
                continue;
            }
            let is_file = fs::symlink_metadata(&file)
                .map(|m| m.is_file())
                .unwrap_or(false);
            if !is_bundle_file_name(&name) || !is_file {
                let reason = if name.starts_with("._") {
                    "macOS metadata file, not a bundle".to_owned()
                } else if !is_file {
                    "not a regular file".to_owned()
                } else {
                    "not a bundle".to_owned()
                };
                self.note(&file, None, "skipped", &reason, options, false)?;
                report.push(ReportEntry {
                    file,
                    outcome: Outcome::Skipped(reason),
                });
                continue;
            }
            let outcome = match self.import_bundle(&file, options) {
                Ok(outcome) => outcome,
                Err(StoreError::Audit(reason)) => return Err(StoreError::Audit(reason)),
                Err(e) => Outcome::Rejected(describe(&e)),
            };
            report.push(ReportEntry { file, outcome });
        }
        Ok(report)
    }

    fn bootstrap_trust(&self, options: &ImportOptions<'_>) -> Result<(), StoreError> {
        if let Some(path) = options.trust {
            trust_state::offer(&self.root, &trust_state::read(path)?, true, &|_| Ok(()))?;
        }
        Ok(())
    }

    /// Installs a newer trust file from a stick; the audit log records the
    /// rotation first (fail closed, as for bundles).
    fn rotate_trust(
        &self,
        file: &Path,
        options: &ImportOptions<'_>,
    ) -> Result<Offered, StoreError> {
        let offered = trust_state::read(file)?;
        trust_state::offer(&self.root, &offered, false, &|sequence| {
            self.record_first(file, "trust-installed", sequence, options)
        })
    }

    /// Records the installation of a trust file or revocation list before it
    /// is renamed into place; an audit error refuses it.
    fn record_first(
        &self,
        file: &Path,
        outcome: &'static str,
        sequence: u64,
        options: &ImportOptions<'_>,
    ) -> Result<(), StoreError> {
        match options.audit {
            Some(audit) => audit
                .record(&ImportEvent {
                    source: file,
                    model: None,
                    outcome,
                    reason: Some(format!("sequence {sequence}")),
                })
                .map_err(StoreError::Audit),
            None => Ok(()),
        }
    }

    /// Records an outcome in the history and the audit log. When `failed` the
    /// operation has already failed and an audit error is reported alongside.
    fn note(
        &self,
        source: &Path,
        model: Option<String>,
        outcome: &'static str,
        detail: &str,
        options: &ImportOptions<'_>,
        failed: bool,
    ) -> Result<(), StoreError> {
        self.index.append_history(&HistoryRecord {
            time: layout::now(),
            action: "import".into(),
            subject: model
                .clone()
                .unwrap_or_else(|| source.display().to_string()),
            outcome: outcome.into(),
            detail: detail.into(),
        })?;
        self.index.flush()?;
        if matches!(
            outcome,
            "imported" | "trust-installed" | "revocations-installed"
        ) {
            // Recorded before the commit (see `import_verified`, `record_first`).
            return Ok(());
        }
        if let Some(audit) = options.audit {
            let event = ImportEvent {
                source,
                model,
                outcome,
                reason: (!detail.is_empty()).then(|| detail.to_owned()),
            };
            if let Err(e) = audit.record(&event) {
                if !failed {
                    return Err(StoreError::Audit(e));
                }
                tracing::error!(error = %e, "audit log cannot record a rejected import");
            }
        }
        Ok(())
    }

    /// Verifies and commits; `Ok(None)` when this exact version is installed.
    fn import_verified(
        &self,
        path: &Path,
        options: &ImportOptions<'_>,
        model: &mut Option<String>,
    ) -> Result<Option<Imported>, StoreError> {
        let started = Instant::now();
        let bundle = match &options.arrival {
            Some(arrival) => UnverifiedBundle::open_arriving(path, arrival.clone()),
            None => UnverifiedBundle::open(path),
        }
        .map_err(StoreError::from_bundle)?;
        let manifest = bundle.manifest().clone();
        *model = Some(manifest.id());
        let trust = trust_state::installed(&self.root)?.ok_or(StoreError::NoTrust)?;
        let verified = bundle.verify(trust.trust())?;
        let manifest_hash = blake3::hash(verified.manifest_bytes()).to_hex().to_string();

        if let Some(existing) = self.index.version(&manifest.name, &manifest.version)? {
            return if existing.manifest_blake3 == manifest_hash {
                Ok(None)
            } else {
                Err(StoreError::Conflict(manifest.id()))
            };
        }
        // Rollback protection anchored in the signed audit log: a version
        // below the newest the log records as imported is refused even when
        // the index forgot it (deleted, or replaced by an older copy).
        if let Some(audit) = options.audit {
            let models = audit.imported_models().map_err(StoreError::Audit)?;
            if let Some(anchored) = anchored_version(&models, &manifest.name) {
                let indexed = self.index.high_water(&manifest.name)?;
                if manifest.version < anchored
                    && indexed.as_ref().is_none_or(|v| *v < anchored)
                    && !options.allow_downgrade
                {
                    return Err(StoreError::AnchorMismatch {
                        name: manifest.name.clone(),
                        anchored,
                        indexed,
                    });
                }
            }
        }
        let mut downgrade = false;
        if let Some(newest) = self.index.high_water(&manifest.name)? {
            if manifest.version < newest {
                if !options.allow_downgrade {
                    return Err(StoreError::Rollback {
                        name: manifest.name.clone(),
                        offered: manifest.version.clone(),
                        newest,
                    });
                }
                downgrade = true;
            }
        }
        let staging = layout::staging(&self.root).join(format!(
            "{}-{}-{}",
            manifest.name,
            manifest.version,
            std::process::id()
        ));
        let result = self.stage_and_commit(&staging, verified, options, path, downgrade);
        if staging.exists() {
            let _ = fs::remove_dir_all(&staging);
        }
        let payload = result?;
        let record = VersionRecord {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_blake3: manifest_hash,
            bytes: manifest.content_size(),
            files: manifest.files.len(),
            imported_at: layout::now(),
        };
        self.index.put_version(&record)?;
        self.index.flush()?;
        tracing::info!(model = %manifest.id(), bytes = record.bytes, "imported");
        Ok(Some(Imported {
            id: payload.manifest().id(),
            bytes: record.bytes,
            files: record.files,
            seconds: started.elapsed().as_secs_f64(),
            downgrade,
        }))
    }

    fn stage_and_commit(
        &self,
        staging: &Path,
        verified: sovereign_signing::VerifiedBundle,
        options: &ImportOptions<'_>,
        source: &Path,
        downgrade: bool,
    ) -> Result<VerifiedPayload, StoreError> {
        let manifest = verified.manifest().clone();
        let needed = manifest.content_size() + verified.manifest_bytes().len() as u64;
        let stats = rustix::fs::statvfs(layout::staging(&self.root))
            .map_err(|e| StoreError::io(layout::staging(&self.root), e.into()))?;
        let available = stats.f_bavail.saturating_mul(stats.f_frsize);
        // Keep a margin for directory blocks and the index.
        if needed.saturating_add(1 << 20) > available {
            return Err(StoreError::NoSpace { needed, available });
        }
        let files = staging.join(layout::FILES);
        fs::create_dir_all(&files).map_err(|e| StoreError::io(&files, e))?;
        let payload = verified
            .unpack(&files, options.identity)
            .map_err(StoreError::from_bundle)?;
        let manifest_path = staging.join(layout::MANIFEST);
        write_synced(&manifest_path, payload.manifest_bytes())?;
        sync_tree(staging)?;

        if let Some(audit) = options.audit {
            let event = ImportEvent {
                source,
                model: Some(manifest.id()),
                outcome: "imported",
                reason: downgrade.then(|| "downgrade allowed by the operator".to_owned()),
            };
            audit.record(&event).map_err(StoreError::Audit)?;
        }

        let live = layout::version_dir(&self.root, &manifest.name, &manifest.version);
        let parent = live.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&parent).map_err(|e| StoreError::io(&parent, e))?;
        layout::sync_dir(&layout::models(&self.root))?;
        fs::rename(staging, &live).map_err(|e| {
            if crate::error::is_enospc(&e) {
                StoreError::DiskFull
            } else {
                StoreError::io(&live, e)
            }
        })?;
        layout::sync_dir(&parent)?;
        layout::sync_dir(&layout::staging(&self.root))?;
        Ok(payload)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let mut file = fs::File::create(path).map_err(|e| StoreError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| {
            if crate::error::is_enospc(&e) {
                StoreError::DiskFull
            } else {
                StoreError::io(path, e)
            }
        })
}

/// fsyncs every directory under `dir` (files were synced as they were written).
fn sync_tree(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        if entry
            .file_type()
            .map_err(|e| StoreError::io(dir, e))?
            .is_dir()
        {
            sync_tree(&entry.path())?;
        }
    }
    layout::sync_dir(dir)
}
