//! How a node treats time. Nodes have no NTP: the hardware clock may be
//! wrong, and a clock set back in time would make expired certificates
//! look valid. So a node never trusts a time earlier than a floor it knows
//! has passed: its image's build time (`SOURCE_DATE_EPOCH`) and the
//! cluster CA's creation, whichever is later. Node certificates are valid
//! from the CA's creation and for years (`sovereign node enroll --days`),
//! so a node whose clock is behind never sees a peer as "not yet valid".

use std::path::Path;
use std::time::SystemTime;

/// The time to check certificates at: the system clock, never earlier
/// than `floor`.
pub fn trusted_now(floor: SystemTime) -> SystemTime {
    SystemTime::now().max(floor)
}

/// The file whose modification time is the image's build time on a node:
/// every file of the verified root carries `SOURCE_DATE_EPOCH`.
pub const IMAGE_STAMP: &str = "/usr/lib/os-release";

/// The image's build time, read from the modification time of `stamp`
/// (normally [`IMAGE_STAMP`]); `None` when it cannot be read.
pub fn image_build_time(stamp: &Path) -> Option<SystemTime> {
    std::fs::metadata(stamp).ok()?.modified().ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_clock_behind_the_floor_is_raised_to_it() {
        let far = SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
        assert_eq!(trusted_now(far), far);
        assert!(trusted_now(UNIX_EPOCH) > UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn the_build_time_is_the_stamp_files_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stamp = dir.path().join("os-release");
        let file = std::fs::File::create(&stamp).expect("create");
        let epoch = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        file.set_modified(epoch).expect("set mtime");
        assert_eq!(image_build_time(&stamp), Some(epoch));
        assert_eq!(image_build_time(&dir.path().join("absent")), None);
    }
}
