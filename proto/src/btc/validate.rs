//! Context-free consensus checks on headers and blocks, for the chain layer.
//!
//! These are the checks Bitcoin Core makes without knowing the chain a block is on
//! (`CheckBlockHeader`, `CheckBlock`), plus header linkage and the witness commitment.
//! Anything needing chain state (difficulty retargeting, timestamps, BIP 34 height, UTXOs,
//! scripts, sigops) is not here.

use std::collections::HashMap;

use bitcoin::block::Header;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, Target, TxMerkleNode, Txid};

use super::error::BtcError;
use super::network::NetParams;

/// Largest serialized block, in bytes (with witness data).
pub const MAX_BLOCK_SERIALIZED_SIZE: u64 = 4_000_000;

/// Largest block weight, in weight units (BIP 141).
pub const MAX_BLOCK_WEIGHT: u64 = 4_000_000;

/// The target a header's nBits encodes, with Bitcoin Core's `SetCompact` rules: a negative,
/// zero or more-than-256-bit target is [`BtcError::BadPow`].
pub fn header_target(header: &Header) -> Result<Target, BtcError> {
    let bits = header.bits.to_consensus();
    target_from_bits(bits).map_err(|reason| BtcError::BadPow { hash: header.block_hash(), bits, reason })
}

fn target_from_bits(bits: u32) -> Result<Target, &'static str> {
    let size = bits >> 24;
    let mantissa = bits & 0x007f_ffff;
    // Core tests the sign and overflow on the mantissa after the small-size shift.
    let word = if size <= 3 { mantissa >> (8 * (3 - size)) } else { mantissa };
    if word != 0 && bits & 0x0080_0000 != 0 {
        return Err("nBits encodes a negative target");
    }
    if word != 0 && (size > 34 || (word > 0xff && size > 33) || (word > 0xffff && size > 32)) {
        return Err("nBits overflows 256 bits");
    }
    // Sign bit cleared: `from_compact` would otherwise read it as part of the mantissa.
    let target = Target::from_compact(CompactTarget::from_consensus((size << 24) | mantissa));
    if target == Target::ZERO {
        return Err("nBits encodes a zero target");
    }
    Ok(target)
}

/// Proof of work of a header: its nBits must decode (see [`header_target`]) to a target no
/// easier than `params.pow_limit`, and its hash must be at or below that target (skipped
/// when `params.no_pow_check`).
///
/// Whether nBits is the *right* difficulty for its height is the chain layer's business.
pub fn check_header_pow(header: &Header, params: &NetParams) -> Result<(), BtcError> {
    let target = header_target(header)?;
    let bad = |reason| BtcError::BadPow { hash: header.block_hash(), bits: header.bits.to_consensus(), reason };
    if target > params.pow_limit {
        return Err(bad("target is easier than the network's proof-of-work limit"));
    }
    if !params.no_pow_check && !target.is_met_by(header.block_hash()) {
        return Err(bad("block hash does not meet the target"));
    }
    Ok(())
}

/// `next` must build on `prev`: `next.prev_blockhash == prev.block_hash()`.
pub fn check_linkage(prev: &Header, next: &Header) -> Result<(), BtcError> {
    let expected = prev.block_hash();
    if next.prev_blockhash != expected {
        return Err(BtcError::BadLinkage { expected, got: next.prev_blockhash, next: next.block_hash() });
    }
    Ok(())
}

