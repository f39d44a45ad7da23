//! The local control endpoint: a Unix socket `<data-dir>/control.sock` (mode 0600, in the 0700 data
//! directory) that `anomos status` asks. One request per connection: a single JSON line (at most
//! [`MAX_REQUEST`] bytes, within [`TIMEOUT`]), `{"request":"status"}`; the answer is one JSON line, then the
//! connection closes. Only the local user who owns the data directory can connect (file permissions), and
//! nothing on the socket changes the node: it only reads.
//!
//! At start a socket file left by a crashed peer is replaced; one that still answers belongs to a running peer
//! using the same data directory, which is refused. The socket is removed on shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tracing::{debug, info, warn};

use crate::error::PeerError;
use crate::node::{unix_now, Node};

/// The socket's file name in the data directory.
pub const SOCKET: &str = "control.sock";
/// Most bytes of a request.
pub const MAX_REQUEST: usize = 4096;
/// Most bytes of an answer a client accepts.
pub const MAX_ANSWER: usize = 1 << 20;
/// Time to send a request (server) or to get the answer (client).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where a data directory's control socket lives.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// The status document (what `anomos status --json` prints).
pub fn status(node: &Node) -> Value {
    let g = node.gauges();
    let roles = node.circuits_by_role();
    let links: Vec<Value> = node
        .link_infos()
        .into_iter()
        .map(|l| {
            json!({
                "peer": l.peer,
                "direction": l.direction,
                "age_secs": l.age.as_secs(),
                "queued_cells": l.queued_cells,
                "circuits": l.circuits,
            })
        })
        .collect();
    let chain = node.chain_info().map(|c| {
        let s = crate::chain::read(&c.store);
        let (tip, height) = s.best_tip();
        json!({
            "name": c.name,
            "role": c.role,
            "height": height,
            "tip": tip.to_string(),
            "headers": s.header_count().saturating_sub(1),
            "blocks": s.block_count().saturating_sub(1),
            "source": "store",
        })
    });
    let now = unix_now();
    // A chain served from another node (`--upstream`): what, from where, and whether it answered last time.
    let chain = chain.or_else(|| {
        node.upstream_info().map(|u| {
            let last = u.health.last();
            json!({
                "name": u.name,
                "role": "serving",
                "source": "upstream",
                "upstream": {
                    "addr": u.addr,
                    "reachable": last.as_ref().map(|(_, err)| err.is_none()),
                    "checked_ago_secs": last.as_ref().map(|(t, _)| now.saturating_sub(*t)),
                    "last_error": last.and_then(|(_, err)| err),
                },
            })
        })
    });
    let unreachable: Vec<Value> = node
        .unreachable_neighbors()
        .into_iter()
        .map(|u| {
            json!({
                "peer": u.peer,
                "addr": u.addr.to_string(),
                "failed_dials": u.failures,
                "last_error": u.last_error,
                "down_secs": u.since.elapsed().as_secs(),
                "next_dial_in_secs": u.next_dial.saturating_duration_since(std::time::Instant::now()).as_secs(),
            })
        })
        .collect();
    let sync = &node.sync;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let ts = node.tracker_state();
    json!({
        "fingerprint": node.fingerprint().to_hex(),
        "listen": node.listen_addr.to_string(),
        "uptime_secs": node.started.elapsed().as_secs(),
        "shutting_down": node.is_shutting_down(),
        "links": links,
        "unreachable": unreachable,
        "circuits": {
            "relay": roles.relay,
            "origin": roles.origin,
            "target": roles.target,
            "opening": roles.opening,
            "total": g.circuits,
            "max": node.cfg.max_circuits,
        },
        "buffer": { "queued_cells": g.queued_cells, "budget": node.budget.cap(), "max_link_queue": g.max_link_queue },
        "chain": chain,
        "sync": {
            "phase": sync.phase_name(),
            "header_height": ld(&sync.header_height),
            "blocks_done": ld(&sync.blocks_done),
            "blocks_total": ld(&sync.blocks_total),
        },
        "tracker": {
            "addr": node.cfg.tracker.to_string(),
            "neighbors": node.neighbor_count(),
            "last_announce_ok_unix": ts.last_ok_unix,
            "last_announce_ago_secs": ts.last_ok_unix.map(|t| now.saturating_sub(t)),
            "last_error": ts.last_error,
            "announces_ok": ld(&node.stats.announces_ok),
            "announces_failed": ld(&node.stats.announces_failed),
        },
        "counters": {
            "cells_relayed": ld(&node.stats.cells_relayed),
            "bytes_relayed": ld(&node.stats.bytes_relayed),
            "relay_opened": ld(&node.stats.relay_opened),
            "target_opened": ld(&node.stats.target_opened),
            "denied": ld(&node.stats.denied),
        },
        "replay_cache_tags": node.replay_len(),
    })
}

