//! Receive-window auto-tuning (SPEC §8, "Window growth"): one [`Tuner`] per circuit, direction and receiver.
//!
//! A fixed window W carries at most W cells per credit round trip, however fast the path: 128 cells of 4 KiB
//! over an 80 ms hop is 6.5 MB/s, an eighth of what a single TCP stream gets there. Each receiver therefore sizes
//! its window to the bandwidth-delay product of the hop the cells come over, the way TCP and QUIC receivers
//! auto-tune their windows:
//!
//! * the **rate** is measured where it matters — cells drained (written to the next link, or delivered to the
//!   application) per second over an *epoch* of at least one window (so the bursts and pauses of a
//!   window-limited sender average out);
//! * the **delay** is the kernel's smoothed RTT of the link the cells arrive on (`TCP_INFO`; unknown on
//!   in-memory links, which then keep the announced window);
//! * at the end of each epoch the target is `2 × rate × RTT + 2 × batch`, with the highest rate of the last four
//!   epochs (as BBR max-filters bandwidth: a loss episode on a hop behind us lowers one epoch's rate, not what the
//!   path carries), clamped to `[announced window, announced maximum]`. Below it the window doubles at most (slow
//!   start). Above it the window shrinks, by at most a quarter per epoch, only while a queue stands *here* (at
//!   least a quarter of the window waiting: the next hop, or the application, is the bottleneck); with nothing
//!   waiting here a larger window costs nothing and rides out the next loss episode. While the node's cell pool
//!   is more than a quarter used the target is the announced window and the window shrinks whatever the queue:
//!   growth never competes with the budget the fairness rule protects.
//!
//! Growth is granted as extra credit in the next SENDME; shrinking withholds credit (a debt repaid from the
//! following SENDMEs). Either way the receiver's invariant `allowance + queued + drained since the last SENDME =
//! window` holds with the *current* window, so a receiver never holds more than the announced maximum per circuit
//! and direction, and an idle circuit (no epoch ever completes) keeps the announced window and costs nothing
//! more.

use std::time::{Duration, Instant};

/// Window state of one circuit direction at its receiver: 16 bytes while idle (the epoch state is allocated with
/// the first SENDME's worth of drained cells; relayed circuits by the thousand stay small).
#[derive(Debug, Clone)]
pub struct Tuner {
    window: u32,
    min: u16,
    max: u16,
    busy: Option<Box<Busy>>,
}

/// The epoch state of a circuit direction that has carried data.
#[derive(Debug, Clone)]
struct Busy {
    /// Cells drained in the current epoch, and when it began.
    epoch_cells: u32,
    epoch_start: Instant,
    /// Credit still to withhold after a shrink larger than one SENDME.
    debt: u32,
    /// Drain rates (cells/s) of the last epochs; the target uses the highest.
    rates: [f32; 4],
    epochs: u8,
}

impl Tuner {
    /// A tuner starting at `min` (the announced window), never above `max` (the announced maximum); both are
    /// u16 on the wire.
    pub fn new(min: u32, max: u32) -> Tuner {
        let wire = |w: u32| u16::try_from(w).unwrap_or(u16::MAX);
        let min = wire(min.max(1));
        Tuner { window: u32::from(min), min, max: wire(max).max(min), busy: None }
    }

    /// The current window.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Credit still withheld after a shrink.
    pub fn debt(&self) -> u32 {
        self.busy.as_ref().map_or(0, |b| b.debt)
    }

