//! PE/COFF details of the unified kernel image: objcopy stamps the build
//! time into the COFF header, which a reproducible build must not keep.

use crate::error::BuildError;

/// The PE/COFF checksum (as the Windows loader and objcopy compute it): the
/// 16-bit one's-complement sum of the file, skipping the checksum field, plus
/// the file's length.
pub fn checksum(data: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < data.len() {
        if i == checksum_at {
            i += 4;
            continue;
        }
        let low = data[i];
        let high = data.get(i + 1).copied().unwrap_or(0);
        sum += u64::from(u16::from_le_bytes([low, high]));
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(data.len() as u32)
}

/// objcopy stamps the build time into a PE image's COFF header: set it to
/// the build's epoch and recompute the checksum, so the UKI is reproducible.
pub fn set_timestamp(data: &mut [u8], epoch: u64) -> Result<(), BuildError> {
    let bad = || BuildError::Unexpected("the UKI is not a PE image".into());
    let pe = data
        .get(0x3c..0x40)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(bad)?;
    let checksum_at = pe + 24 + 64;
    if data.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) || data.len() < checksum_at + 4 {
        return Err(bad());
    }
    let stamp = u32::try_from(epoch).unwrap_or(u32::MAX);
    data[pe + 8..pe + 12].copy_from_slice(&stamp.to_le_bytes());
    let checksum = checksum(data, checksum_at);
    data[checksum_at..checksum_at + 4].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pe_checksum_matches_a_known_image() {
        // A minimal PE: MZ header pointing at a PE signature, an optional header, padding.
        let mut data = vec![0u8; 512];
        data[..2].copy_from_slice(b"MZ");
        data[0x3c] = 0x80;
        data[0x80..0x84].copy_from_slice(b"PE\0\0");
        for (i, b) in data.iter_mut().enumerate().skip(0x100) {
            *b = (i * 7) as u8;
        }
        set_timestamp(&mut data, 1_767_225_600).unwrap();
        assert_eq!(&data[0x88..0x8c], &1_767_225_600u32.to_le_bytes());
        let stored = u32::from_le_bytes(data[0xd8..0xdc].try_into().unwrap());
        assert_eq!(stored, checksum(&data, 0xd8));
        // Changing any byte outside the field changes the checksum.
        data[300] ^= 1;
        assert_ne!(stored, checksum(&data, 0xd8));
        assert!(set_timestamp(&mut [0u8; 16], 0).is_err());
    }
}