/// Binds the control socket of `node` (replacing a stale one) and serves it. Returns its path, or `None` if
/// the socket could not be created (e.g. a data directory path longer than a Unix socket path may be): that
/// is logged and the peer runs without it. A socket that answers (another peer on this data directory) is
/// an error.
#[cfg(unix)]
pub async fn start(node: &Arc<Node>) -> Result<Option<PathBuf>, PeerError> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(&node.cfg.data_dir);
    if path.exists() {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(&path)).await {
            Ok(Ok(_)) => {
                return Err(PeerError::Control(format!(
                    "{} answers: another peer is running with this data directory",
                    path.display()
                )))
            }
            _ => {
                info!(path = %path.display(), "replacing a stale control socket");
                std::fs::remove_file(&path)?;
            }
        }
    }
    // The data directory is 0700, so nobody else can reach the socket between bind and chmod.
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), "control socket not available ({e}); `anomos status` will not reach this peer");
            return Ok(None);
        }
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    node.set_control_path(path.clone());
    let weak = Arc::downgrade(node);
    let conns = Arc::new(tokio::sync::Semaphore::new(8));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(node) = weak.upgrade() else { return };
            let Ok(permit) = conns.clone().try_acquire_owned() else { continue };
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = tokio::time::timeout(TIMEOUT, serve_one(s, &node))
                    .await
                    .unwrap_or(Err(PeerError::Timeout("a control request")))
                {
                    debug!("control request dropped: {e}");
                }
            });
        }
    });
    Ok(Some(path))
}

/// Without Unix sockets there is no control endpoint.
#[cfg(not(unix))]
pub async fn start(_node: &Arc<Node>) -> Result<Option<PathBuf>, PeerError> {
    warn!("the control endpoint needs Unix sockets; `anomos status` will not reach this peer");
    Ok(None)
}

#[cfg(unix)]
async fn serve_one(s: tokio::net::UnixStream, node: &Node) -> Result<(), PeerError> {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    let n = BufReader::new(r.take(MAX_REQUEST as u64)).read_line(&mut line).await?;
    let answer = if n == 0 || !line.ends_with('\n') {
        json!({"error": format!("one JSON line of at most {MAX_REQUEST} bytes expected")})
    } else {
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.get("request").and_then(Value::as_str) == Some("status") => status(node),
            Ok(_) => json!({"error": "unknown request (known: {\"request\":\"status\"})"}),
            Err(e) => json!({"error": format!("bad JSON: {e}")}),
        }
    };
    let mut out = serde_json::to_vec(&answer).map_err(|e| PeerError::Control(e.to_string()))?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await?;
    Ok(())
}

/// Asks the peer whose data directory is `data_dir` for its status.
#[cfg(unix)]
pub async fn query(data_dir: &Path) -> Result<Value, PeerError> {
    let path = socket_path(data_dir);
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            PeerError::Control(format!(
                "cannot reach a running peer at {} ({e}); is `anomos peer --data-dir {}` running?",
                path.display(),
                data_dir.display()
            ))
        })?;
        s.write_all(b"{\"request\":\"status\"}\n").await?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_ANSWER as u64 + 1).read_to_end(&mut buf).await?;
        if buf.len() > MAX_ANSWER {
            return Err(PeerError::Control("control answer too large".into()));
        }
        let v: Value = serde_json::from_slice(&buf)
            .map_err(|e| PeerError::Control(format!("bad answer from {}: {e}", path.display())))?;
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            return Err(PeerError::Control(format!("the peer refused the request: {err}")));
        }
        Ok(v)
    };
    tokio::time::timeout(TIMEOUT, fut).await.map_err(|_| PeerError::Timeout("the peer's status answer"))?
}

/// Without Unix sockets there is no control endpoint.
#[cfg(not(unix))]
pub async fn query(_data_dir: &Path) -> Result<Value, PeerError> {
    Err(PeerError::Control("the control endpoint needs Unix sockets".into()))
}

/// Warns if the data directory is readable by others (the key and the control socket live there).
pub fn check_private(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(dir) {
            if m.permissions().mode() & 0o077 != 0 {
                warn!(dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the data directory is accessible to other users; chmod 700 it");
            }
        }
    }
}
