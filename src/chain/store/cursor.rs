//! Walking one branch of the header tree back, height by height, at one lookup a step.
//!
//! [`ChainStore::ancestor`] starts from its hash every time: on a side branch it walks back to the fork (or the
//! height) on each call, so a caller asking for every height of a period in turn (the min-difficulty rule of
//! testnet and regtest walks back to the period's last block that is not at the PoW limit, up to 2,015 of them)
//! pays quadratically. One `headers` message of side-branch headers then cost on the order of 10⁹ lookups under
//! the store's write lock (SPEC open issue 26a). A [`BranchCursor`] keeps its place: a walk down a period costs
//! one lookup per height, as Bitcoin Core's `pprev` walk does.

use bitcoin::block::Header;
use bitcoin::BlockHash;

use super::ChainStore;

/// A place on the branch that ends at one header, moved down on demand.
pub struct BranchCursor<'a> {
    store: &'a ChainStore,
    /// Where the branch ends (asked again from there for a height above the cursor).
    tip: BlockHash,
    /// The cursor: a header of the branch and its height.
    at: BlockHash,
    height: u32,
    /// Index lookups made so far (for tests).
    pub(crate) steps: usize,
}

impl<'a> BranchCursor<'a> {
    /// A cursor on the branch ending at `tip`, if `tip` is known.
    pub fn new(store: &'a ChainStore, tip: BlockHash) -> Option<BranchCursor<'a>> {
        let height = store.index.get(&tip)?.height;
        Some(BranchCursor { store, tip, at: tip, height, steps: 0 })
    }

    /// The header at `height` on the branch (`None` above its tip). Heights at or below the last one asked cost
    /// the steps between the two (none once the walk reaches the best chain, which is indexed by height); a
    /// height above it starts again from the tip.
    pub fn header_at(&mut self, height: u32) -> Option<Header> {
        if height > self.height {
            let tip_height = self.store.index.get(&self.tip)?.height;
            if height > tip_height {
                return None;
            }
            self.at = self.tip;
            self.height = tip_height;
        }
        while self.height > height {
            if self.store.active.get(self.height as usize) == Some(&self.at) {
                // On the best chain: the rest of the way is one index lookup.
                self.at = self.store.hash_at(height)?;
                self.height = height;
                break;
            }
            self.steps += 1;
            self.at = self.store.index.get(&self.at)?.header.prev_blockhash;
            self.height -= 1;
        }
        self.steps += 1;
        self.store.header(&self.at)
    }
}
