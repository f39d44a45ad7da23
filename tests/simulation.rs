//! Deterministic simulation of the whole overlay (issue 13): a real tracker and real peers — honest and hostile —
//! in one process, on a simulated network driven by tokio's paused clock on one thread, with faults and hostile
//! cells drawn from a seed, and invariants checked as it runs. Design and results: docs/RELIABILITY.md,
//! "Deterministic simulation".
//!
//! * `ANOMOS_SIM_SEEDS=N cargo test --release --test simulation` runs seeds 0..N (`ANOMOS_SIM_BASE=B`: B..B+N);
//! * `ANOMOS_SIM_SEED=S cargo test --release --test simulation -- --nocapture` replays one seed with full logs
//!   (`RUST_LOG` as usual, default `info`; `ANOMOS_SIM_TRACE=1` also prints the event trace);
//! * a failing seed prints that command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod sim;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sim::world::{self, Outcome, Scenario};

/// Seeds a plain `cargo test --release --test simulation` runs (≈ 1 minute on the 2-core reference machine); a
/// debug build (`cargo test --workspace`) runs 2.
const DEFAULT_SEEDS: u64 = if cfg!(debug_assertions) { 2 } else { 10 };
/// Seeds that once failed, kept as regression tests (docs/RELIABILITY.md, "Deterministic simulation": what each
/// found). 1061: an honest circuit stalled for 120 s through a hostile relay that injected a BREAK on its own
/// circuit id (the simulator now judges circuits over honest relays only). 10071: after healing, a peer with no
/// 1-relay path to a serving peer (the final check now tries 1, 2 and 3 relays). 4 and 13: after healing, a peer
/// behind hostile hops that refuse every OPEN unpeeled got no working circuit, because an untagged refusal blamed
/// nobody (SPEC revision 10: `next-refused`, and an untagged one blames the first hop); 30: the same once blamed,
/// because a blamed hop's announce ended its blame (now it lasts `--blame-secs`); 32: a requester that had blamed
/// the only other serving peer during an outage got no path at all (blame now gives way when no path avoids it).
/// 40723: a late joiner whose three neighbors were all hostile and blamed got no circuit (blamed neighbors no
/// longer count toward its degree: it gets others). 70191: a chain sync never finished: its requester, at the
/// maximum degree, had two refusing neighbors and four that led nowhere near the chain's serving peers (a peer
/// at the maximum now sheds edges to neighbors it blamed, so others fit). 511030, 511091: an honest serving peer
/// whose neighbors were all liars or refusing peers, cut off from the requesters that caught the liars (a
/// `Misbehaving` blame now leaves the liar out as a target only; it still relays). 700021, 700041 (with serving
/// peers that play for time): a requester given a `notfound`-for-everything target again and again (such a
/// `notfound` for blocks whose headers the target sent is now withholding, reported). 900618: an honest serving
/// peer whose other neighbors refused every circuit and were blamed by many kept them as neighbors (neighbors
/// under corroborated blame no longer count toward a degree). 910389: a peer re-joining a full overlay got three
/// neighbors that all refused it, and no edge was split for it (the split now counts as `top_up` does). 1100951:
/// a tracker restarted in the same process could not open its state database, still held by a reachability probe
/// of the stopped tracker (a probe now holds the transport only). 4000079: a requester that had blamed its
/// one-relay neighbors of the honest target for refusing, and the target for a broken link, was given only paths
/// through the relays that refused (a round that keeps blamed relays out but lets such a target be one now comes
/// before blame is ignored).
const REGRESSIONS: &[u64] = &[
    4, 13, 30, 32, 1061, 10071, 40723, 70191, 100186, 100194, 110196, 210158, 210264, 511030, 511091, 700021, 700041,
    900618, 910389, 1100951, 4000079,
];
/// Wall time a run may go without simulated progress before it is declared stuck (a blocked thread: a lock
/// taken twice, a blocking call that never returns).
const STALL: Duration = Duration::from_secs(30);

fn replay_command(seed: u64) -> String {
    format!("ANOMOS_SIM_SEED={seed} cargo test --release --test simulation -- --nocapture")
}

