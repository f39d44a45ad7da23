//! Regtest block production, for tests and local networks.
//!
//! Blocks are consensus-shaped (they pass [`super::validate`]): version `0x20000000`, the
//! parent's nBits (regtest's PoW limit `0x207fffff`, about two hashes per block), strictly
//! increasing timestamps 10 minutes apart (never past our clock), a coinbase with the BIP 34
//! height in its scriptSig paying the subsidy plus fees to `OP_TRUE`, and the right merkle
//! root.
//!
//! Optional extra transactions make blocks realistic in size and shape: a chain of 1-input,
//! 2-output P2WPKH-shaped spends (the first spends the parent block's coinbase, each next one
//! the previous one's change), each with a witness of a 71-byte signature and a 33-byte public
//! key: 222 bytes, 141 vbytes each, so 100 of them make a block of about 22 KB. They are
//! well-formed but not valid spends (made-up keys; the coinbase is immature); nothing here or
//! in sync checks scripts or UTXOs. Blocks with witness data carry the BIP 141 witness
//! commitment in the coinbase (an `OP_RETURN aa21a9ed…` output, reserved value in the
//! coinbase witness), which validation checks. Pool transactions can be mined too
//! ([`mine_block`]).

use anomos_proto::btc::validate::MAX_BLOCK_WEIGHT;
use anomos_proto::btc::NetParams;
use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version};
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::opcodes::OP_TRUE;
use bitcoin::script::Builder;
use bitcoin::transaction::Version as TxVersion;
use bitcoin::{
    Amount, Block, BlockHash, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxMerkleNode, TxOut, Txid,
    Witness,
};

use super::store::ChainStore;
use super::validate::bip34_prefix;
use super::ChainError;

/// Fee each extra transaction pays.
const FEE: Amount = Amount::from_sat(1_000);

/// Blocks between subsidy halvings on regtest.
const REGTEST_HALVING: u32 = 150;

/// Mines `n` blocks on the store's best tip, each with `txs_per_block` extra transactions, and
/// stores them. Returns their hashes, oldest first. Regtest stores only.
pub fn mine_regtest(store: &mut ChainStore, n: u32, txs_per_block: usize) -> Result<Vec<BlockHash>, ChainError> {
    let mut hashes = Vec::with_capacity(n.min(100_000) as usize);
    for _ in 0..n {
        let (tip, _) = store.best_tip();
        hashes.push(mine_on(store, tip, txs_per_block)?.block_hash());
    }
    Ok(hashes)
}

/// Mines one block on any known header `parent` (forks too) and stores it.
pub fn mine_on(store: &mut ChainStore, parent: BlockHash, txs_per_block: usize) -> Result<Block, ChainError> {
    mine_block(store, parent, txs_per_block, Vec::new())
}

/// Weight kept free in a mined block for its header and transaction count (a header is 320 weight units, a
/// count varint at most 36).
const BLOCK_WEIGHT_RESERVE: u64 = 4_000;

