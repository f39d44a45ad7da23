use super::*;
use crate::chain::mine::{mine_on, mine_regtest};

fn chain(n: u32) -> (ChainStore, Vec<BlockHash>) {
    let mut store = ChainStore::new(NetParams::regtest()).unwrap();
    let mut hashes = vec![store.best_tip().0];
    hashes.extend(mine_regtest(&mut store, n, 0).unwrap());
    (store, hashes)
}

fn heights(store: &ChainStore, hashes: &[BlockHash]) -> Vec<u32> {
    hashes.iter().map(|h| store.height_of(h).unwrap()).collect()
}

#[test]
fn locator_shape() {
    let (store, hashes) = chain(1000);
    assert_eq!(store.best_tip(), (hashes[1000], 1000));
    let loc = store.locator();
    let hs = heights(&store, &loc);
    // Dense for the tip and 10 predecessors, then doubling steps, ending at genesis.
    assert_eq!(&hs[..11], &(990..=1000).rev().collect::<Vec<_>>()[..]);
    let mut expected = hs[..11].to_vec();
    let (mut h, mut step) = (990u32, 1u32);
    while h > 0 {
        h = h.saturating_sub(step);
        expected.push(h);
        if expected.len() > 10 {
            step *= 2;
        }
    }
    assert_eq!(hs, expected);
    assert_eq!(loc.last(), Some(&store.params().genesis_hash));
    assert!(hs.windows(2).all(|w| w[0] > w[1]));
    assert!(loc.len() < 30);
    for (h, hash) in hs.iter().zip(&loc) {
        assert_eq!(hashes[*h as usize], *hash);
    }
}

#[test]
fn locator_small_chains() {
    let (store, hashes) = chain(5);
    assert_eq!(store.locator(), hashes.iter().rev().copied().collect::<Vec<_>>());
    let (store, hashes) = chain(0);
    assert_eq!(store.locator(), vec![hashes[0]]);
    assert!(store.locator_from(&BlockHash::all_zeros()).is_empty());
}

#[test]
fn headers_after_answers_like_core() {
    let (store, hashes) = chain(3000);
    let hdr = |h: usize| store.header(&hashes[h]).unwrap();

    // From genesis: 2000 headers, 1..=2000.
    let got = store.headers_after(&[hashes[0]], &no_stop(), 2000);
    assert_eq!(got.len(), 2000);
    assert_eq!(got[0], hdr(1));
    assert_eq!(got[1999], hdr(2000));

    // A locator from height 2000: the rest.
    let got = store.headers_after(&store.locator_from(&hashes[2000]), &no_stop(), 2000);
    assert_eq!(got.len(), 1000);
    assert_eq!(got[0], hdr(2001));
    assert_eq!(got.last(), Some(&hdr(3000)));

    // The first known locator entry wins; unknown ones are skipped.
    let got = store.headers_after(&[BlockHash::all_zeros(), hashes[10], hashes[5]], &no_stop(), 2000);
    assert_eq!(got[0], hdr(11));

    // Stop hash ends the answer (inclusive); max caps it.
    let got = store.headers_after(&[hashes[10]], &hashes[15], 2000);
    assert_eq!(got, (11..=15).map(hdr).collect::<Vec<_>>());
    assert_eq!(store.headers_after(&[hashes[10]], &no_stop(), 3).len(), 3);

    // At the tip: nothing. Nothing known: from genesis.
    assert!(store.headers_after(&[hashes[3000]], &no_stop(), 2000).is_empty());
    assert_eq!(store.headers_after(&[BlockHash::all_zeros()], &no_stop(), 1), vec![hdr(1)]);

    // Empty locator: just the stop header.
    assert_eq!(store.headers_after(&[], &hashes[7], 2000), vec![hdr(7)]);
    assert!(store.headers_after(&[], &BlockHash::all_zeros(), 2000).is_empty());
}

