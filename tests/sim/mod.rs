//! The deterministic simulator's parts (`tests/simulation.rs` runs them): the simulated network, the key pool and
//! one run of the whole overlay.
#![allow(dead_code)]

pub mod keys;
pub mod net;
pub mod world;

use std::sync::Mutex;

static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Installs (once) a panic hook that remembers every panic with its thread's name (a simulation runs on a thread
/// named `sim-<seed>`), then runs the default hook.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            PANICS.lock().unwrap_or_else(|e| e.into_inner()).push((name, info.to_string()));
            default(info);
        }));
    });
}

/// A panic on this thread since the last call, if any.
pub fn take_panic() -> Option<String> {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let mut p = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    let i = p.iter().position(|(n, _)| *n == name)?;
    Some(p.remove(i).1)
}