/// Mines one block on `parent` with `txs_per_block` made-up spends followed by those of `include`
/// (e.g. pool transactions) that fit in [`MAX_BLOCK_WEIGHT`] (in order, skipping any that do not),
/// and stores it.
pub fn mine_block(
    store: &mut ChainStore,
    parent: BlockHash,
    txs_per_block: usize,
    include: Vec<Transaction>,
) -> Result<Block, ChainError> {
    check_regtest(store.params())?;
    let prev =
        *store.entry(&parent).ok_or_else(|| ChainError::Params(format!("cannot mine on unknown header {parent}")))?;
    let height = prev.height.checked_add(1).ok_or_else(|| ChainError::Params("height overflow".into()))?;

    // The parent's coinbase funds the extra transactions (a made-up outpoint without a body).
    let mut funding = (OutPoint { txid: Txid::all_zeros(), vout: 0 }, Amount::from_sat(50 * 100_000_000));
    if txs_per_block > 0 {
        if let Some(cb) = store.block(&parent)?.and_then(|b| b.txdata.into_iter().next()) {
            let value = cb.output.first().map_or(Amount::ZERO, |o| o.value);
            funding = (OutPoint { txid: cb.compute_txid(), vout: 0 }, value);
        }
    }
    let mut extra = Vec::with_capacity(txs_per_block);
    for i in 0..txs_per_block {
        let tx = spend(funding.0, funding.1, i);
        funding = (OutPoint { txid: tx.compute_txid(), vout: 0 }, tx.output.first().map_or(Amount::ZERO, |o| o.value));
        extra.push(tx);
    }

    // Unique per block in this store (two blocks on one parent must differ).
    let extra_nonce = store.header_count() as u64;
    let fees = FEE * txs_per_block as u64;
    let mut txdata = vec![coinbase(height, subsidy(height) + fees, extra_nonce)];
    txdata.extend(extra);
    // Pool transactions are anyone's: eleven of just under the standard 400,000 weight units made a block
    // that every requester rejected as oversize (SPEC open issue 26). The coinbase's witness commitment,
    // added below, is inside the reserve.
    let mut weight: u64 = txdata.iter().map(|t| t.weight().to_wu()).sum::<u64>() + BLOCK_WEIGHT_RESERVE;
    for tx in include {
        let w = tx.weight().to_wu();
        if weight + w <= MAX_BLOCK_WEIGHT {
            weight += w;
            txdata.push(tx);
        }
    }

    let now = unix_now();
    let time = match prev.header.time.checked_add(600) {
        Some(t) if u64::from(t) <= now => t,
        _ => prev.header.time.saturating_add(1),
    };
    let mut block = Block {
        header: Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: parent,
            merkle_root: TxMerkleNode::all_zeros(),
            time,
            bits: prev.header.bits,
            nonce: 0,
        },
        txdata,
    };
    commit_witness(&mut block);
    block.header.merkle_root =
        block.compute_merkle_root().ok_or_else(|| ChainError::Params("block without transactions".into()))?;
    solve(&mut block.header);
    store.insert_block(&block)?;
    Ok(block)
}

/// If any transaction has witness data: puts the reserved value into the coinbase's witness
/// and the BIP 141 commitment to the witness merkle root into a coinbase output.
pub fn commit_witness(block: &mut Block) {
    if block.txdata.iter().all(|t| t.input.iter().all(|i| i.witness.is_empty())) {
        return;
    }
    let reserved = [0u8; 32];
    let Some(root) = block.witness_root() else { return };
    let commitment = Block::compute_witness_commitment(&root, &reserved);
    let mut data = [0u8; 36];
    data[..4].copy_from_slice(&[0xaa, 0x21, 0xa9, 0xed]);
    data[4..].copy_from_slice(commitment.as_byte_array());
    if let Some(cb) = block.txdata.first_mut() {
        if let Some(input) = cb.input.first_mut() {
            input.witness = Witness::from_slice(&[reserved]);
        }
        cb.output.push(TxOut {
            value: Amount::ZERO,
            script_pubkey: Builder::new().push_opcode(OP_RETURN).push_slice(data).into_script(),
        });
    }
}

fn check_regtest(params: &NetParams) -> Result<(), ChainError> {
    if params.network != Some(Network::Regtest) {
        return Err(ChainError::Params(format!("mining is for regtest only, not {}", params.name)));
    }
    Ok(())
}

/// Searches nonces (and, should they run out, timestamps) until the hash meets the target.
fn solve(header: &mut Header) {
    let target = header.target();
    loop {
        if header.validate_pow(target).is_ok() {
            return;
        }
        match header.nonce.checked_add(1) {
            Some(n) => header.nonce = n,
            None => {
                header.nonce = 0;
                header.time = header.time.saturating_add(1);
            }
        }
    }
}

/// Block subsidy at `height` on regtest.
fn subsidy(height: u32) -> Amount {
    let halvings = height / REGTEST_HALVING;
    if halvings >= 64 {
        return Amount::ZERO;
    }
    Amount::from_sat((50 * 100_000_000u64) >> halvings)
}