/// Context-free block checks, in Bitcoin Core's order:
///
/// 1. at least one transaction ([`BtcError::BadCoinbase`]);
/// 2. the merkle root commits to the transactions ([`BtcError::BadMerkleRoot`]);
/// 3. no txid appears twice ([`BtcError::DuplicateTx`]; catches CVE-2012-2459 mutations,
///    which keep the merkle root);
/// 4. serialized size ≤ [`MAX_BLOCK_SERIALIZED_SIZE`] and weight ≤ [`MAX_BLOCK_WEIGHT`]
///    ([`BtcError::Oversize`]);
/// 5. the first transaction, and only it, is a coinbase, with a 2..=100-byte script
///    ([`BtcError::BadCoinbase`]);
/// 6. if any transaction has witness data, the coinbase commits to it (BIP 141,
///    [`BtcError::BadWitnessCommitment`]).
///
/// Proof of work is separate: [`check_header_pow`].
pub fn check_block(block: &Block) -> Result<(), BtcError> {
    let hash = block.block_hash();
    let coinbase_err = |index, reason| BtcError::BadCoinbase { block: hash, index, reason };

    let Some((coinbase, rest)) = block.txdata.split_first() else {
        return Err(coinbase_err(0, "block has no transactions"));
    };

    let txids: Vec<Txid> = block.txdata.iter().map(|tx| tx.compute_txid()).collect();
    let computed =
        bitcoin::merkle_tree::calculate_root(txids.iter().map(|t| t.to_raw_hash())).map(TxMerkleNode::from_raw_hash);
    if computed != Some(block.header.merkle_root) {
        return Err(BtcError::BadMerkleRoot { block: hash, header: block.header.merkle_root, computed });
    }

    let mut seen: HashMap<Txid, usize> = HashMap::with_capacity(txids.len());
    for (i, txid) in txids.iter().enumerate() {
        if let Some(&first) = seen.get(txid) {
            return Err(BtcError::DuplicateTx { block: hash, txid: *txid, first, second: i });
        }
        seen.insert(*txid, i);
    }

    let size = block.total_size() as u64;
    if size > MAX_BLOCK_SERIALIZED_SIZE {
        return Err(BtcError::Oversize {
            block: hash,
            what: "serialized size",
            actual: size,
            limit: MAX_BLOCK_SERIALIZED_SIZE,
        });
    }
    let weight = block.weight().to_wu();
    if weight > MAX_BLOCK_WEIGHT {
        return Err(BtcError::Oversize { block: hash, what: "weight", actual: weight, limit: MAX_BLOCK_WEIGHT });
    }

    if !coinbase.is_coinbase() {
        return Err(coinbase_err(0, "first transaction is not a coinbase"));
    }
    let script_len = coinbase.input.first().map_or(0, |i| i.script_sig.len());
    if !(2..=100).contains(&script_len) {
        return Err(coinbase_err(0, "coinbase script length is not in 2..=100"));
    }
    if let Some(i) = rest.iter().position(|tx| tx.is_coinbase()) {
        return Err(coinbase_err(i + 1, "coinbase after the first transaction"));
    }

    if !block.check_witness_commitment() {
        return Err(BtcError::BadWitnessCommitment { block: hash });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_rules_match_core() {
        // Values from Bitcoin Core's arith_uint256 SetCompact tests.
        assert_eq!(target_from_bits(0), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0012_3456), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0100_3456), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0400_0000), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0080_0000), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0180_0000), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x0492_3456), Err("nBits encodes a negative target"));
        assert_eq!(target_from_bits(0x01fe_dcba), Err("nBits encodes a negative target"));
        assert_eq!(target_from_bits(0xff12_3456), Err("nBits overflows 256 bits"));
        assert_eq!(target_from_bits(0x2301_0000), Err("nBits overflows 256 bits"));
        let t = target_from_bits(0x0112_3456).unwrap();
        assert_eq!(
            t,
            Target::from_be_bytes({
                let mut b = [0; 32];
                b[31] = 0x12;
                b
            })
        );
        assert_eq!(target_from_bits(0x1d00_ffff).unwrap(), Target::MAX_ATTAINABLE_MAINNET);
        assert_eq!(target_from_bits(0x0180_3456), Err("nBits encodes a zero target"));
        assert_eq!(target_from_bits(0x2200_ffff), Err("nBits overflows 256 bits"));
        assert!(target_from_bits(0x2100_ffff).is_ok());
        assert!(target_from_bits(0x2200_00ff).is_ok());
        assert!(target_from_bits(0x207f_ffff).unwrap() == Target::MAX_ATTAINABLE_REGTEST);
    }
}
