/*! Files read from a removable medium (a USB stick, a peer's spool): opened
without following a symlink and without blocking, so a FIFO or a device node
is refused at once instead of waited on; checked to be a regular file; and
read only up to a bound that suits the format, so a huge file costs no
memory. */

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::OFlags;

/// Opens `path` for reading: `O_NOFOLLOW | O_NONBLOCK` (a symlink fails with
/// "is a symlink", a FIFO opens without waiting for a writer), then `fstat`
/// on the open file: anything but a regular file is refused.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                io::Error::new(io::ErrorKind::InvalidInput, "is a symlink")
            } else {
                e
            }
        })?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a regular file (a FIFO, device or directory)",
        ));
    }
    Ok(file)
}

/// The bytes of the regular file at `path` (see [`open_regular`]), refused
/// when longer than `max` bytes (checked before reading, and while reading
/// in case it grows).
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let too_long = |len: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("is {len} bytes; at most {max} are read"),
        )
    };
    let len = file.metadata()?.len();
    if len > max {
        return Err(too_long(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_long(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_long_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.trust");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_bounded(&file, 10).unwrap(), b"0123456789");
        let err = read_bounded(&file, 9).unwrap_err();
        assert!(err.to_string().contains("at most 9"), "{err}");
        let link = dir.path().join("zero.trust");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_bounded(&link, 9)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        let fifo = dir.path().join("fifo.trust");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = read_bounded(&fifo, 9).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(read_bounded(dir.path(), 9).is_err());
    }
}