fn coinbase(height: u32, value: Amount, extra_nonce: u64) -> Transaction {
    let mut script = bip34_prefix(height).into_bytes();
    // Keeps the script at 2..=100 bytes (heights 1..=16 encode as a single opcode) and unique.
    script.extend_from_slice(Builder::new().push_slice(extra_nonce.to_le_bytes()).as_bytes());
    Transaction {
        version: TxVersion::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script),
            sequence: Sequence::MAX,
            witness: Witness::new(),
        }],
        output: vec![TxOut { value, script_pubkey: op_true() }],
    }
}

/// A 1-input, 2-output P2WPKH-shaped spend of `prev` (change back, a payment out), with a
/// signature-and-key witness.
fn spend(prev: OutPoint, value: Amount, index: usize) -> Transaction {
    let tag = (index as u64).to_le_bytes();
    let mut key = [0x02u8; 33];
    let mut sig = [0x30u8; 71];
    let mut payee = [0u8; 20];
    let fields = key[1..].iter_mut().zip(&mut sig[4..]).zip(&mut payee);
    for (((k, s), p), (b, t)) in fields.zip(tag.iter().zip(prev.txid.as_byte_array())) {
        *k = *b;
        *s = *b ^ *t;
        *p = *b;
    }
    sig[70] = 0x01; // SIGHASH_ALL
    let pay = Amount::from_sat(10_000).min(value.checked_sub(FEE).unwrap_or(Amount::ZERO));
    let change = value.checked_sub(FEE + pay).unwrap_or(Amount::ZERO);
    Transaction {
        version: TxVersion::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: prev,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[&sig[..], &key[..]]),
        }],
        output: vec![
            TxOut { value: change, script_pubkey: p2wpkh(&key[1..21]) },
            TxOut { value: pay, script_pubkey: p2wpkh(&payee) },
        ],
    }
}

fn p2wpkh(hash: &[u8]) -> ScriptBuf {
    let mut h = [0u8; 20];
    for (d, s) in h.iter_mut().zip(hash) {
        *d = *s;
    }
    ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(h))
}

fn op_true() -> ScriptBuf {
    Builder::new().push_opcode(OP_TRUE).into_script()
}

