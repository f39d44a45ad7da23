//! Tables that jump to their planned size instead of doubling.
//!
//! A hash table that doubles moves every entry, and the graph's tables change under the tracker's one state lock:
//! at 57,000–100,000 peers one announce held it for 13–90 ms of CPU while a table doubled (session 17's load
//! runs). Each growing table of the graph has a *planned* size, from `--max-peers` ([`Graph::presize`]); once it
//! is full at a sixteenth of that size or more, it grows to the planned size at once, paying one move of a
//! sixteenth of its entries instead of the doublings after it.
//!
//! A tracker whose overlay stays below a sixteenth of `--max-peers` reserves nothing ahead (its memory is what
//! its overlay needs). One that passes it holds its tables at their planned size: the memory the operator
//! provisioned for `--max-peers`, touched as entries land across the tables (about 120 MB at the defaults).
//! Where the address space is refused (a strict overcommit policy), the table doubles as it would have.
//!
//! [`Graph::presize`]: crate::graph::Graph::presize

/// A table jumps once it holds at least its planned size over this.
pub(crate) const JUMP_FRACTION: usize = 16;
/// ... and at least this many entries (a jump below it saves nothing worth reserving for).
pub(crate) const JUMP_MIN: usize = 1024;

/// Room to reserve so that a table holding `len` entries with room for `cap` jumps to `planned` now: when it is
/// full (its next insert would double it, or rehash it in place) at a sixteenth of `planned` or more, and
/// smaller than `planned`. `None`: insert as usual.
pub(crate) fn jump(len: usize, cap: usize, planned: usize) -> Option<usize> {
    (len >= cap && cap < planned && len >= (planned / JUMP_FRACTION).max(JUMP_MIN)).then(|| planned - len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_past_a_sixteenth_of_its_plan_jumps_to_it() {
        assert_eq!(jump(7_168, 7_168, 100_000), Some(92_832));
        assert_eq!(jump(7_167, 7_168, 100_000), None, "not full: no growth is coming");
        assert_eq!(jump(3_584, 3_584, 100_000), None, "below a sixteenth: doubles as usual");
        assert_eq!(jump(1_792, 1_792, 4_000), Some(2_208), "a small plan jumps from JUMP_MIN");
        assert_eq!(jump(896, 896, 4_000), None);
        assert_eq!(jump(114_688, 114_688, 100_000), None, "past its plan: doubles as usual");
        assert_eq!(jump(5_000, 5_000, 0), None, "no plan");
    }
}
