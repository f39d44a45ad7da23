//! Contextual consensus checks: the rules that need the chain a header or block builds on.
//!
//! The wire layer ([`anomos_proto::btc::validate`]) checks what a header or block says about
//! itself (proof of work against its own nBits, merkle root, coinbase shape, sizes, witness
//! commitment). Here, with the [`ChainStore`], we check what depends on its ancestors:
//!
//! * nBits is the difficulty the network requires at that height, and testnet4's timewarp rule
//!   ([`anomos_proto::btc::check_difficulty`]: Bitcoin Core's `GetNextWorkRequired` for the
//!   network's [`DifficultyRules`](anomos_proto::btc::DifficultyRules); custom chains are not
//!   checked beyond the PoW limit unless their parameters name rules);
//! * the timestamp is after the median of the previous 11 and at most 2 hours in our future;
//! * the version is not below what BIP 34/66/65 require at that height;
//! * a block's coinbase starts with its height (BIP 34).
//!
//! Not checked (no UTXO set): scripts, amounts, sigops, lock times, signet signatures.

use anomos_proto::btc::{check_block, check_difficulty, check_header_pow, check_linkage, BtcError, NetParams};
use bitcoin::block::{Header, Version};
use bitcoin::params::Params;
use bitcoin::script::Builder;
use bitcoin::{Block, Network};

use super::store::{BranchCursor, ChainStore};
use super::{ChainError, Invalid};

/// Number of blocks whose median time a new block must exceed.
pub const MEDIAN_TIME_SPAN: usize = 11;

/// How far in the future (seconds, against our clock) a header's time may be.
pub const MAX_FUTURE_BLOCK_TIME: u64 = 2 * 60 * 60;

/// Heights from which BIP 34 (version ≥ 2, height in coinbase), BIP 66 (version ≥ 3) and
/// BIP 65 (version ≥ 4) apply; `None` for custom chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployments {
    /// BIP 34 height.
    pub bip34: u32,
    /// BIP 66 height.
    pub bip66: u32,
    /// BIP 65 height.
    pub bip65: u32,
}

/// The soft-fork heights of a known network. Regtest uses Bitcoin Core's defaults (all active
/// from height 1), not the `bitcoin` crate's "never".
pub fn deployments(params: &NetParams) -> Option<Deployments> {
    match params.network? {
        Network::Regtest => Some(Deployments { bip34: 1, bip66: 1, bip65: 1 }),
        n => {
            let p = Params::new(n);
            Some(Deployments { bip34: p.bip34_height, bip66: p.bip66_height, bip65: p.bip65_height })
        }
    }
}

/// Checks a header that builds on a header in `store` (any branch), before it is inserted;
/// `now` is our clock in Unix seconds. Returns its height.
pub fn check_header(store: &ChainStore, params: &NetParams, header: &Header, now: u64) -> Result<u32, ChainError> {
    let hash = header.block_hash();
    let bad = |reason: Invalid| ChainError::invalid_header(hash, reason);
    let parent = store.entry(&header.prev_blockhash).ok_or_else(|| {
        bad(Invalid::Context(format!("does not connect to any known header (prev {})", header.prev_blockhash)))
    })?;
    check_linkage(&parent.header, header).map_err(|e| bad(e.into()))?;
    check_header_pow(header, params).map_err(|e| bad(e.into()))?;
    let height = parent.height.saturating_add(1);

    // The walk asks for falling heights: a cursor pays one lookup per height, also on a side branch.
    let mut branch = BranchCursor::new(store, header.prev_blockhash);
    let ancestor = |h: u32| branch.as_mut().and_then(|b| b.header_at(h));
    match check_difficulty(params, parent.height, &parent.header, header, ancestor) {
        Ok(()) => {}
        Err(BtcError::UnknownAncestor { height: h }) => {
            return Err(ChainError::Store(format!("ancestor at height {h} of header {hash} is missing")));
        }
        Err(e) => return Err(bad(e.into())),
    }

    let mtp = store.median_time_past(&header.prev_blockhash).unwrap_or(0);
    if header.time <= mtp {
        return Err(bad(Invalid::Context(format!(
            "timestamp {} is not after the median time past {mtp}",
            header.time
        ))));
    }
    if u64::from(header.time) > now.saturating_add(MAX_FUTURE_BLOCK_TIME) {
        return Err(bad(Invalid::Context(format!(
            "timestamp {} is more than 2 hours after our clock ({now})",
            header.time
        ))));
    }

    if let Some(d) = deployments(params) {
        let version = header.version.to_consensus();
        let required = if height >= d.bip65 {
            4
        } else if height >= d.bip66 {
            3
        } else if height >= d.bip34 {
            2
        } else {
            i32::MIN
        };
        if version < required {
            return Err(bad(Invalid::Context(format!(
                "version {version} is below {required}, required at height {height}"
            ))));
        }
    }
    Ok(height)
}

