//! Errors of the VM test driver; each names the machine and carries the end of
//! its console so a failing test shows what the guest printed.

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// An I/O operation of the driver failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A machine's configuration is unusable (bad regex, missing file).
    #[error("{machine}: {reason}")]
    Config {
        /// The machine.
        machine: String,
        /// What is wrong.
        reason: String,
    },
    /// Something did not happen in time.
    #[error("{machine}: timed out after {seconds} s waiting for {what}; console ends:\n{tail}")]
    Timeout {
        /// The machine.
        machine: String,
        /// What was awaited.
        what: String,
        /// The timeout.
        seconds: u64,
        /// The last lines of the console.
        tail: String,
    },
    /// QEMU exited while something was awaited.
    #[error("{machine}: QEMU exited ({status}) while waiting for {what}; console ends:\n{tail}")]
    Exited {
        /// The machine.
        machine: String,
        /// What was awaited.
        what: String,
        /// QEMU's exit status and the end of its own log.
        status: String,
        /// The last lines of the console.
        tail: String,
    },
    /// A QMP command returned an error.
    #[error("{machine}: QMP {command}: {message}")]
    Qmp {
        /// The machine.
        machine: String,
        /// The command.
        command: String,
        /// QEMU's error description.
        message: String,
    },
    /// A systemd unit failed to start.
    #[error("{machine}: unit {unit} failed; console ends:\n{tail}")]
    UnitFailed {
        /// The machine.
        machine: String,
        /// The unit.
        unit: String,
        /// The last lines of the console.
        tail: String,
    },
    /// A command run through the console agent (or, for `host`, on the host) exited non-zero.
    #[error("{machine}: `{command}` exited {status}: {output}")]
    CommandFailed {
        /// The machine.
        machine: String,
        /// The command.
        command: String,
        /// Its exit status.
        status: i32,
        /// What it printed.
        output: String,
    },
}
