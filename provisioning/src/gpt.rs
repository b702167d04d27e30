/*!
A small, strict reader of GUID partition tables (512-byte sectors), used to
find where an image's partitions end and to check a flashed disk. Writing the
table is left to `sgdisk`, which has handled every odd disk for decades.
*/

use std::fmt;
use std::io::{Read, Seek, SeekFrom};

/// Bytes per logical sector; Sovereign images are built with 512-byte sectors.
pub const SECTOR: u64 = 512;

/// A GPT GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the usual text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(text: &str) -> Option<Self> {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || text.len() != 36 {
            return None;
        }
        let mut raw = [0u8; 16];
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        // The first three fields are stored little-endian.
        raw[0..4].reverse();
        raw[4..6].reverse();
        raw[6..8].reverse();
        Some(Self(raw))
    }

    /// A GUID made from 16 arbitrary bytes, marked as version 4 (random) per RFC 4122.
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        let mut text_order = bytes;
        text_order[6] = (text_order[6] & 0x0f) | 0x40;
        text_order[8] = (text_order[8] & 0x3f) | 0x80;
        let text = format_text_order(&text_order);
        // Cannot fail: the text was just formatted from 16 bytes.
        Self::parse(&text).unwrap_or(Self(bytes))
    }
}

fn format_text_order(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text_order = self.0;
        text_order[0..4].reverse();
        text_order[4..6].reverse();
        text_order[6..8].reverse();
        f.write_str(&format_text_order(&text_order))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One used entry of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number (index in the entry array plus one).
    pub number: u32,
    /// The partition type.
    pub type_guid: Guid,
    /// The partition's own GUID (PARTUUID).
    pub unique_guid: Guid,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
    /// The partition name (PARTLABEL).
    pub name: String,
}

impl Partition {
    /// Byte offset of the partition.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }

    /// Whether the partition is empty (never true for a valid entry).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed primary GPT header and its partitions.
#[derive(Debug, Clone)]
pub struct Gpt {
    /// The disk GUID.
    pub disk_guid: Guid,
    /// Where the backup header says it lives.
    pub backup_lba: u64,
    /// First sector partitions may use.
    pub first_usable_lba: u64,
    /// Last sector partitions may use.
    pub last_usable_lba: u64,
    /// Used entries, in table order.
    pub partitions: Vec<Partition>,
}

impl Gpt {
    /// The partition with this name, if any.
    pub fn by_name(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }

    /// The highest last sector of any partition.
    pub fn last_used_lba(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.last_lba)
            .max()
            .unwrap_or(self.first_usable_lba.saturating_sub(1))
    }
}

/// Why a partition table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Reading failed.
    #[error("reading the partition table: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a GPT.
    #[error("no GUID partition table ({0})")]
    Invalid(&'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&b[at..at + 16]);
    Guid(raw)
}