#[test]
fn most_work_wins_and_locators_follow_reorgs() {
    let (mut store, hashes) = chain(10);
    // A side branch from height 7: 3 blocks is less work than the 3 blocks on the main chain
    // above 7 (equal work: the first seen stays), 4 blocks is more.
    let mut side = vec![hashes[7]];
    for _ in 0..3 {
        let b = mine_on(&mut store, *side.last().unwrap(), 0).unwrap();
        side.push(b.block_hash());
    }
    assert_eq!(store.best_tip(), (hashes[10], 10));
    assert!(!store.is_active(&side[1]));
    assert_eq!(store.height_of(&side[3]), Some(10));
    assert_eq!(store.ancestor(&side[3], 7), Some(hashes[7]));
    assert_eq!(store.ancestor(&side[3], 9), Some(side[2]));

    // Asked by a peer on the side branch: fork at 7, answer the main chain from 8.
    let got = store.headers_after(&store.locator_from(&side[3]), &no_stop(), 2000);
    assert_eq!(got.first(), store.header(&hashes[8]).as_ref());

    let b = mine_on(&mut store, side[3], 0).unwrap();
    side.push(b.block_hash());
    assert_eq!(store.best_tip(), (side[4], 11));
    assert!(store.is_active(&side[1]) && !store.is_active(&hashes[8]));
    assert_eq!(store.hash_at(8), Some(side[1]));
    let loc = store.locator();
    assert_eq!(&loc[..5], &[side[4], side[3], side[2], side[1], hashes[7]]);
    // A peer still on the old branch gets the new one from the fork.
    let got = store.headers_after(&store.locator_from(&hashes[10]), &no_stop(), 2000);
    assert_eq!(got.len(), 4);
    assert_eq!(got[0], store.header(&side[1]).unwrap());
    assert!(store.tip_work() > store.entry(&hashes[10]).unwrap().chain_work);
}

#[test]
fn unknown_parent_and_reopen() {
    let (mut store, hashes) = chain(3);
    let mut orphan = store.header(&hashes[2]).unwrap();
    orphan.prev_blockhash = BlockHash::all_zeros();
    assert!(matches!(store.insert_header(orphan), Err(ChainError::UnknownParent { .. })));
    assert_eq!(store.header_count(), 4);
    assert_eq!(store.block_count(), 4);
    assert_eq!(store.median_time_past(&hashes[3]), Some(store.header(&hashes[2]).unwrap().time));
    assert!(store.block(&hashes[3]).unwrap().is_some());
    assert!(store.block(&BlockHash::all_zeros()).unwrap().is_none());
    assert_eq!(store.missing_blocks(0, 10), vec![]);

    // Headers without bodies are reported missing, oldest first.
    let mut other = ChainStore::new(NetParams::regtest()).unwrap();
    let headers: Vec<Header> = hashes[1..].iter().map(|h| store.header(h).unwrap()).collect();
    assert_eq!(other.insert_headers(&headers).unwrap(), 3);
    assert_eq!(other.insert_headers(&headers).unwrap(), 0);
    assert_eq!(other.best_tip(), store.best_tip());
    assert_eq!(other.missing_blocks(0, 2), hashes[1..3].to_vec());

    // Reopening a backend rebuilds the index.
    let mut backend = MemoryBackend::default();
    let entries: Vec<HeaderEntry> = hashes[1..].iter().map(|h| *store.entry(h).unwrap()).collect();
    backend.put_headers(&entries, None).unwrap();
    let b2 = store.block_bytes(&hashes[2]).unwrap().unwrap();
    backend.put_block(&hashes[2], &b2).unwrap();
    let reopened = ChainStore::open(NetParams::regtest(), Box::new(backend)).unwrap();
    assert_eq!(reopened.best_tip(), store.best_tip());
    assert!(reopened.has_block(&hashes[2]) && !reopened.has_block(&hashes[1]));
    assert_eq!(reopened.block_count(), 2);
}

/// SPEC open issue 26a: walking a side branch down height by height costs one lookup a height, not a walk back to
/// the fork for each (about 80,000 lookups here with `ancestor` per height; a 2,000-header message of such
/// branches cost ~10⁹ under the write lock).
#[test]
fn a_branch_cursor_walks_a_side_branch_at_one_lookup_a_height() {
    let (mut store, hashes) = chain(600);
    let mut tip = hashes[10];
    for _ in 0..400 {
        tip = mine_on(&mut store, tip, 0).unwrap().block_hash();
    }
    assert_eq!(store.height_of(&tip), Some(410));
    assert!(!store.is_active(&tip));
    let mut cursor = BranchCursor::new(&store, tip).unwrap();
    for h in (0..=410).rev() {
        let expected = store.ancestor(&tip, h).and_then(|a| store.header(&a)).unwrap();
        assert_eq!(cursor.header_at(h), Some(expected), "height {h}");
    }
    // 400 steps down the side branch, one onto the best chain, one lookup per height asked.
    assert!(cursor.steps <= 410 + 411, "{} lookups", cursor.steps);
    // A height above the cursor starts again from the tip; above the tip there is nothing.
    let steps = cursor.steps;
    assert_eq!(cursor.header_at(409), store.header(&store.ancestor(&tip, 409).unwrap()));
    assert!(cursor.steps - steps <= 2, "{}", cursor.steps - steps);
    assert_eq!(cursor.header_at(411), None);
    assert!(BranchCursor::new(&store, BlockHash::all_zeros()).is_none());
}
