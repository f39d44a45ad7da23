//! The difficulty rules (`btc::validate::{calculate_next_work, next_work_required, check_difficulty}`) against
//! Bitcoin Core's `pow_tests` vectors, the `bitcoin` crate, real headers from tests/vectors/bitcoin, and synthetic
//! chains that exercise testnet3's and testnet4's min-difficulty, walk-back, retarget and timewarp rules.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use anomos_proto::btc::validate::{
    calculate_next_work, DIFFICULTY_ADJUSTMENT_INTERVAL, MAX_TIMEWARP, POW_TARGET_TIMESPAN,
};
use anomos_proto::btc::{check_difficulty, check_header_pow, next_work_required, BtcError, DifficultyRules, NetParams};
use bitcoin::block::{Header, Version};
use bitcoin::hashes::Hash;
use bitcoin::pow::CompactTarget;
use bitcoin::{Block, BlockHash, Target, TxMerkleNode};

const INTERVAL: u32 = DIFFICULTY_ADJUSTMENT_INTERVAL;

fn bits(b: u32) -> CompactTarget {
    CompactTarget::from_consensus(b)
}

fn header(time: u32, b: u32) -> Header {
    Header {
        version: Version::from_consensus(4),
        prev_blockhash: BlockHash::all_zeros(),
        merkle_root: TxMerkleNode::all_zeros(),
        time,
        bits: bits(b),
        nonce: 0,
    }
}