/// Reads and checks (signature, both CRCs) the primary GPT of a disk or image.
pub fn read<R: Read + Seek>(disk: &mut R) -> Result<Gpt, GptError> {
    let mut header = [0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.read_exact(&mut header)?;
    if &header[0..8] != b"EFI PART" {
        return Err(GptError::Invalid("no `EFI PART` signature in sector 1"));
    }
    let header_size = u32_at(&header, 12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        return Err(GptError::Invalid("header size out of range"));
    }
    let stored_crc = u32_at(&header, 16);
    let mut check = header[..header_size].to_vec();
    check[16..20].fill(0);
    if crc32fast::hash(&check) != stored_crc {
        return Err(GptError::Invalid("header checksum mismatch"));
    }
    let entries_lba = u64_at(&header, 72);
    let entry_count = u32_at(&header, 80) as usize;
    let entry_size = u32_at(&header, 84) as usize;
    if !(128..=4096).contains(&entry_size) || entry_count > 1024 || entry_count == 0 {
        return Err(GptError::Invalid("partition entry array out of range"));
    }
    let mut entries = vec![0u8; entry_count * entry_size];
    let entries_offset = entries_lba
        .checked_mul(SECTOR)
        .ok_or(GptError::Invalid("partition entry array out of range"))?;
    disk.seek(SeekFrom::Start(entries_offset))?;
    disk.read_exact(&mut entries)?;
    if crc32fast::hash(&entries) != u32_at(&header, 88) {
        return Err(GptError::Invalid("partition entry checksum mismatch"));
    }
    let mut partitions = Vec::new();
    for (index, entry) in entries.chunks_exact(entry_size).enumerate() {
        let type_guid = guid_at(entry, 0);
        if type_guid.0 == [0u8; 16] {
            continue;
        }
        let first_lba = u64_at(entry, 32);
        let last_lba = u64_at(entry, 40);
        if last_lba < first_lba {
            return Err(GptError::Invalid("a partition ends before it starts"));
        }
        if last_lba >= u64::MAX / SECTOR {
            return Err(GptError::Invalid("a partition ends beyond any disk"));
        }
        let units: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        partitions.push(Partition {
            number: index as u32 + 1,
            type_guid,
            unique_guid: guid_at(entry, 16),
            first_lba,
            last_lba,
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok(Gpt {
        disk_guid: guid_at(&header, 56),
        backup_lba: u64_at(&header, 32),
        first_usable_lba: u64_at(&header, 40),
        last_usable_lba: u64_at(&header, 48),
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_round_trip_through_text_in_mixed_endian_order() {
        let text = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";
        let guid = Guid::parse(text).expect("valid GUID text");
        assert_eq!(guid.0[0], 0x16, "first field is little-endian on disk");
        assert_eq!(guid.to_string(), text);
        assert!(Guid::parse("4d21b016b53445c2a9fb5c16e091fd2d").is_none());
        assert!(Guid::parse("zz21b016-b534-45c2-a9fb-5c16e091fd2d").is_none());
    }

    #[test]
    fn random_guids_carry_version_4() {
        let guid = Guid::from_random_bytes([0xff; 16]);
        let text = guid.to_string();
        assert_eq!(&text[14..15], "4", "{text}");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
    }

    /// A valid header pointing at `entries_lba`, with one entry spanning `first..=last`.
    fn table(entries_lba: u64, first: u64, last: u64) -> Vec<u8> {
        let mut disk = vec![0u8; 64 * 1024];
        let mut entries = vec![0u8; 128 * 128];
        entries[0] = 1; // any non-zero type
        entries[32..40].copy_from_slice(&first.to_le_bytes());
        entries[40..48].copy_from_slice(&last.to_le_bytes());
        let header = &mut disk[512..1024];
        header[0..8].copy_from_slice(b"EFI PART");
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        header[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&header[..92]);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        if entries_lba == 2 {
            disk[1024..1024 + entries.len()].copy_from_slice(&entries);
        }
        disk
    }

    #[test]
    fn a_well_formed_table_is_read() {
        let gpt = read(&mut std::io::Cursor::new(table(2, 2048, 4095))).expect("valid");
        assert_eq!(gpt.partitions.len(), 1);
        assert_eq!(gpt.partitions[0].len(), 2048 * 512);
    }

    #[test]
    fn hostile_offsets_are_refused_without_overflow() {
        let error = read(&mut std::io::Cursor::new(table(u64::MAX / 2, 1, 2)))
            .expect_err("entry array beyond any disk");
        assert!(error.to_string().contains("out of range"), "{error}");
        let error = read(&mut std::io::Cursor::new(table(2, 0, u64::MAX)))
            .expect_err("partition beyond any disk");
        assert!(error.to_string().contains("beyond any disk"), "{error}");
        let error = read(&mut std::io::Cursor::new(table(2, 10, 5))).expect_err("reversed");
        assert!(error.to_string().contains("ends before"), "{error}");
    }

    #[test]
    fn a_disk_without_a_table_is_refused() {
        let mut zeros = std::io::Cursor::new(vec![0u8; 64 * 1024]);
        let error = read(&mut zeros).expect_err("zeros are no GPT");
        assert!(error.to_string().contains("EFI PART"), "{error}");
    }
}
