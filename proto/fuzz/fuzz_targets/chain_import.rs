//! Fuzzes the block-file parser behind `anomos chain import`: `btc::import::parse_blocks`, `parse_blk` and
//! `parse_hex_lines`, on the mainnet magic.
//!
//! Input: byte 0 selects the mode (mod 3), the rest is the file.
//! * 0: `parse_blocks` (blk format if the file starts with the magic, hex lines otherwise);
//! * 1: `parse_blk` whatever the file starts with;
//! * 2: `parse_hex_lines`.
//!
//! Whatever parses must be bounded by the input (the blocks' serialized sizes add up to at most the file's
//! length) and survive a round trip through both formats (`write_blk` then `parse_blk`, hex lines then
//! `parse_hex_lines`). `parse_blocks` must agree with the parser it picks.

#![no_main]

use anomos_proto::btc::import::{
    parse_blk, parse_blocks, parse_hex_lines, write_blk, write_hex_lines, RECORD_HEAD_LEN,
};
use anomos_proto::btc::NetParams;
use anomos_proto_fuzz::mode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let magic = NetParams::mainnet().magic;
    let (m, file) = mode(data);
    let parsed = match m % 3 {
        0 => {
            let res = parse_blocks(file, magic);
            let direct = if file.starts_with(&magic) { parse_blk(file, magic) } else { parse_hex_lines(file) };
            assert_eq!(res, direct, "parse_blocks disagrees with the parser it picks");
            res
        }
        1 => parse_blk(file, magic),
        _ => parse_hex_lines(file),
    };
    let Ok(blocks) = parsed else { return };
    let blk = write_blk(&blocks, magic);
    let total = blk.len() - RECORD_HEAD_LEN * blocks.len();
    assert!(total <= file.len(), "{total} bytes of blocks from a {}-byte file", file.len());
    assert_eq!(parse_blk(&blk, magic).as_ref(), Ok(&blocks), "blk round trip");
    let text = write_hex_lines(&blocks);
    assert_eq!(parse_hex_lines(text.as_bytes()).as_ref(), Ok(&blocks), "hex-lines round trip");
});