fn block(name: &str) -> Block {
    let path = format!("{}/tests/vectors/bitcoin/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    bitcoin::consensus::deserialize(&hex::decode(text.trim()).unwrap()).unwrap()
}

/// A sparse chain: headers by height (only the ones the rules look at need to be there).
#[derive(Default)]
struct Chain(BTreeMap<u32, Header>);

impl Chain {
    fn set(&mut self, height: u32, time: u32, b: u32) -> &mut Self {
        self.0.insert(height, header(time, b));
        self
    }
    fn next(&self, params: &NetParams, parent_height: u32, time: u32) -> Result<Option<u32>, BtcError> {
        let parent = self.0[&parent_height];
        next_work_required(params, parent_height, &parent, time, |h| self.0.get(&h).copied())
            .map(|o| o.map(|c| c.to_consensus()))
    }
    fn check(&self, params: &NetParams, parent_height: u32, time: u32, b: u32) -> Result<(), BtcError> {
        let parent = self.0[&parent_height];
        check_difficulty(params, parent_height, &parent, &header(time, b), |h| self.0.get(&h).copied())
    }
}

/// testnet3's or testnet4's rules on a custom network with an easy PoW limit (regtest's).
fn testnet_like(rules: DifficultyRules) -> NetParams {
    let mut p = NetParams::custom("easy", [1, 2, 3, 4], BlockHash::all_zeros(), 1);
    p.difficulty = rules;
    p.pow_limit = Target::MAX_ATTAINABLE_REGTEST;
    p
}

#[test]
fn calculate_next_work_matches_core_pow_tests() {
    // Bitcoin Core src/test/pow_tests.cpp: get_next_work, get_next_work_pow_limit,
    // get_next_work_lower_limit_actual, get_next_work_upper_limit_actual (mainnet).
    let limit = NetParams::mainnet().pow_limit;
    let cases = [
        (1_261_130_161i64, 1_262_152_739i64, 0x1d00_ffffu32, 0x1d00_d86au32),
        (1_231_006_505, 1_233_061_996, 0x1d00_ffff, 0x1d00_ffff),
        (1_279_008_237, 1_279_297_671, 0x1c05_a3f4, 0x1c01_68fd),
        (1_263_163_443, 1_269_211_443, 0x1c38_7f6f, 0x1d00_e1fd),
    ];
    for (first, last, old, new) in cases {
        assert_eq!(calculate_next_work(bits(old), last - first, limit).to_consensus(), new, "{old:#x}");
    }
    // And the bitcoin crate agrees over a sweep of timespans (including negative and clamped ones).
    let params = bitcoin::params::Params::new(bitcoin::Network::Bitcoin);
    for old in [0x1d00_ffffu32, 0x1c05_a3f4, 0x1b0404cb, 0x1703_a30c] {
        for span in [-5i64, 0, 1, 302_399, 302_400, 700_000, 1_209_600, 2_000_000, 4_838_400, 9_999_999] {
            let ours = calculate_next_work(bits(old), span, limit);
            let theirs = CompactTarget::from_next_work_required(bits(old), span.max(0) as u64, &params);
            assert_eq!(ours, theirs, "{old:#x} over {span} s");
        }
    }
}

#[test]
fn calculate_next_work_does_not_wrap_with_huge_limits() {
    // A custom chain's default limit is 2^256 - 1: old × 4 × 2 weeks is far above 2^256.
    let limit = Target::from_be_bytes([0xff; 32]);
    let easiest = bits(0x2100_ffff);
    assert_eq!(calculate_next_work(easiest, POW_TARGET_TIMESPAN * 4, limit), limit.to_compact_lossy());
    // Quartering works from the top too.
    let q = calculate_next_work(easiest, 1, limit);
    assert_eq!(q.to_consensus(), 0x203f_ffc0);
}

#[test]
fn mainnet_rules() {
    let p = NetParams::mainnet();
    let mut c = Chain::default();
    c.set(30_240, 1_261_130_161, 0x1d00_ffff).set(32_255, 1_262_152_739, 0x1d00_ffff);
    // Inside a period: the parent's bits, no min-difficulty exception.
    c.set(32_100, 1_262_000_000, 0x1d00_ffff);
    assert_eq!(c.next(&p, 32_100, 1_262_000_000 + 5000), Ok(Some(0x1d00_ffff)));
    assert!(matches!(c.check(&p, 32_100, 1_262_000_000 + 5000, 0x1d00_fffe), Err(BtcError::BadDifficulty { .. })));
    // Retarget: Core's get_next_work vector through next_work_required and check_difficulty.
    c.check(&p, 32_255, 1_262_153_000, 0x1d00_d86a).unwrap();
    // Mainnet has no timewarp rule.
    c.check(&p, 32_255, 1_262_152_739 - 7000, 0x1d00_d86a).unwrap();
    // Real headers: blocks 1 and 2 on genesis and block 1.
    let (g, b1, b2) = (block("mainnet_genesis.hex"), block("mainnet_block1.hex"), block("mainnet_block2.hex"));
    let mut real = Chain::default();
    real.0.insert(0, g.header);
    real.0.insert(1, b1.header);
    check_difficulty(&p, 0, &g.header, &b1.header, |h| real.0.get(&h).copied()).unwrap();
    check_difficulty(&p, 1, &b1.header, &b2.header, |h| real.0.get(&h).copied()).unwrap();
}

#[test]
fn min_difficulty_after_twenty_minutes_only() {
    for rules in [DifficultyRules::Testnet3, DifficultyRules::Testnet4] {
        let p = testnet_like(rules);
        let limit = p.pow_limit.to_compact_lossy().to_consensus();
        let real = 0x2010_0000;
        let mut c = Chain::default();
        c.set(INTERVAL, 1_000_000, real).set(INTERVAL + 1, 1_000_600, real);
        // Exactly 20 minutes: still the real difficulty.
        assert_eq!(c.next(&p, INTERVAL + 1, 1_001_800), Ok(Some(real)));
        assert!(c.check(&p, INTERVAL + 1, 1_001_800, limit).is_err());
        // One second more: the limit, and only the limit.
        assert_eq!(c.next(&p, INTERVAL + 1, 1_001_801), Ok(Some(limit)));
        c.check(&p, INTERVAL + 1, 1_001_801, limit).unwrap();
        let e = c.check(&p, INTERVAL + 1, 1_001_801, real).unwrap_err();
        assert!(
            matches!(e, BtcError::BadDifficulty { height: 2018, bits: 0x2010_0000, expected, .. } if expected == limit)
        );
        // A period's first block never gets the exception.
        c.set(2 * INTERVAL - 1, 2_000_000, real).set(INTERVAL, 2_000_000 - POW_TARGET_TIMESPAN as u32, real);
        assert_eq!(c.next(&p, 2 * INTERVAL - 1, 2_005_000), Ok(Some(real)));
        // The same timestamps on mainnet-like rules: never the limit.
        let mut main_like = p.clone();
        main_like.difficulty = DifficultyRules::Retarget;
        assert_eq!(c.next(&main_like, INTERVAL + 1, 1_001_801), Ok(Some(real)));
    }
}

#[test]
fn walk_back_to_last_real_difficulty_within_the_period() {
    let p = testnet_like(DifficultyRules::Testnet3);
    let limit = p.pow_limit.to_compact_lossy().to_consensus();
    let (real, older) = (0x2010_0000, 0x2008_0000);
    let mut c = Chain::default();
    // Previous period at `older`; this one opens at `real`, then real, then three min-difficulty blocks.
    c.set(INTERVAL - 1, 900_000, older);
    c.set(INTERVAL, 1_000_000, real).set(INTERVAL + 1, 1_000_600, real);
    for (i, h) in (INTERVAL + 2..INTERVAL + 5).enumerate() {
        c.set(h, 1_002_000 + 1300 * i as u32, limit);
    }
    assert_eq!(c.next(&p, INTERVAL + 4, 1_004_700), Ok(Some(real)));
    c.check(&p, INTERVAL + 4, 1_004_700, real).unwrap();
    assert!(c.check(&p, INTERVAL + 4, 1_004_700, limit).is_err());
    // The walk stops at the period's first block even when that one is at the limit (it does not reach `older`).
    c.set(INTERVAL, 1_000_000, limit).set(INTERVAL + 1, 1_000_600, limit);
    assert_eq!(c.next(&p, INTERVAL + 4, 1_004_700), Ok(Some(limit)));
    // It does not need the headers before the period's first block, nor after the nearest real one.
    let mut sparse = Chain::default();
    sparse.set(INTERVAL + 3, 1_003_000, real).set(INTERVAL + 4, 1_004_000, limit);
    assert_eq!(sparse.next(&p, INTERVAL + 4, 1_004_100), Ok(Some(real)));
    // A missing ancestor is the caller's problem, not an invalid header.
    sparse.0.remove(&(INTERVAL + 3));
    assert_eq!(sparse.next(&p, INTERVAL + 4, 1_004_100), Err(BtcError::UnknownAncestor { height: INTERVAL + 3 }));
}

#[test]
fn retarget_from_last_block_on_testnet3_first_block_on_testnet4() {
    let real = 0x2010_0000u32;
    let (t3, t4) = (testnet_like(DifficultyRules::Testnet3), testnet_like(DifficultyRules::Testnet4));
    let limit = t3.pow_limit.to_compact_lossy();
    let mut c = Chain::default();
    // A period of 2016 blocks over one week (twice as fast as intended) whose last block is a min-difficulty block.
    let week = 7 * 24 * 3600;
    c.set(INTERVAL, 1_000_000, real).set(2 * INTERVAL - 1, 1_000_000 + week, limit.to_consensus());
    let from_last = calculate_next_work(limit, i64::from(week), t3.pow_limit).to_consensus();
    let from_first = calculate_next_work(bits(real), i64::from(week), t3.pow_limit).to_consensus();
    assert_eq!(from_first, 0x2008_0000, "half the target");
    assert_eq!(from_last, 0x203f_ffff);
    let t = 1_000_000 + week + 600;
    assert_eq!(c.next(&t3, 2 * INTERVAL - 1, t), Ok(Some(from_last)));
    assert_eq!(c.next(&t4, 2 * INTERVAL - 1, t), Ok(Some(from_first)));
    c.check(&t3, 2 * INTERVAL - 1, t, from_last).unwrap();
    c.check(&t4, 2 * INTERVAL - 1, t, from_first).unwrap();
    assert!(c.check(&t3, 2 * INTERVAL - 1, t, from_first).is_err());
    assert!(c.check(&t4, 2 * INTERVAL - 1, t, from_last).is_err());
    // Clamp: a period 100 weeks long only quadruples the target (capped at the limit).
    c.set(2 * INTERVAL - 1, 1_000_000 + 100 * week, real);
    assert_eq!(c.next(&t4, 2 * INTERVAL - 1, t), Ok(Some(0x2040_0000)));
    // No retargeting (regtest rules): the parent's bits at the boundary.
    let mut regtest_like = t3.clone();
    regtest_like.difficulty = DifficultyRules::NoRetarget;
    assert_eq!(c.next(&regtest_like, 2 * INTERVAL - 1, t), Ok(Some(real)));
    // Unchecked rules (custom chains by default): nothing required.
    let mut unchecked = t3;
    unchecked.difficulty = DifficultyRules::Unchecked;
    assert_eq!(c.next(&unchecked, 2 * INTERVAL - 1, t), Ok(None));
    c.check(&unchecked, 2 * INTERVAL - 1, t, 0x1d00_ffff).unwrap();
}

#[test]
fn timewarp_rule_on_testnet4_only() {
    let real = 0x2010_0000u32;
    let mut c = Chain::default();
    let parent_time = 2_000_000u32;
    // Exactly two weeks: the target stays.
    c.set(INTERVAL, parent_time - POW_TARGET_TIMESPAN as u32, real).set(2 * INTERVAL - 1, parent_time, real);
    let too_early = parent_time - MAX_TIMEWARP as u32 - 1;
    for rules in [DifficultyRules::Testnet3, DifficultyRules::Testnet4, DifficultyRules::Retarget] {
        let p = testnet_like(rules);
        assert_eq!(c.next(&p, 2 * INTERVAL - 1, too_early), Ok(Some(real)));
        c.check(&p, 2 * INTERVAL - 1, parent_time - MAX_TIMEWARP as u32, real).unwrap();
        let res = c.check(&p, 2 * INTERVAL - 1, too_early, real);
        if rules == DifficultyRules::Testnet4 {
            assert!(matches!(res, Err(BtcError::TimeWarp { height: 4032, .. })), "{res:?}");
        } else {
            res.unwrap();
        }
    }
    // Inside a period the rule does not apply (other timestamp rules are the chain layer's).
    let p = testnet_like(DifficultyRules::Testnet4);
    c.set(INTERVAL + 10, parent_time, real).set(INTERVAL + 9, parent_time - 600, real);
    c.check(&p, INTERVAL + 10, too_early, real).unwrap();
}

#[test]
fn real_testnet3_block_under_testnet3_rules() {
    // testnet3 block 924634 (000000000000045e…4497b): not a period boundary (924634 % 2016 = 1306), real
    // difficulty 0x1a06d450. Its parent is not in the vectors: a stand-in carries the parent's height, nBits and a
    // time within 20 minutes, which is what the rules look at.
    let p = NetParams::testnet3();
    let b = block("testnet3_block_4497b_segwit.hex");
    let h = b.header;
    assert_eq!(h.bits.to_consensus(), 0x1a06_d450);
    check_header_pow(&h, &p).unwrap();
    let limit = p.pow_limit.to_compact_lossy().to_consensus();
    assert_eq!(limit, 0x1d00_ffff);
    let mut c = Chain::default();
    c.set(924_632, h.time - 900, 0x1a06_d450).set(924_633, h.time - 300, 0x1a06_d450);
    let parent = c.0[&924_633];
    check_difficulty(&p, 924_633, &parent, &h, |x| c.0.get(&x).copied()).unwrap();
    // Had its parent been a min-difficulty block, the walk back would still find 0x1a06d450.
    c.set(924_633, h.time - 300, limit);
    let parent = c.0[&924_633];
    check_difficulty(&p, 924_633, &parent, &h, |x| c.0.get(&x).copied()).unwrap();
    // More than 20 minutes after its parent it would have had to be a min-difficulty block.
    c.set(924_633, h.time - 1201, 0x1a06_d450);
    let parent = c.0[&924_633];
    let e = check_difficulty(&p, 924_633, &parent, &h, |x| c.0.get(&x).copied()).unwrap_err();
    assert!(matches!(e, BtcError::BadDifficulty { height: 924_634, expected: 0x1d00_ffff, .. }), "{e}");
    // Block 1 of testnet4 builds on the real genesis at its bits.
    let p4 = NetParams::testnet4();
    let g4 = p4.genesis_block().unwrap().header;
    let next = header(g4.time + 600, g4.bits.to_consensus());
    check_difficulty(&p4, 0, &g4, &next, |_| None).unwrap();
}
