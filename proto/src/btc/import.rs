//! Block files: the two formats `anomos chain import` reads, parsed without I/O.
//!
//! * Bitcoin Core's raw `blk*.dat` format: records of `magic (4) | length (u32 LE) | block`, repeated.
//!   Core pre-allocates these files, so the last record may be followed by zero bytes: a record
//!   "magic" of four zero bytes ends the file, and everything from there on must be zero.
//! * Text: one hex-encoded block per line; blank lines and lines starting with `#` are skipped,
//!   surrounding whitespace is ignored.
//!
//! A file is the blk format if it starts with the network's magic, text otherwise.
//!
//! Bounds: a record longer than [`MAX_BLOCK_SERIALIZED_SIZE`] or than the bytes left, or a hex line
//! longer than twice that, is refused before anything is allocated for it; block
//! decoding uses `bitcoin`'s capped pre-allocation and must consume the record (or line) exactly.
//! So the blocks returned never hold more serialized bytes than the input.

use bitcoin::Block;

use super::validate::MAX_BLOCK_SERIALIZED_SIZE;

/// Why a block file does not parse. Offsets are byte offsets in the file, lines are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// A blk record starts with neither the network's magic nor zero padding.
    #[error("bad magic {} at offset {offset}", hex::encode(got))]
    BadMagic {
        /// Offset of the record.
        offset: usize,
        /// The four bytes found.
        got: [u8; 4],
    },
    /// A blk record (or its 8-byte head) runs past the end of the file.
    #[error("record at offset {offset} needs {need} bytes, {have} left in the file")]
    Truncated {
        /// Offset of the record.
        offset: usize,
        /// Bytes the record needs (head included).
        need: u64,
        /// Bytes left from `offset`.
        have: usize,
    },
    /// A blk record claims a block larger than any valid block.
    #[error("record at offset {offset} claims {len} bytes, above the {MAX_BLOCK_SERIALIZED_SIZE}-byte block limit")]
    Oversize {
        /// Offset of the record.
        offset: usize,
        /// The length it claims.
        len: u32,
    },
    /// Non-zero bytes after the zero padding that ends a blk file.
    #[error("non-zero byte at offset {offset} after the zero padding that ends the file")]
    AfterPadding {
        /// Offset of the first non-zero byte.
        offset: usize,
    },
    /// A blk record's bytes are not exactly one block.
    #[error("record {index} at offset {offset} is not a block: {reason}")]
    BadRecord {
        /// Index of the record (0-based).
        index: usize,
        /// Offset of the record.
        offset: usize,
        /// The decoder's complaint.
        reason: String,
    },
    /// The file does not start with the magic and is not UTF-8 text.
    #[error("neither blk*.dat (starts with the network magic) nor hex lines (not UTF-8 text)")]
    NotText,
    /// A text line is longer than the hex of the largest valid block.
    #[error("line {line}: {len} characters, more than the hex of a {MAX_BLOCK_SERIALIZED_SIZE}-byte block")]
    LineTooLong {
        /// The line number.
        line: usize,
        /// Its length (trimmed).
        len: usize,
    },
    /// A text line is not hex.
    #[error("line {line}: not hex: {reason}")]
    NotHex {
        /// The line number.
        line: usize,
        /// The hex decoder's complaint.
        reason: String,
    },
    /// A text line's bytes are not exactly one block.
    #[error("line {line}: not a block: {reason}")]
    BadLine {
        /// The line number.
        line: usize,
        /// The decoder's complaint.
        reason: String,
    },
}

/// Length of a blk record's head: magic and length.
pub const RECORD_HEAD_LEN: usize = 8;

/// Splits a block file into blocks, in file order: the blk format if `data` starts with `magic`,
/// hex lines otherwise (see the [module docs](self)).
pub fn parse_blocks(data: &[u8], magic: [u8; 4]) -> Result<Vec<Block>, ImportError> {
    if data.starts_with(&magic) {
        parse_blk(data, magic)
    } else {
        parse_hex_lines(data)
    }
}

/// Parses Bitcoin Core's `blk*.dat` format (see the [module docs](self)).
pub fn parse_blk(data: &[u8], magic: [u8; 4]) -> Result<Vec<Block>, ImportError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let rest = data.get(offset..).unwrap_or_default();
        let head = rest.split_first_chunk::<RECORD_HEAD_LEN>().filter(|(h, _)| !h.starts_with(&[0; 4]));
        let Some((&[m0, m1, m2, m3, l0, l1, l2, l3], body)) = head else {
            // Zero padding, which must last to the end, or a truncated record head.
            if rest.starts_with(&[0; 4]) || rest.iter().all(|&b| b == 0) {
                if let Some(i) = rest.iter().position(|&b| b != 0) {
                    return Err(ImportError::AfterPadding { offset: offset + i });
                }
                break;
            }
            return Err(ImportError::Truncated { offset, need: RECORD_HEAD_LEN as u64, have: rest.len() });
        };
        let got = [m0, m1, m2, m3];
        if got != magic {
            return Err(ImportError::BadMagic { offset, got });
        }
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if u64::from(len) > MAX_BLOCK_SERIALIZED_SIZE {
            return Err(ImportError::Oversize { offset, len });
        }
        let Some(raw) = body.get(..len as usize) else {
            return Err(ImportError::Truncated {
                offset,
                need: RECORD_HEAD_LEN as u64 + u64::from(len),
                have: rest.len(),
            });
        };
        let block: Block = bitcoin::consensus::deserialize(raw).map_err(|e| ImportError::BadRecord {
            index: out.len(),
            offset,
            reason: e.to_string(),
        })?;
        out.push(block);
        offset += RECORD_HEAD_LEN + raw.len();
    }
    Ok(out)
}

/// Parses one hex-encoded block per line (see the [module docs](self)).
pub fn parse_hex_lines(data: &[u8]) -> Result<Vec<Block>, ImportError> {
    let text = std::str::from_utf8(data).map_err(|_| ImportError::NotText)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() as u64 > 2 * MAX_BLOCK_SERIALIZED_SIZE {
            return Err(ImportError::LineTooLong { line: i + 1, len: line.len() });
        }
        let raw = hex::decode(line).map_err(|e| ImportError::NotHex { line: i + 1, reason: e.to_string() })?;
        let block: Block = bitcoin::consensus::deserialize(&raw)
            .map_err(|e| ImportError::BadLine { line: i + 1, reason: e.to_string() })?;
        out.push(block);
    }
    Ok(out)
}

/// Writes blocks in the blk format (what [`parse_blk`] reads), for tests and tools.
pub fn write_blk(blocks: &[Block], magic: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in blocks {
        let raw = bitcoin::consensus::serialize(b);
        out.extend_from_slice(&magic);
        out.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&raw);
    }
    out
}

/// Writes blocks as hex lines (what [`parse_hex_lines`] reads), one per line.
pub fn write_hex_lines(blocks: &[Block]) -> String {
    let mut out = String::new();
    for b in blocks {
        out.push_str(&hex::encode(bitcoin::consensus::serialize(b)));
        out.push('\n');
    }
    out
}
