//! The daemon's unix-socket protocol and the recording handle services use.
//!
//! One JSON [`Event`] per line in; one line out: `{"seq": N}` once the record
//! is on disk, or `{"error": "..."}`. A line `{"courier": {"previous": NOTE}}`
//! (NOTE: the checkpoint a stick carries, or null) asks for a fresh checkpoint
//! and the consistency proof from NOTE: `{"courier": CourierPackage}`. A
//! line `{"imported": {}}` asks for every model id the log records as
//! imported (the store's rollback anchor): `{"imported": [ID, ...]}`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::courier::{courier_package, CourierPackage};
use crate::error::AuditError;
use crate::log::AuditLog;
use crate::policy::Gate;
use crate::record::Event;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A connection to the audit daemon. A connection the daemon closed (it
/// stopped or restarted) is replaced by a fresh one on the next request, so
/// a restarted daemon is used again; a request is never sent twice.
pub struct AuditClient {
    path: PathBuf,
    stream: Mutex<Option<BufReader<UnixStream>>>,
}

impl AuditClient {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Self, AuditError> {
        let stream = UnixStream::connect(path).map_err(|e| AuditError::io(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            stream: Mutex::new(Some(BufReader::new(stream))),
        })
    }

    fn reconnect(&self) -> Result<BufReader<UnixStream>, AuditError> {
        UnixStream::connect(&self.path)
            .map(BufReader::new)
            .map_err(|e| AuditError::Closed(format!("audit daemon: {e}")))
    }

    /// Whether the daemon is there: the connection is open (the daemon never
    /// speaks unasked, so a readable socket means it was closed), or a new
    /// one could be made. Records nothing.
    pub fn is_connected(&self) -> bool {
        let Ok(mut guard) = self.stream.lock() else {
            return false;
        };
        if let Some(stream) = guard.as_mut() {
            let socket = stream.get_mut();
            let alive = socket.set_nonblocking(true).is_ok()
                && matches!(socket.read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock)
                && socket.set_nonblocking(false).is_ok();
            if alive {
                return true;
            }
            *guard = None;
        }
        match self.reconnect() {
            Ok(stream) => {
                *guard = Some(stream);
                true
            }
            Err(_) => false,
        }
    }

    /// Sends one request line and reads the reply line. A line that could
    /// not be written on an old connection (the daemon restarted) is written
    /// once on a new one; after a failed read the connection is dropped.
    fn request(&self, request: &serde_json::Value) -> Result<serde_json::Value, AuditError> {
        let mut guard = self
            .stream
            .lock()
            .map_err(|_| AuditError::Closed("client poisoned".into()))?;
        let closed = |e: std::io::Error| AuditError::Closed(format!("audit daemon: {e}"));
        let line = format!("{request}\n");
        let fresh = guard.is_none();
        let mut stream = match guard.take() {
            Some(stream) => stream,
            None => self.reconnect()?,
        };
        if let Err(e) = stream.get_mut().write_all(line.as_bytes()) {
            if fresh {
                return Err(closed(e));
            }
            stream = self.reconnect()?;
            stream
                .get_mut()
                .write_all(line.as_bytes())
                .map_err(closed)?;
        }
        let mut reply = String::new();
        stream.read_line(&mut reply).map_err(closed)?;
        let reply: serde_json::Value = serde_json::from_str(&reply)
            .map_err(|_| AuditError::Closed("audit daemon closed the connection".into()))?;
        *guard = Some(stream);
        match reply["error"].as_str() {
            Some(error) => Err(AuditError::Closed(error.to_owned())),
            None => Ok(reply),
        }
    }

    /// Records an event; returns its sequence number once it is durable.
    pub fn record(&self, event: &Event) -> Result<u64, AuditError> {
        let request = serde_json::to_value(event).map_err(|e| AuditError::Format(e.to_string()))?;
        self.request(&request)?["seq"]
            .as_u64()
            .ok_or_else(|| AuditError::Closed("audit daemon sent a bad reply".into()))
    }

    /// Every model id the log records as imported ([`AuditLog::imported_models`]).
    pub fn imported_models(&self) -> Result<BTreeSet<String>, AuditError> {
        let reply = self.request(&serde_json::json!({ "imported": {} }))?;
        serde_json::from_value(reply["imported"].clone())
            .map_err(|e| AuditError::Closed(format!("audit daemon sent a bad reply: {e}")))
    }

    /// A fresh checkpoint and the proof from `previous` (the checkpoint a stick carries).
    pub fn courier(&self, previous: Option<&str>) -> Result<CourierPackage, AuditError> {
        let reply = self.request(&serde_json::json!({ "courier": { "previous": previous } }))?;
        serde_json::from_value(reply["courier"].clone())
            .map_err(|e| AuditError::Closed(format!("audit daemon sent a bad courier reply: {e}")))
    }
}

/// Serves the socket protocol for `log` until the listener fails; one thread
/// per connection. Every request passes `gate` (who may record what, and how
/// much); every record is stamped with its sender's credentials.
pub fn serve(listener: UnixListener, log: Arc<AuditLog>, gate: Arc<Gate>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let log = Arc::clone(&log);
                let gate = Arc::clone(&gate);
                std::thread::spawn(move || {
                    if let Err(e) = handle(stream, &log, &gate) {
                        tracing::warn!(error = %e, "audit client connection ended");
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "accepting an audit client"),
        }
    }
}

/// A request line: an event to record, or a courier request.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Request {
    Courier { courier: CourierRequest },
    Imported { imported: ImportedRequest },
    Event(Event),
}

