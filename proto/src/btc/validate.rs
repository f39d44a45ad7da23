//! Consensus checks on headers and blocks, for the chain layer.
//!
//! Context-free: the checks Bitcoin Core makes without knowing the chain a block is on
//! (`CheckBlockHeader`, `CheckBlock`), plus header linkage and the witness commitment.
//!
//! Difficulty: [`next_work_required`] and [`check_difficulty`] are Core's `GetNextWorkRequired`
//! and `CalculateNextWorkRequired` (with BIP 94 for testnet4), as pure functions of the network's
//! [`DifficultyRules`] and the ancestors of the header, which the caller provides by height.
//!
//! Anything else needing chain state (median time past, BIP 34 height, UTXOs, scripts, sigops)
//! is the chain layer's.

use std::collections::HashMap;

use bitcoin::block::Header;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, Target, TxMerkleNode, Txid};

use super::error::BtcError;
use super::network::{DifficultyRules, NetParams};

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

/// Blocks per difficulty period (Core's `DifficultyAdjustmentInterval()`).
pub const DIFFICULTY_ADJUSTMENT_INTERVAL: u32 = 2016;

/// Intended seconds between blocks (Core's `nPowTargetSpacing`).
pub const POW_TARGET_SPACING: i64 = 10 * 60;

/// Intended seconds per difficulty period (Core's `nPowTargetTimespan`).
pub const POW_TARGET_TIMESPAN: i64 = 14 * 24 * 60 * 60;

/// How much earlier than its parent a period's first block may be on testnet4 (BIP 94,
/// Core's `MAX_TIMEWARP`).
pub const MAX_TIMEWARP: i64 = 600;

/// Core's `CalculateNextWorkRequired`: the nBits of a period that follows one whose first and
/// last blocks are `actual_timespan` seconds apart and whose retarget base is `bits` (the last
/// block's nBits; BIP 94: the first block's). The timespan is clamped to a quarter and four
/// times [`POW_TARGET_TIMESPAN`], the result capped at `pow_limit`.
///
/// The product is computed in 320 bits, so it never wraps; Core's 256-bit arithmetic would only
/// wrap for PoW limits above 2^233, which no Bitcoin network has.
pub fn calculate_next_work(bits: CompactTarget, actual_timespan: i64, pow_limit: Target) -> CompactTarget {
    let timespan = actual_timespan.clamp(POW_TARGET_TIMESPAN / 4, POW_TARGET_TIMESPAN * 4) as u64;
    let le = Target::from_compact(bits).to_le_bytes();
    let mut limbs = [0u64; 5];
    for (limb, chunk) in limbs.iter_mut().zip(le.chunks_exact(8)) {
        *limb = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    // limbs *= timespan
    let mut carry = 0u128;
    for limb in &mut limbs {
        let v = u128::from(*limb) * u128::from(timespan) + carry;
        *limb = v as u64;
        carry = v >> 64;
    }
    // limbs /= POW_TARGET_TIMESPAN
    let divisor = POW_TARGET_TIMESPAN as u128;
    let mut rem = 0u128;
    for limb in limbs.iter_mut().rev() {
        let cur = (rem << 64) | u128::from(*limb);
        *limb = (cur / divisor) as u64;
        rem = cur % divisor;
    }
    if limbs[4] != 0 {
        return pow_limit.to_compact_lossy();
    }
    let mut out = [0u8; 32];
    for (dst, limb) in out.chunks_exact_mut(8).zip(&limbs) {
        dst.copy_from_slice(&limb.to_le_bytes());
    }
    let new = Target::from_le_bytes(out);
    if new > pow_limit {
        pow_limit.to_compact_lossy()
    } else {
        new.to_compact_lossy()
    }
}

/// Core's `GetNextWorkRequired`: the nBits a child of `parent` (at `parent_height`) with
/// timestamp `time` must carry under `params.difficulty`; `None` for
/// [`DifficultyRules::Unchecked`]. `ancestor(h)` must return the header at height `h`
/// (`h < parent_height`) on `parent`'s branch; it is called only for min-difficulty walks
/// (heights of the current period) and at period boundaries (the previous period's first
/// block). A `None` from it is [`BtcError::UnknownAncestor`].
pub fn next_work_required(
    params: &NetParams,
    parent_height: u32,
    parent: &Header,
    time: u32,
    mut ancestor: impl FnMut(u32) -> Option<Header>,
) -> Result<Option<CompactTarget>, BtcError> {
    let rules = params.difficulty;
    if rules == DifficultyRules::Unchecked {
        return Ok(None);
    }
    let limit = params.pow_limit.to_compact_lossy();
    let height = parent_height.saturating_add(1);
    let mut get = |h: u32| ancestor(h).ok_or(BtcError::UnknownAncestor { height: h });
    if !height.is_multiple_of(DIFFICULTY_ADJUSTMENT_INTERVAL) {
        if !rules.min_difficulty_blocks() {
            return Ok(Some(parent.bits));
        }
        if i64::from(time) > i64::from(parent.time) + 2 * POW_TARGET_SPACING {
            return Ok(Some(limit));
        }
        // The last block of the period (back to its first) that is not a min-difficulty block.
        let (mut h, mut bits) = (parent_height, parent.bits);
        while h > 0 && !h.is_multiple_of(DIFFICULTY_ADJUSTMENT_INTERVAL) && bits == limit {
            h -= 1;
            bits = get(h)?.bits;
        }
        return Ok(Some(bits));
    }
    if !rules.retargets() {
        return Ok(Some(parent.bits));
    }
    // `height` is a positive multiple of the interval, so this does not underflow.
    let first = get(height - DIFFICULTY_ADJUSTMENT_INTERVAL)?;
    let base = if rules.bip94() { first.bits } else { parent.bits };
    let actual = i64::from(parent.time) - i64::from(first.time);
    Ok(Some(calculate_next_work(base, actual, params.pow_limit)))
}

/// The difficulty rules for a child `header` of `parent` (at `parent_height`): its nBits must be
/// [`next_work_required`] ([`BtcError::BadDifficulty`]) and, on testnet4, a period's first block
/// may not be more than [`MAX_TIMEWARP`] seconds before its parent ([`BtcError::TimeWarp`]).
/// Linkage, proof of work and the other timestamp rules are separate checks.
pub fn check_difficulty(
    params: &NetParams,
    parent_height: u32,
    parent: &Header,
    header: &Header,
    ancestor: impl FnMut(u32) -> Option<Header>,
) -> Result<(), BtcError> {
    let height = parent_height.saturating_add(1);
    if let Some(expected) = next_work_required(params, parent_height, parent, header.time, ancestor)? {
        if header.bits != expected {
            return Err(BtcError::BadDifficulty {
                hash: header.block_hash(),
                height,
                bits: header.bits.to_consensus(),
                expected: expected.to_consensus(),
            });
        }
    }
    if params.difficulty.bip94()
        && height.is_multiple_of(DIFFICULTY_ADJUSTMENT_INTERVAL)
        && i64::from(header.time) < i64::from(parent.time) - MAX_TIMEWARP
    {
        return Err(BtcError::TimeWarp {
            hash: header.block_hash(),
            height,
            time: header.time,
            parent_time: parent.time,
        });
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
