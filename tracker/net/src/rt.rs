//! The runtime calls a deterministic simulation must own.
//!
//! Outside a simulation each is what it always was: blocking work goes to tokio's blocking pool, the wall clock
//! is `SystemTime`, seeds come from the OS. A simulation runs every node and the tracker as tasks of one
//! current-thread runtime with tokio's paused clock, and calls [`simulate`] on that thread first; then
//!
//! * [`spawn_blocking`] runs the work as an ordinary task of that runtime (a thread pool would finish it at a
//!   wall-clock moment, so the order of events would depend on the machine's speed);
//! * [`unix_now`] is a fixed epoch plus the simulated time since [`simulate`] (tokio's paused clock);
//! * [`seed_rng`] draws seeds from a generator seeded by the simulation's seed.
//!
//! The switch is a thread-local read: nothing else in production changes.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::task::JoinHandle;

struct Sim {
    epoch_unix: u64,
    start: tokio::time::Instant,
    rng: StdRng,
}

thread_local! {
    static SIM: RefCell<Option<Sim>> = const { RefCell::new(None) };
}

/// Ends the simulation mode of this thread when dropped.
#[must_use = "the simulation mode ends when the guard is dropped"]
pub struct SimGuard(());

impl Drop for SimGuard {
    fn drop(&mut self) {
        SIM.with(|s| s.borrow_mut().take());
    }
}

/// Puts this thread in simulation mode (see the module docs): `seed` seeds [`seed_rng`], `epoch_unix` is what
/// [`unix_now`] says now. Call it inside the simulation's runtime (it reads tokio's clock).
pub fn simulate(seed: u64, epoch_unix: u64) -> SimGuard {
    let sim = Sim { epoch_unix, start: tokio::time::Instant::now(), rng: StdRng::seed_from_u64(seed) };
    SIM.with(|s| *s.borrow_mut() = Some(sim));
    SimGuard(())
}

/// Whether this thread runs a simulation.
pub fn is_simulated() -> bool {
    SIM.with(|s| s.borrow().is_some())
}

/// Runs CPU-heavy or blocking work (RSA, file writes) off the async workers: on tokio's blocking pool, or, in a
/// simulation, as a task of the simulation's runtime.
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if is_simulated() {
        tokio::spawn(async move { f() })
    } else {
        tokio::task::spawn_blocking(f)
    }
}

/// The monotonic clock as `std::time::Instant`: tokio's clock (the same as `Instant::now()` in production, the
/// simulated time under a simulation's paused clock). Timers and rates that decide what happens use this, so they
/// run on simulated time; what is only displayed may keep `std::time::Instant`.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Time since `t` on [`now`]'s clock (zero if `t` is later).
pub fn since(t: std::time::Instant) -> std::time::Duration {
    now().saturating_duration_since(t)
}

/// Seconds since the Unix epoch (the simulated clock in a simulation).
pub fn unix_now() -> u64 {
    let sim = SIM.with(|s| s.borrow().as_ref().map(|s| (s.epoch_unix, s.start)));
    match sim {
        Some((epoch, start)) => epoch + start.elapsed().as_secs(),
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    }
}

/// A 32-byte seed for a non-cryptographic-in-effect RNG of the process (the tracker's graph choices): from the
/// OS, or in a simulation from the simulation's seed.
pub fn seed_rng() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let drawn = SIM.with(|s| s.borrow_mut().as_mut().map(|s| s.rng.fill_bytes(&mut seed)).is_some());
    if !drawn {
        rand::rngs::OsRng.fill_bytes(&mut seed);
    }
    seed
}

/// Runs `f` with a random generator for choices that must replay in a simulation (jitter): the thread's RNG, or
/// in a simulation the one seeded by its seed. Not for keys or nonces: those always come from the OS.
pub fn with_rng<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
    SIM.with(|s| match s.borrow_mut().as_mut() {
        Some(sim) => f(&mut sim.rng),
        None => f(&mut rand::thread_rng()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulation_owns_the_clock_the_seeds_and_blocking_work() {
        assert!(!is_simulated());
        let real = unix_now();
        assert!(real > 1_700_000_000);
        {
            let _g = simulate(7, 1_000);
            assert_eq!(unix_now(), 1_000);
            tokio::time::sleep(std::time::Duration::from_secs(90)).await;
            assert_eq!(unix_now(), 1_090);
            let a = seed_rng();
            let _g2 = simulate(7, 0);
            assert_eq!(seed_rng(), a, "the same seed gives the same seeds");
            let thread = std::thread::current().id();
            assert_eq!(spawn_blocking(move || std::thread::current().id()).await.unwrap(), thread);
        }
        assert!(!is_simulated());
        assert_ne!(seed_rng(), seed_rng());
    }
}