/// Runs one seed on its own thread (named `sim-<seed>`, a current-thread runtime with a paused clock), watching
/// it from this one: a run whose simulated clock stops for [`STALL`] of wall time is reported as a freeze.
fn run_seed(seed: u64, scenario: Scenario, log: bool) -> Result<Outcome, String> {
    sim::install_panic_hook();
    let progress = Arc::new(world::Progress::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = progress.clone();
    std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .stack_size(16 << 20)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            let out = rt.block_on(world::run(seed, scenario, log, p2));
            let _ = tx.send(out);
            // Tasks still parked (zombie incarnations of killed peers) are dropped with the runtime.
            drop(rt);
        })
        .unwrap();
    let mut last = (0, Instant::now());
    let mut woke = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(out) => {
                if out.violation.is_some() {
                    for l in &out.log {
                        println!("{l}");
                    }
                }
                return match &out.violation {
                    None => Ok(out),
                    Some(v) => Err(format!(
                        "seed {seed}: invariant violated at {:.1} s simulated: {}\n  replay: {}",
                        v.at.as_secs_f64(),
                        v.what,
                        replay_command(seed)
                    )),
                };
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // This loop wakes every second. A far longer gap means the whole process was stopped (SIGSTOP, to
                // give the machine to a measurement) or starved: the simulation was not blocked, so the stall is
                // timed again from now. (Seed 7002116 was reported frozen that way; it replays clean.)
                if woke.elapsed() > Duration::from_secs(5) {
                    last.1 = Instant::now();
                }
                woke = Instant::now();
                let p = progress.secs.load(Ordering::Relaxed);
                if p != last.0 {
                    last = (p, Instant::now());
                } else if last.1.elapsed() > STALL {
                    return Err(format!(
                        "seed {seed}: the simulation froze at {p} s simulated (no simulated progress for {STALL:?} of wall time: a thread is blocked, e.g. a lock taken twice); the harness's last action: {}\n  replay: {}",
                        progress.last.lock().unwrap(),
                        replay_command(seed)
                    ));
                }
            }
            Err(e) => {
                return Err(format!(
                    "seed {seed}: the simulation thread died ({e}): a panic outside a task\n  replay: {}",
                    replay_command(seed)
                ))
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_timer(SimTime)
        .with_thread_names(false)
        .try_init();
}

/// Log timestamps in simulated time.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "t={}", anomos_net::rt::unix_now().saturating_sub(world::EPOCH))
    }
}

#[test]
fn simulation() {
    if let Some(seed) = env_u64("ANOMOS_SIM_SEED") {
        init_logs();
        let t = Instant::now();
        let r = run_seed(seed, Scenario::default(), std::env::var("ANOMOS_SIM_TRACE").is_ok());
        match r {
            Ok(out) => {
                for l in &out.log {
                    println!("{l}");
                }
                println!(
                    "seed {seed}: ok in {:.1} s wall, {:.0} s simulated, trace {:016x} ({} events), {:?}",
                    t.elapsed().as_secs_f64(),
                    out.sim_time.as_secs_f64(),
                    out.trace.0,
                    out.trace.1,
                    out.stats
                );
            }
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let n = env_u64("ANOMOS_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let base = env_u64("ANOMOS_SIM_BASE").unwrap_or(0);
    let t = Instant::now();
    let mut sim_total = Duration::ZERO;
    let mut failures = Vec::new();
    let mut totals: std::collections::BTreeMap<&str, u64> = Default::default();
    for seed in base..base + n {
        match run_seed(seed, Scenario::default(), false) {
            Ok(out) => {
                println!("seed {seed}: ok, {:.0} s simulated, trace {:016x}", out.sim_time.as_secs_f64(), out.trace.0);
                sim_total += out.sim_time;
                for (k, v) in out.stats {
                    *totals.entry(k).or_default() += v;
                }
            }
            Err(e) => {
                eprintln!("{e}");
                failures.push(e);
                if std::env::var("ANOMOS_SIM_KEEP_GOING").is_err() {
                    break;
                }
            }
        }
    }
    let wall = t.elapsed().as_secs_f64();
    println!(
        "simulation: {n} seeds from {base} in {wall:.1} s ({:.2} seeds/s), {:.0} s simulated ({:.0} s per seed), {} failed; {totals:?}",
        n as f64 / wall,
        sim_total.as_secs_f64(),
        sim_total.as_secs_f64() / n.max(1) as f64,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn regression_seeds() {
    for &seed in REGRESSIONS {
        if let Err(e) = run_seed(seed, Scenario::default(), false) {
            panic!("{e}");
        }
    }
}

/// The same seed twice gives the same run: the same ordered trace of network and harness events. A release
/// build replays a full seed with a tracker kill (seed 26: announces fail and are retried with jitter, which once
/// came from the thread's RNG and made two runs differ); a debug build a small one.
#[test]
fn same_seed_same_trace() {
    let (seed, scenario) = if cfg!(debug_assertions) {
        (11, Scenario { honest: (6, 8), hostile: (1, 1), faults_for: Duration::from_secs(30) })
    } else {
        (26, Scenario::default())
    };
    let a = run_seed(seed, scenario, true).unwrap();
    let b = run_seed(seed, scenario, true).unwrap();
    if a.trace != b.trace {
        let first = a.log.iter().zip(&b.log).position(|(x, y)| x != y).unwrap_or(a.log.len().min(b.log.len()));
        let show =
            |l: &[String]| l.iter().skip(first.saturating_sub(3)).take(8).cloned().collect::<Vec<_>>().join("\n    ");
        panic!(
            "seed {seed} ran twice with different traces ({:016x}/{} vs {:016x}/{}); first difference at event {first}:\n  run 1:\n    {}\n  run 2:\n    {}",
            a.trace.0,
            a.trace.1,
            b.trace.0,
            b.trace.1,
            show(&a.log),
            show(&b.log)
        );
    }
}