/// Checks a downloaded block whose header is in `store` at `height`: the context-free block
/// rules, then BIP 34 (the coinbase script starts with the height, as Bitcoin Core's
/// `CScript() << nHeight` encodes it).
pub fn check_block_in_context(block: &Block, params: &NetParams, height: u32) -> Result<(), ChainError> {
    check_block(block).map_err(|e| ChainError::invalid_block(block.block_hash(), e))?;
    check_block_contextual(block, params, height)
}

/// The contextual part of [`check_block_in_context`] alone (BIP 34), for a block whose
/// context-free checks already passed.
pub fn check_block_contextual(block: &Block, params: &NetParams, height: u32) -> Result<(), ChainError> {
    let hash = block.block_hash();
    let bad = |reason: Invalid| ChainError::invalid_block(hash, reason);
    if let Some(d) = deployments(params) {
        if height >= d.bip34 && block.header.version >= Version::TWO {
            let expected = bip34_prefix(height);
            let script = block
                .txdata
                .first()
                .and_then(|cb| cb.input.first())
                .map(|i| i.script_sig.as_bytes())
                .unwrap_or_default();
            if !script.starts_with(expected.as_bytes()) {
                return Err(bad(Invalid::Context(format!(
                    "coinbase does not start with its height {height} (BIP 34)"
                ))));
            }
        }
    }
    Ok(())
}

/// Largest standard transaction weight (Bitcoin Core's `MAX_STANDARD_TX_WEIGHT`: 100 kvB).
pub const MAX_STANDARD_TX_WEIGHT: u64 = 400_000;

/// Most satoshis there can ever be (Bitcoin Core's `MAX_MONEY`).
pub const MAX_MONEY: u64 = 21_000_000 * 100_000_000;

/// Checks a loose transaction before it enters the pool: the context-free rules of Bitcoin
/// Core's `CheckTransaction` (inputs and outputs non-empty, no input spent twice, output values
/// within `MAX_MONEY`), not a coinbase, and standard size (weight ≤ 400,000, i.e. 100 kvB).
/// Scripts and inputs' existence are not checked (there is no UTXO set).
pub fn check_pool_tx(tx: &bitcoin::Transaction) -> Result<(), String> {
    if tx.input.is_empty() {
        return Err("no inputs".into());
    }
    if tx.output.is_empty() {
        return Err("no outputs".into());
    }
    if tx.is_coinbase() {
        return Err("a coinbase is only valid in a block".into());
    }
    let weight = tx.weight().to_wu();
    if weight > MAX_STANDARD_TX_WEIGHT {
        return Err(format!("weight {weight} is above the standard limit {MAX_STANDARD_TX_WEIGHT}"));
    }
    let mut seen = std::collections::HashSet::with_capacity(tx.input.len());
    for i in &tx.input {
        if i.previous_output.is_null() {
            return Err("an input spends the null outpoint".into());
        }
        if !seen.insert(i.previous_output) {
            return Err(format!("input {} is spent twice", i.previous_output));
        }
    }
    let mut total = 0u64;
    for o in &tx.output {
        let v = o.value.to_sat();
        total = total.saturating_add(v);
        if v > MAX_MONEY || total > MAX_MONEY {
            return Err("output value above the money supply".into());
        }
    }
    Ok(())
}

