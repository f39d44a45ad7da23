//! The block-file parser (`btc::import`): real blk-format files built from tests/vectors/bitcoin blocks, hex
//! lines, and every way a file can be wrong.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use anomos_proto::btc::import::{
    parse_blk, parse_blocks, parse_hex_lines, write_blk, write_hex_lines, ImportError, RECORD_HEAD_LEN,
};
use anomos_proto::btc::validate::MAX_BLOCK_SERIALIZED_SIZE;
use anomos_proto::btc::NetParams;
use bitcoin::Block;

fn raw(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/bitcoin/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    hex::decode(text.trim()).unwrap()
}

fn block(name: &str) -> Block {
    bitcoin::consensus::deserialize(&raw(name)).unwrap()
}

const MAINNET: [&str; 5] = [
    "mainnet_genesis.hex",
    "mainnet_block1.hex",
    "mainnet_block2.hex",
    "mainnet_block170.hex",
    "mainnet_block_dafae_segwit.hex",
];

/// A blk file exactly as Bitcoin Core lays one out: magic, length, block bytes, then zero pre-allocation.
fn core_blk(names: &[&str], magic: [u8; 4], padding: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        let b = raw(n);
        out.extend_from_slice(&magic);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out.resize(out.len() + padding, 0);
    out
}

#[test]
fn real_blk_files_parse() {
    let magic = NetParams::mainnet().magic;
    let file = core_blk(&MAINNET, magic, 4096);
    let blocks = parse_blocks(&file, magic).unwrap();
    let want: Vec<Block> = MAINNET.iter().map(|n| block(n)).collect();
    assert_eq!(blocks, want);
    assert!(blocks[4].txdata.iter().any(|t| !t.input[0].witness.is_empty()), "segwit block keeps its witnesses");
    // write_blk writes the same bytes as Core (minus the padding).
    assert_eq!(write_blk(&want, magic), core_blk(&MAINNET, magic, 0));
    // Without padding, and with padding shorter than a record head.
    assert_eq!(parse_blk(&core_blk(&MAINNET[..2], magic, 0), magic).unwrap(), want[..2]);
    assert_eq!(parse_blk(&core_blk(&MAINNET[..2], magic, 3), magic).unwrap(), want[..2]);
    // Testnet3 magic and block.
    let t3 = NetParams::testnet3().magic;
    let file = core_blk(&["testnet3_genesis.hex", "testnet3_block_4497b_segwit.hex"], t3, 8);
    assert_eq!(parse_blocks(&file, t3).unwrap().len(), 2);
    // The same file read with the mainnet magic is not a blk file for it (nor text).
    assert_eq!(parse_blocks(&file, magic), Err(ImportError::NotText));
}

#[test]
fn hex_lines_parse() {
    let want: Vec<Block> = MAINNET[..3].iter().map(|n| block(n)).collect();
    let text = format!(
        "# a comment\n\n  {}  \r\n{}\n{}",
        hex::encode(raw(MAINNET[0])),
        hex::encode(raw(MAINNET[1])),
        hex::encode(raw(MAINNET[2]))
    );
    assert_eq!(parse_blocks(text.as_bytes(), NetParams::mainnet().magic).unwrap(), want);
    assert_eq!(parse_hex_lines(write_hex_lines(&want).as_bytes()).unwrap(), want);
    assert_eq!(parse_hex_lines(b"").unwrap(), vec![]);
    assert_eq!(parse_hex_lines(b"# nothing\n\n").unwrap(), vec![]);
}

#[test]
fn truncated_records_are_refused() {
    let magic = NetParams::mainnet().magic;
    let file = core_blk(&MAINNET[..3], magic, 0);
    let second = RECORD_HEAD_LEN + raw(MAINNET[0]).len();
    // Cut inside the last record's body, inside its head, and right after its magic.
    let third = second + RECORD_HEAD_LEN + raw(MAINNET[1]).len();
    for cut in [file.len() - 1, third + 5, third + 4, third + 1] {
        match parse_blk(&file[..cut], magic) {
            Err(ImportError::Truncated { offset, have, .. }) => {
                assert_eq!((offset, have), (third, cut - third), "cut at {cut}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // A record whose length is too short for its block: the block does not decode.
    let mut short = file.clone();
    short[second + 4..second + 8].copy_from_slice(&((raw(MAINNET[1]).len() - 1) as u32).to_le_bytes());
    assert!(
        matches!(parse_blk(&short, magic), Err(ImportError::BadRecord { index: 1, offset, .. }) if offset == second)
    );
    // Too long: the block decodes but leaves bytes over (then the next record is misaligned).
    let mut long = file.clone();
    long[second + 4..second + 8].copy_from_slice(&((raw(MAINNET[1]).len() + 1) as u32).to_le_bytes());
    assert!(matches!(parse_blk(&long, magic), Err(ImportError::BadRecord { index: 1, .. })));
}

#[test]
fn wrong_magic_and_garbage_are_refused() {
    let magic = NetParams::mainnet().magic;
    let mut file = core_blk(&MAINNET[..2], magic, 0);
    let second = RECORD_HEAD_LEN + raw(MAINNET[0]).len();
    file[second..second + 4].copy_from_slice(&NetParams::testnet3().magic);
    assert_eq!(
        parse_blk(&file, magic),
        Err(ImportError::BadMagic { offset: second, got: NetParams::testnet3().magic })
    );
    // Non-zero bytes after the zero padding.
    let mut padded = core_blk(&MAINNET[..1], magic, 64);
    let n = padded.len();
    padded[n - 10] = 1;
    assert_eq!(parse_blk(&padded, magic), Err(ImportError::AfterPadding { offset: n - 10 }));
    // Text that is not hex, hex that is not a block, a block with trailing bytes, binary that is not text.
    assert!(matches!(parse_hex_lines(b"\n\nzz\n"), Err(ImportError::NotHex { line: 3, .. })));
    assert!(matches!(parse_hex_lines(b"00ff\n"), Err(ImportError::BadLine { line: 1, .. })));
    let trailing = hex::encode([raw(MAINNET[0]), vec![0]].concat());
    assert!(matches!(parse_hex_lines(trailing.as_bytes()), Err(ImportError::BadLine { line: 1, .. })));
    assert_eq!(parse_blocks(&[0xff, 0xfe, 0x00], magic), Err(ImportError::NotText));
    // Errors name the place.
    let e = parse_blk(&file, magic).unwrap_err().to_string();
    assert!(e.contains(&format!("offset {second}")) && e.contains("0b110907"), "{e}");
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    let magic = NetParams::mainnet().magic;
    // A record claiming 4 GB in a 12-byte file, and one just over the block limit.
    for len in [u32::MAX, MAX_BLOCK_SERIALIZED_SIZE as u32 + 1] {
        let mut file = magic.to_vec();
        file.extend_from_slice(&len.to_le_bytes());
        file.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_blk(&file, magic), Err(ImportError::Oversize { offset: 0, len }));
    }
    // Exactly at the limit but not present: truncated, not oversize.
    let mut file = magic.to_vec();
    file.extend_from_slice(&(MAX_BLOCK_SERIALIZED_SIZE as u32).to_le_bytes());
    assert!(
        matches!(parse_blk(&file, magic), Err(ImportError::Truncated { need, have: 8, .. }) if need == MAX_BLOCK_SERIALIZED_SIZE + 8)
    );
    // A hex line longer than the largest block's hex.
    let line = "00".repeat(MAX_BLOCK_SERIALIZED_SIZE as usize + 1);
    assert!(matches!(parse_hex_lines(line.as_bytes()), Err(ImportError::LineTooLong { line: 1, .. })));
}
