//! The daemon's unix-socket protocol and the recording handle services use.
//!
//! One JSON [`Event`] per line in; one line out: `{"seq": N}` once the record
//! is on disk, or `{"error": "..."}`. A line `{"courier": {"previous": NOTE}}`
//! (NOTE: the checkpoint a stick carries, or null) asks for a fresh checkpoint
//! and the consistency proof from NOTE: `{"courier": CourierPackage}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::courier::{courier_package, CourierPackage};
use crate::error::AuditError;
use crate::log::AuditLog;
use crate::policy::Gate;
use crate::record::Event;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A connection to the audit daemon.
pub struct AuditClient {
    stream: Mutex<BufReader<UnixStream>>,
}

impl AuditClient {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Self, AuditError> {
        let stream = UnixStream::connect(path).map_err(|e| AuditError::io(path, e))?;
        Ok(Self {
            stream: Mutex::new(BufReader::new(stream)),
        })
    }

    /// Sends one request line and reads the reply line.
    fn request(&self, request: &serde_json::Value) -> Result<serde_json::Value, AuditError> {
        let mut stream = self
            .stream
            .lock()
            .map_err(|_| AuditError::Closed("client poisoned".into()))?;
        let closed = |e: std::io::Error| AuditError::Closed(format!("audit daemon: {e}"));
        let line = format!("{request}\n");
        stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(closed)?;
        let mut reply = String::new();
        stream.read_line(&mut reply).map_err(closed)?;
        let reply: serde_json::Value = serde_json::from_str(&reply)
            .map_err(|_| AuditError::Closed("audit daemon closed the connection".into()))?;
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
    Event(Event),
}

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
}