/// The import-records request's (empty) body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportedRequest {}

/// The courier request's body.
#[derive(serde::Deserialize)]
struct CourierRequest {
    previous: Option<String>,
}

fn handle(stream: UnixStream, log: &AuditLog, gate: &Gate) -> std::io::Result<()> {
    let peer = Gate::peer(&stream)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            writer.write_all(b"{\"error\": \"request line too long\"}\n")?;
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Courier { courier }) => match gate
                .admit_courier(&peer)
                .map_err(AuditError::Refused)
                .and_then(|()| courier_package(log, courier.previous.as_deref()))
            {
                Ok(package) => serde_json::json!({ "courier": package }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            Ok(Request::Imported {
                imported: ImportedRequest {},
            }) => match gate
                .admit_anchor(&peer)
                .map_err(AuditError::Refused)
                .and_then(|()| log.imported_models())
            {
                Ok(models) => serde_json::json!({ "imported": models }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            Ok(Request::Event(event)) => match gate
                .admit(&peer, &event)
                .map_err(AuditError::Refused)
                .and_then(|()| log.record_from(event, Some(peer.clone())))
            {
                Ok(seq) => serde_json::json!({ "seq": seq }),
                Err(e) => {
                    tracing::warn!(uid = peer.uid, pid = peer.pid, error = %e, "audit event refused");
                    serde_json::json!({ "error": e.to_string() })
                }
            },
            Err(e) => serde_json::json!({ "error": format!("not an event: {e}") }),
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
}

/// Where a service's records go: a log it writes itself (dev host, `--audit-log`)
/// or the node's audit daemon.
pub enum Auditor {
    /// Writes the log directly.
    Local(Arc<AuditLog>),
    /// Sends to the daemon.
    Remote(AuditClient),
}

impl Auditor {
    /// Records an event durably or fails (callers fail closed).
    pub fn record(&self, event: Event) -> Result<u64, AuditError> {
        match self {
            Self::Local(log) => log.record(event),
            Self::Remote(client) => client.record(&event),
        }
    }

    /// Every model id the log records as imported (the store's rollback anchor).
    pub fn imported_models(&self) -> Result<BTreeSet<String>, AuditError> {
        match self {
            Self::Local(log) => log.imported_models(),
            Self::Remote(client) => client.imported_models(),
        }
    }

    /// A fresh checkpoint and the proof from `previous` (a stick's courier step).
    pub fn courier(&self, previous: Option<&str>) -> Result<CourierPackage, AuditError> {
        match self {
            Self::Local(log) => courier_package(log, previous),
            Self::Remote(client) => client.courier(previous),
        }
    }

    /// Whether records can be made now (the log is open; the daemon is
    /// connected or reachable). Records nothing.
    pub fn is_available(&self) -> bool {
        match self {
            Self::Local(log) => log.is_open(),
            Self::Remote(client) => client.is_connected(),
        }
    }
}