    /// `drained` more cells have left (a SENDME's worth): the credit to return now (0 = none this time). `rtt` is
    /// the smoothed RTT of the link they arrived on, `tight` whether the node's cell pool is under pressure,
    /// `queued` how many cells of this circuit and direction still wait here.
    pub fn on_drained(&mut self, drained: u32, now: Instant, rtt: Option<Duration>, tight: bool, queued: u32) -> u32 {
        let Tuner { window, min, max, busy } = self;
        let (min, max) = (u32::from(*min), u32::from(*max));
        let b = busy.get_or_insert_with(|| {
            Box::new(Busy { epoch_cells: 0, epoch_start: now, debt: 0, rates: [0.0; 4], epochs: 0 })
        });
        let mut grant = drained;
        b.epoch_cells = b.epoch_cells.saturating_add(drained);
        if b.epoch_cells >= (*window).max(drained.saturating_mul(8)) {
            let elapsed = now.saturating_duration_since(b.epoch_start).as_secs_f64().max(1e-6);
            let slot = usize::from(b.epochs) % b.rates.len();
            if let Some(r) = b.rates.get_mut(slot) {
                *r = (f64::from(b.epoch_cells) / elapsed) as f32;
            }
            b.epochs = b.epochs.wrapping_add(1);
            let rate = f64::from(b.rates.iter().copied().fold(0.0f32, f32::max));
            let target = match rtt {
                Some(rtt) if !tight => {
                    let t = 2.0 * rate * rtt.as_secs_f64() + 2.0 * f64::from(drained);
                    (t.min(f64::from(max)) as u32).clamp(min, max)
                }
                // No RTT (an in-memory link) or a tight pool: the announced window.
                _ => min,
            };
            let standing = queued.saturating_mul(4) >= *window;
            let next = if target > *window {
                target.min(window.saturating_mul(2)).min(max)
            } else if standing || tight {
                target.max(*window - *window / 4).max(min)
            } else {
                *window
            };
            if next > *window {
                let more = next - *window;
                // Growth first repays any debt left from an earlier shrink.
                let repay = more.min(b.debt);
                b.debt -= repay;
                grant = grant.saturating_add(more - repay);
            } else {
                b.debt = b.debt.saturating_add(*window - next);
            }
            *window = next;
            b.epoch_cells = 0;
            b.epoch_start = now;
        }
        let withheld = grant.min(b.debt);
        b.debt -= withheld;
        grant - withheld
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a tuner as a receiver whose sender is limited only by the window: one window of cells per round
    /// trip `loop_rtt`, drained in batches of 32. Returns the window after `epochs` round trips, checking that
    /// credit returned never exceeds the window (the invariant the sender's check relies on).
    fn window_limited(rtt: Option<Duration>, loop_rtt: Duration, rounds: usize, tight: bool) -> Tuner {
        window_limited_from(Tuner::new(128, 2048), rtt, loop_rtt, rounds, tight)
    }

    fn window_limited_from(
        mut t: Tuner,
        rtt: Option<Duration>,
        loop_rtt: Duration,
        rounds: usize,
        tight: bool,
    ) -> Tuner {
        let mut now = Instant::now();
        // Credit the sender holds (all of it: the model drains every cell at once): the window, less any debt.
        let mut outstanding = i64::from(t.window());
        for _ in 0..rounds {
            let w = t.window();
            let batches = w / 32;
            for _ in 0..batches {
                now += loop_rtt / batches;
                let g = t.on_drained(32, now, rtt, tight, 0);
                outstanding += i64::from(g) - 32;
                assert!(outstanding <= i64::from(t.window()), "credit beyond the window");
                if t.debt() == 0 {
                    assert_eq!(outstanding, i64::from(t.window()), "growth is granted at once");
                }
            }
        }
        t
    }

    #[test]
    fn an_idle_tuner_is_small() {
        assert!(std::mem::size_of::<Tuner>() <= 16, "{}", std::mem::size_of::<Tuner>());
        assert!(Tuner::new(128, 2048).busy.is_none());
    }

    #[test]
    fn a_window_limited_sender_on_a_long_hop_grows_to_the_maximum() {
        let t = window_limited(Some(Duration::from_millis(80)), Duration::from_millis(81), 12, false);
        assert_eq!(t.window(), 2048);
    }

    #[test]
    fn loopback_and_in_memory_links_keep_the_announced_window() {
        let t = window_limited(Some(Duration::from_micros(50)), Duration::from_micros(400), 50, false);
        assert_eq!(t.window(), 128, "a 50 µs hop needs no more than the announced window");
        let t = window_limited(None, Duration::from_millis(80), 50, false);
        assert_eq!(t.window(), 128, "no RTT known: no growth");
    }

    #[test]
    fn a_tight_cell_pool_stops_growth() {
        let t = window_limited(Some(Duration::from_millis(80)), Duration::from_millis(81), 12, true);
        assert_eq!(t.window(), 128);
    }

    #[test]
    fn a_slow_drain_with_a_standing_queue_shrinks_the_window_by_withholding_credit() {
        let mut t = window_limited(Some(Duration::from_millis(80)), Duration::from_millis(81), 12, false);
        assert_eq!(t.window(), 2048);
        // The next hop now drains 100 cells/s and the circuit's cells pile up here: 2 × 100 × 0.08 + 64 = 80 →
        // the floor of 128, a quarter per epoch (once the faster epochs left the max filter).
        let mut now = Instant::now() + Duration::from_secs(100);
        let (mut granted, mut drained) = (0u64, 0u64);
        for _ in 0..600 {
            now += Duration::from_millis(320);
            let queued = t.window() / 2;
            granted += u64::from(t.on_drained(32, now, Some(Duration::from_millis(80)), false, queued));
            drained += 32;
        }
        assert_eq!(t.window(), 128);
        assert_eq!(drained - granted, 2048 - 128, "exactly the shrink was withheld");
    }

    #[test]
    fn a_rate_dip_with_nothing_waiting_here_keeps_the_window() {
        // A loss episode behind us: a few slow epochs, nothing queued here. The window stays for the recovery.
        let mut t = window_limited(Some(Duration::from_millis(80)), Duration::from_millis(81), 12, false);
        assert_eq!(t.window(), 2048);
        let mut now = Instant::now() + Duration::from_secs(100);
        for _ in 0..600 {
            now += Duration::from_millis(320);
            t.on_drained(32, now, Some(Duration::from_millis(80)), false, 0);
        }
        assert_eq!(t.window(), 2048);
        // Under node-budget pressure it shrinks all the same.
        for _ in 0..600 {
            now += Duration::from_millis(320);
            t.on_drained(32, now, Some(Duration::from_millis(80)), true, 0);
        }
        assert_eq!(t.window(), 128);
    }

    #[test]
    fn a_bandwidth_limited_path_settles_near_twice_its_bdp() {
        // 10 MB/s ≈ 2,440 cells/s over a 50 ms hop: BDP ≈ 122 cells, target ≈ 2 × 122 + 64 = 308.
        // The next hop is the bottleneck, so the circuit's cells wait here.
        let mut t = Tuner::new(128, 2048);
        let mut now = Instant::now();
        for _ in 0..2000 {
            now += Duration::from_secs_f64(32.0 / 2440.0);
            let queued = t.window() / 2;
            t.on_drained(32, now, Some(Duration::from_millis(50)), false, queued);
        }
        assert!((250..=400).contains(&t.window()), "{}", t.window());
    }
}