/// Seconds since the Unix epoch: the wall clock, or a simulation's clock ([`anomos_net::rt::unix_now`]), so block
/// times, `version` timestamps and the future-time check replay in a simulation.
pub(crate) fn unix_now() -> u64 {
    anomos_net::rt::unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::validate::{check_block_in_context, check_header};

    #[test]
    fn mined_blocks_pass_validation() {
        let params = NetParams::regtest();
        let mut store = ChainStore::new(params.clone()).unwrap();
        let mut check = ChainStore::new(params.clone()).unwrap();
        let hashes = mine_regtest(&mut store, 40, 3).unwrap();
        for (i, hash) in hashes.iter().enumerate() {
            let block = store.block(hash).unwrap().unwrap();
            assert_eq!(block.txdata.len(), 4);
            let height = check_header(&check, &params, &block.header, unix_now()).unwrap();
            assert_eq!(height as usize, i + 1);
            check_block_in_context(&block, &params, height).unwrap();
            check.insert_block(&block).unwrap();
        }
        assert_eq!(check.best_tip(), store.best_tip());
        assert!(mine_regtest(&mut ChainStore::new(NetParams::mainnet()).unwrap(), 1, 0).is_err());
    }

    #[test]
    fn realistic_blocks_commit_their_witnesses() {
        let params = NetParams::regtest();
        let mut store = ChainStore::new(params.clone()).unwrap();
        let hashes = mine_regtest(&mut store, 3, 100).unwrap();
        let block = store.block(&hashes[2]).unwrap().unwrap();
        let tx = &block.txdata[1];
        assert_eq!((tx.input.len(), tx.output.len()), (1, 2));
        assert!(tx.output.iter().all(|o| o.script_pubkey.is_p2wpkh()));
        assert_eq!(tx.total_size(), 222);
        assert_eq!(tx.vsize(), 141);
        let size = block.total_size();
        assert!((20_000..30_000).contains(&size), "block of {size} bytes");
        assert!(block.check_witness_commitment());
        check_block_in_context(&block, &params, 3).unwrap();
        // Tampering with a witness breaks the commitment (the merkle root does not see it).
        let mut bad = block.clone();
        bad.txdata[5].input[0].witness = Witness::from_slice(&[[1u8; 71]]);
        assert!(check_block_in_context(&bad, &params, 3).is_err());
    }

    /// Eleven pool transactions of just under the standard weight (400,000) do not fit in one block: the miner
    /// takes what fits and the block stays valid (it was oversize, and every requester rejected it).
    #[test]
    fn pool_transactions_beyond_the_block_weight_wait_for_the_next_block() {
        let params = NetParams::regtest();
        let mut store = ChainStore::new(params.clone()).unwrap();
        let big = |i: u8| Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint { txid: Txid::from_byte_array([i; 32]), vout: 0 },
                ..TxIn::default()
            }],
            output: vec![TxOut {
                value: Amount::from_sat(1_000),
                script_pubkey: ScriptBuf::from_bytes(vec![0x51; 99_000]),
            }],
        };
        let pool: Vec<Transaction> = (1..=11).map(big).collect();
        assert!(pool.iter().all(|t| crate::chain::validate::check_pool_tx(t).is_ok()));
        let tip = store.best_tip().0;
        let block = mine_block(&mut store, tip, 0, pool).unwrap();
        assert_eq!(block.txdata.len(), 1 + 10, "ten fit");
        assert!(block.weight().to_wu() <= MAX_BLOCK_WEIGHT);
        check_block_in_context(&block, &params, 1).unwrap();
    }

    /// A pool transaction a block confirmed is still answered to `getdata` for a while (the pool no longer has
    /// it), within a bound.
    #[test]
    fn a_transaction_mined_from_the_pool_is_still_relayed_for_a_while() {
        let params = NetParams::regtest();
        let mut store = ChainStore::new(params).unwrap();
        let tx = |i: u32| Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint { txid: Txid::from_byte_array([7; 32]), vout: i },
                ..TxIn::default()
            }],
            output: vec![TxOut { value: Amount::from_sat(1_000), script_pubkey: ScriptBuf::from_bytes(vec![0x51]) }],
        };
        let first = tx(0);
        let txid = first.compute_txid();
        store.add_pool_tx(&first, 1).unwrap().unwrap();
        let tip = store.best_tip().0;
        let block = mine_block(&mut store, tip, 0, vec![first.clone()]).unwrap();
        assert!(block.txdata.iter().any(|t| t.compute_txid() == txid), "mined");
        assert!(!store.has_pool_tx(&txid), "out of the pool");
        assert_eq!(store.relay_tx(&txid), Some(first), "still answered");
        // Bounded: RECENT_TXS later confirmations push it out.
        for round in 0..=(crate::chain::store::RECENT_TXS / 100) as u32 {
            let batch: Vec<Transaction> = (0..100).map(|i| tx(1 + round * 100 + i)).collect();
            for t in &batch {
                store.add_pool_tx(t, 1).unwrap().unwrap();
            }
            let tip = store.best_tip().0;
            mine_block(&mut store, tip, 0, batch).unwrap();
        }
        assert_eq!(store.relay_tx(&txid), None, "forgotten after RECENT_TXS more");
        let last = tx((crate::chain::store::RECENT_TXS as u32 / 100 + 1) * 100);
        assert!(store.relay_tx(&last.compute_txid()).is_some(), "the latest are kept");
    }

    #[test]
    fn subsidy_halves() {
        assert_eq!(subsidy(1), Amount::from_btc(50.0).unwrap());
        assert_eq!(subsidy(150), Amount::from_btc(25.0).unwrap());
        assert_eq!(subsidy(150 * 64), Amount::ZERO);
    }
}