/// Checks the genesis header of a custom network learned from a peer: it must hash to the
/// network's genesis hash and carry valid proof of work.
pub fn check_genesis_header(params: &NetParams, header: &Header) -> Result<(), ChainError> {
    let hash = header.block_hash();
    if hash != params.genesis_hash {
        return Err(ChainError::invalid_header(
            hash,
            Invalid::Context(format!("is not the genesis {} of {}", params.genesis_hash, params.name)),
        ));
    }
    check_header_pow(header, params).map_err(|e| ChainError::invalid_header(hash, e))
}

/// The script prefix BIP 34 requires in the coinbase of the block at `height`.
pub fn bip34_prefix(height: u32) -> bitcoin::ScriptBuf {
    Builder::new().push_int(i64::from(height)).into_script()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::mine::{mine_regtest, unix_now};
    use anomos_proto::btc::DifficultyRules;
    use bitcoin::hashes::Hash;
    use bitcoin::pow::CompactTarget;
    use bitcoin::BlockHash;

    /// A store with 20 blocks and a valid child header of its tip.
    fn setup() -> (ChainStore, Block) {
        let mut store = ChainStore::new(NetParams::regtest()).unwrap();
        let hashes = mine_regtest(&mut store, 21, 0).unwrap();
        let next = store.block(&hashes[20]).unwrap().unwrap();
        // Make a fresh store that lacks the last block, so `next` is a valid child of its tip.
        let mut fresh = ChainStore::new(NetParams::regtest()).unwrap();
        for h in &hashes[..20] {
            fresh.insert_block(&store.block(h).unwrap().unwrap()).unwrap();
        }
        (fresh, next)
    }

    fn remine(header: &mut Header) {
        while header.validate_pow(header.target()).is_err() {
            header.nonce = header.nonce.wrapping_add(1);
        }
    }

    fn context_err(store: &ChainStore, header: &Header) -> String {
        match check_header(store, &NetParams::regtest(), header, unix_now()) {
            Err(ChainError::InvalidHeader { reason, .. }) => reason.to_string(),
            other => panic!("expected an invalid header, got {other:?}"),
        }
    }

    #[test]
    fn contextual_header_rules() {
        let (store, next) = setup();
        let params = NetParams::regtest();
        assert_eq!(check_header(&store, &params, &next.header, unix_now()).unwrap(), 21);

        let mtp = store.median_time_past(&next.header.prev_blockhash).unwrap();
        let mut h = next.header;
        h.time = mtp;
        remine(&mut h);
        assert!(context_err(&store, &h).contains("median time past"));

        let mut h = next.header;
        h.time = u32::try_from(unix_now() + MAX_FUTURE_BLOCK_TIME + 60).unwrap();
        remine(&mut h);
        assert!(context_err(&store, &h).contains("2 hours"));

        let mut h = next.header;
        h.bits = CompactTarget::from_consensus(0x207f_0000);
        remine(&mut h);
        assert!(context_err(&store, &h).contains("nBits 0x207f0000 is not the required difficulty 0x207fffff"));
        // Regtest's min-difficulty rule: the PoW limit whatever the timestamp.
        let mut h = next.header;
        h.time += 1201;
        remine(&mut h);
        assert_eq!(check_header(&store, &params, &h, unix_now()).unwrap(), 21);

        let mut h = next.header;
        h.version = Version::ONE;
        remine(&mut h);
        assert!(context_err(&store, &h).contains("version 1"));

        let mut h = next.header;
        h.prev_blockhash = h.merkle_root.to_raw_hash().into();
        assert!(context_err(&store, &h).contains("does not connect"));
    }

    #[test]
    fn pool_rules() {
        let (_, next) = setup();
        let coinbase = next.txdata[0].clone();
        assert!(check_pool_tx(&coinbase).unwrap_err().contains("coinbase"));
        let mut tx = coinbase.clone();
        tx.input[0].previous_output = bitcoin::OutPoint { txid: coinbase.compute_txid(), vout: 0 };
        check_pool_tx(&tx).unwrap();
        let mut twice = tx.clone();
        twice.input.push(tx.input[0].clone());
        assert!(check_pool_tx(&twice).unwrap_err().contains("twice"));
        let mut empty = tx.clone();
        empty.output.clear();
        assert!(check_pool_tx(&empty).unwrap_err().contains("no outputs"));
        let mut big = tx.clone();
        big.output[0].script_pubkey = bitcoin::ScriptBuf::from_bytes(vec![0x51; 100_001]);
        assert!(check_pool_tx(&big).unwrap_err().contains("weight"));
        let mut rich = tx;
        rich.output[0].value = bitcoin::Amount::from_sat(MAX_MONEY + 1);
        assert!(check_pool_tx(&rich).is_err());
    }

    #[test]
    fn bip34_height_is_required() {
        let (_, mut next) = setup();
        let params = NetParams::regtest();
        check_block_in_context(&next, &params, 21).unwrap();
        let err = check_block_in_context(&next, &params, 22).unwrap_err();
        assert!(matches!(err.invalid(), Some((_, Invalid::Context(s))) if s.contains("BIP 34")));
        // Strip the height push: the merkle root changes too, so fix that first.
        next.txdata[0].input[0].script_sig = bitcoin::ScriptBuf::from_bytes(vec![0x01, 0x00, 0x51]);
        next.header.merkle_root = next.compute_merkle_root().unwrap();
        let err = check_block_in_context(&next, &params, 21).unwrap_err();
        assert!(err.to_string().contains("BIP 34"), "{err}");
        assert_eq!(bip34_prefix(1).as_bytes(), &[0x51]);
        assert_eq!(bip34_prefix(300).as_bytes(), &[0x02, 0x2c, 0x01]);
    }

    /// A custom network with testnet3's or testnet4's difficulty rules but an easy PoW limit
    /// (the regtest one, 2^255: a hash meets it half the time), rooted at the regtest genesis.
    fn testnet_like(rules: DifficultyRules) -> (NetParams, ChainStore) {
        let regtest = NetParams::regtest();
        let mut params =
            NetParams::custom(format!("{rules:?}-like"), [0xfa, 0xbf, 0xb5, 0xda], regtest.genesis_hash, 1);
        params.difficulty = rules;
        params.pow_limit = regtest.pow_limit;
        let genesis = regtest.genesis_block().unwrap();
        let store =
            ChainStore::open_with_genesis(params.clone(), genesis, Box::new(crate::chain::MemoryBackend::default()))
                .unwrap();
        (params, store)
    }

    /// A mined child of `parent` with this timestamp offset and nBits.
    fn child(store: &ChainStore, parent: &BlockHash, dt: i64, bits: CompactTarget) -> Header {
        let p = store.header(parent).unwrap();
        let mut h = Header {
            version: Version::from_consensus(4),
            prev_blockhash: *parent,
            merkle_root: bitcoin::TxMerkleNode::all_zeros(),
            time: u32::try_from(i64::from(p.time) + dt).unwrap(),
            bits,
            nonce: 0,
        };
        remine(&mut h);
        h
    }

    /// Checks and inserts a mined child of `parent`.
    fn grow(
        store: &mut ChainStore,
        params: &NetParams,
        parent: &BlockHash,
        dt: i64,
        bits: CompactTarget,
    ) -> Result<BlockHash, ChainError> {
        let h = child(store, parent, dt, bits);
        check_header(store, params, &h, u64::MAX / 2)?;
        store.insert_header(h)?;
        Ok(h.block_hash())
    }

    fn difficulty_err(store: &ChainStore, params: &NetParams, h: &Header) -> BtcError {
        match check_header(store, params, h, u64::MAX / 2) {
            Err(ChainError::InvalidHeader { reason, .. }) => match *reason {
                Invalid::Consensus(e) => e,
                other => panic!("not a consensus error: {other}"),
            },
            other => panic!("expected an invalid header, got {other:?}"),
        }
    }

    /// Testnet3 and testnet4 difficulty rules through the store: min-difficulty blocks after
    /// 20 minutes only, the walk back to the last real difficulty, the retarget at 2016 (from the
    /// last block's bits on testnet3, the first block's on testnet4) and the BIP 94 timewarp rule.
    #[test]
    fn testnet_difficulty_rules_through_the_store() {
        use anomos_proto::btc::validate::calculate_next_work;
        for rules in [DifficultyRules::Testnet3, DifficultyRules::Testnet4] {
            let (params, mut store) = testnet_like(rules);
            let limit = params.pow_limit.to_compact_lossy();
            // Period 0: every block at the limit, 60 s apart (fast: the retarget quarters the target).
            let mut tip = params.genesis_hash;
            for _ in 1..2016 {
                tip = grow(&mut store, &params, &tip, 60, limit).unwrap();
            }
            let real = calculate_next_work(limit, 2015 * 60, params.pow_limit);
            assert_ne!(real, limit);
            // Height 2016 opens a period: no min-difficulty exception even after 20 minutes.
            let e = difficulty_err(&store, &params, &child(&store, &tip, 1201, limit));
            assert!(matches!(e, BtcError::BadDifficulty { height: 2016, .. }), "{e}");
            tip = grow(&mut store, &params, &tip, 60, real).unwrap();
            let first = tip;

            // 20 minutes exactly: the real difficulty; a second more: the limit, and only it.
            let e = difficulty_err(&store, &params, &child(&store, &tip, 1200, limit));
            assert!(matches!(e, BtcError::BadDifficulty { height: 2017, .. }), "{e}");
            assert!(difficulty_err(&store, &params, &child(&store, &tip, 1201, real)).to_string().contains("nBits"));
            tip = grow(&mut store, &params, &tip, 1201, limit).unwrap();
            tip = grow(&mut store, &params, &tip, 1201, limit).unwrap();
            // Back within 20 minutes: walk back over the two min-difficulty blocks to 2016's bits.
            let e = difficulty_err(&store, &params, &child(&store, &tip, 60, limit));
            assert!(
                matches!(e, BtcError::BadDifficulty { height: 2019, expected, .. } if expected == real.to_consensus()),
                "{e}"
            );
            tip = grow(&mut store, &params, &tip, 60, real).unwrap();
            for _ in 2020..4031 {
                tip = grow(&mut store, &params, &tip, 60, real).unwrap();
            }
            // The period's last block is a min-difficulty block.
            tip = grow(&mut store, &params, &tip, 1201, limit).unwrap();
            assert_eq!(store.best_tip(), (tip, 4031));

            let span = i64::from(store.header(&tip).unwrap().time) - i64::from(store.header(&first).unwrap().time);
            let from_last = calculate_next_work(limit, span, params.pow_limit);
            let from_first = calculate_next_work(real, span, params.pow_limit);
            assert_ne!(from_last, from_first);
            let (right, wrong) = match rules {
                DifficultyRules::Testnet3 => (from_last, from_first),
                _ => (from_first, from_last),
            };
            let e = difficulty_err(&store, &params, &child(&store, &tip, 60, wrong));
            assert!(
                matches!(e, BtcError::BadDifficulty { height: 4032, expected, .. } if expected == right.to_consensus()),
                "{rules:?}: {e}"
            );
            // Timewarp: 601 s before the parent is refused on testnet4 only; 600 s is fine on both.
            let warped = child(&store, &tip, -601, right);
            match rules {
                DifficultyRules::Testnet4 => {
                    let e = difficulty_err(&store, &params, &warped);
                    assert!(matches!(e, BtcError::TimeWarp { height: 4032, .. }), "{e}");
                }
                _ => assert_eq!(check_header(&store, &params, &warped, u64::MAX / 2).unwrap(), 4032),
            }
            grow(&mut store, &params, &tip, -600, right).unwrap();
        }
    }
}
