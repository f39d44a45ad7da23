//! Child processes and temporary directories for the commands that run a whole overlay on this machine
//! (`demo`, `bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::error::PeerError;

/// Process ids of the children started here that have not been stopped or dropped yet, for
/// [`kill_live_children`].
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(pid: u32) {
    live().retain(|&p| p != pid);
}

/// Kills (SIGKILL) every child started by [`spawn_ready`] that is still running, and waits (up to 5 s) until each
/// has died, so it can no longer write into the working directory: what a command interrupted by a signal does
/// before it returns, so that its relays and tracker do not outlive it. It blocks, and it does not wait for
/// async tasks. A pid is forgotten before its child is reaped, so this never signals a reused pid.
pub(crate) fn kill_live_children() {
    let pids: Vec<u32> = live().drain(..).collect();
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // Dead means a zombie (not reaped yet: they are our children) or gone.
    let dead = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(dead) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process that is killed when dropped.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Proc {
    /// Its process id (0 once it has exited).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Asks the process to shut down gracefully (SIGTERM) and waits up to `grace` for it to exit; kills it
    /// after that. Returns whether it exited by itself with status 0.
    pub(crate) async fn stop(&mut self, grace: Duration) -> bool {
        let pid = self.pid();
        if pid == 0 {
            return false;
        }
        // From here on this call (or the drop of `self`) ends the child; it is reaped below.
        forget(pid);
        // `kill -TERM` (POSIX) instead of a libc dependency for one call.
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if sent {
            if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
                return status.success();
            }
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        false
    }
}

/// Stops every process gracefully (all at once: SIGTERM, then each waits up to `grace`); returns how many
/// exited cleanly.
pub(crate) async fn stop_all(procs: &mut [Proc], grace: Duration) -> usize {
    crate::node::futures_join_all(procs.iter_mut().map(|p| p.stop(grace))).await.into_iter().filter(|&ok| ok).count()
}

impl Drop for Proc {
    fn drop(&mut self) {
        forget(self.pid());
        let _ = self.child.start_kill();
    }
}

/// A temporary directory removed when dropped (unless kept).
pub(crate) struct TempRoot {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Starts `anomos <args>` (this executable; inside network namespace `ns` if given, with `ip netns exec`) with
/// stdout piped and stderr to `log`; returns the process and its stdout lines.
pub(crate) fn spawn_piped(
    ns: Option<&str>,
    name: &str,
    args: &[String],
    log: &Path,
) -> Result<(Proc, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>), PeerError> {
    let exe = std::env::current_exe()?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    // The children of a local overlay get exactly the flags given here: the operator's own settings
    // (ANOMOS_CONFIG, ANOMOS_METRICS, …) would make every child bind the same ports or share a data dir.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ANOMOS_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take();
    let proc = Proc { name: name.to_string(), child };
    live().push(proc.pid());
    let stdout = stdout.ok_or(PeerError::Process("no stdout".into()))?;
    Ok((proc, BufReader::new(stdout).lines()))
}

/// Starts `anomos <args>` (this executable) with stderr to `log`, and waits for its
/// `… ready listen=ADDR fingerprint=HEX` line; returns the process, ADDR and HEX.
pub(crate) async fn spawn_ready(name: &str, args: &[String], log: &Path) -> Result<(Proc, String, String), PeerError> {
    spawn_ready_in(None, name, args, log).await
}

/// [`spawn_ready`] inside network namespace `ns` (if given).
pub(crate) async fn spawn_ready_in(
    ns: Option<&str>,
    name: &str,
    args: &[String],
    log: &Path,
) -> Result<(Proc, String, String), PeerError> {
    let (proc, mut lines) = spawn_piped(ns, name, args, log)?;
    let line = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(" ready ") {
                return Some(l);
            }
        }
        None
    })
    .await
    .map_err(|_| PeerError::Timeout("child process start"))?
    .ok_or_else(|| PeerError::Process(format!("{name} exited before it was ready; see {}", log.display())))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
    let listen = field("listen=").ok_or_else(|| PeerError::Process(format!("bad ready line: {line}")))?;
    let fp = field("fingerprint=").ok_or_else(|| PeerError::Process(format!("bad ready line: {line}")))?;
    Ok((proc, listen, fp))
}
