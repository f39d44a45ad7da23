//! An in-process overlay for tests: a real tracker and real nodes on 127.0.0.1 in this process, so a test can
//! install its own `Service` and reach into nodes (identities, gauges) while everything crosses real sockets.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use anomos::{Node, PeerConfig, Service};
use anomos_proto::identity::Identity;
use anomos_proto::ids::ChainId;
use anomos_tracker::TrackerArgs;
use clap::Parser;

#[derive(Parser)]
struct T {
    #[command(flatten)]
    a: TrackerArgs,
}

/// What one node of the overlay is.
pub struct NodeSpec {
    /// Receive window (cells per circuit and direction).
    pub window: u32,
    /// The chain it serves and its service, if it is a target.
    pub serve: Option<(&'static str, Arc<dyn Service>)>,
}

/// A relay-only node with the default window.
pub fn relay() -> NodeSpec {
    NodeSpec { window: 128, serve: None }
}

/// The running overlay; node `i` is built from spec `i`.
pub struct InProc {
    pub nodes: Vec<Arc<Node>>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Starts a tracker (announce interval 1 s, same-IP neighbors allowed) and one node per spec, and waits (up to
/// 10 s) until every node has at least two neighbors with links up.
pub async fn overlay(specs: Vec<NodeSpec>) -> InProc {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tdir = tempfile::tempdir().unwrap();
    let dir = tdir.path().to_str().unwrap().to_string();
    let args =
        T::parse_from(["t", "--listen", "127.0.0.1:0", "--data-dir", &dir, "--allow-same-ip", "--interval", "1"]).a;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(anomos_tracker::run_until(args, Some(tx), std::future::pending()));
    let ready = rx.await.unwrap();
    let mut nodes = Vec::new();
    let mut dirs = vec![tdir];
    for spec in specs {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = PeerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ready.listen,
            ready.fingerprint.to_hex(),
            d.path().to_path_buf(),
        );
        // A fixed window: these tests check the per-hop bounds of SPEC §8 for the window they name (growth is
        // unit-tested in src/circuit/window.rs and measured across a WAN by `anomos bench --only wan`).
        cfg.circuit_window = spec.window;
        cfg.circuit_window_max = spec.window;
        let service = spec.serve.map(|(chain, svc)| {
            cfg.serve = vec![ChainId::new(chain).unwrap()];
            svc
        });
        let id = Identity::generate(&mut rand::rngs::OsRng, 2048).unwrap();
        let key = anomos::tracker_client::fetch_tracker_key(ready.listen, &ready.fingerprint).await.unwrap();
        let (node, l) = Node::bind(cfg, id, key, service).await.unwrap();
        node.start(l);
        nodes.push(node);
        dirs.push(d);
    }
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if nodes.iter().all(|n| n.link_count() >= 2.min(n.neighbor_count()) && n.neighbor_count() >= 2) {
            break;
        }
    }
    InProc { nodes, _dirs: dirs }
}
