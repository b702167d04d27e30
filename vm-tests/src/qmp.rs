//! A minimal QMP (QEMU Machine Protocol) client over a unix socket: one JSON
//! object per line; command replies are `return` or `error`, anything with
//! `event` is kept for later inspection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::VmError;

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    machine: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far (`{"event": ..., "data": ...}`), oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities.
    pub fn handshake(machine: &str, stream: UnixStream) -> Result<Self, VmError> {
        let io = |what: &str| {
            let what = format!("{machine}: QMP {what}");
            move |source| VmError::Io { what, source }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("socket"))?;
        let writer = stream.try_clone().map_err(io("socket"))?;
        let mut qmp = Self {
            machine: machine.to_string(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.error("greeting", format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn error(&self, command: &str, message: String) -> VmError {
        VmError::Qmp {
            machine: self.machine.clone(),
            command: command.to_string(),
            message,
        }
    }

    fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| VmError::Io {
                what: format!("{}: reading QMP", self.machine),
                source,
            })?;
        if read == 0 {
            return Err(self.error("read", "QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.error("read", format!("bad JSON {e}: {line}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let request = json!({ "execute": command, "arguments": arguments });
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| VmError::Io {
                what: format!("{}: writing QMP {command}", self.machine),
                source,
            })?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let description = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                return Err(self.error(command, description));
            }
            if message.get("event").is_some() {
                self.events.push(message);
            }
        }
    }
}
