//! Keeping an instance's graph current: one watch over the whole prefix from the revision the graph was loaded
//! at. When the watch fails (etcd lost, history compacted past it) or a request's keys could not be read back after
//! a failed commit, the instance refuses requests, loads everything again and watches from there.

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tracing::{info, warn};

use super::etcd::{prefix_end, Decoded, Etcd};
use crate::config::TrackerArgs;
use crate::service::Service;

/// Runs until the service is gone.
pub(super) async fn run(etcd: Arc<Etcd>, service: Weak<Service>, args: TrackerArgs, mut from: i64) {
    loop {
        let why = watch(&etcd, &service, from).await;
        if service.strong_count() == 0 {
            return;
        }
        etcd.cut_off(why);
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::time::sleep(backoff).await;
            match etcd.load(&args).await {
                Ok(l) => {
                    let Some(svc) = service.upgrade() else { return };
                    info!(peers = l.peers, edges = l.edges, revision = l.revision, "replica: resynchronized with etcd");
                    svc.replace_graph(l.graph, l.revs);
                    *etcd.replicas.lock().unwrap_or_else(|e| e.into_inner()) = l.replicas;
                    etcd.forget(l.orphans);
                    from = l.revision + 1;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "replica: resynchronizing with etcd failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// One watch from revision `from`; returns why it ended. The instance serves from the moment the watch exists.
async fn watch(etcd: &Etcd, service: &Weak<Service>, from: i64) -> String {
    let mut client = etcd.client.watch_client();
    let opts = WatchOptions::new().with_range(prefix_end(&etcd.prefix)).with_start_revision(from);
    let mut stream =
        match tokio::time::timeout(super::etcd::CALL_TIMEOUT, client.watch(etcd.prefix.clone(), Some(opts))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return format!("etcd watch: {e}"),
            Err(_) => return "etcd watch: no answer".into(),
        };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            () = etcd.resync.notified() => return "resynchronizing after a failed etcd call".into(),
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return "the etcd watch ended".into(),
            Err(e) => return format!("etcd watch: {e}"),
        };
        if resp.created() {
            etcd.set_healthy();
        }
        if resp.canceled() {
            return format!(
                "the etcd watch was canceled ({}; compacted at revision {})",
                resp.cancel_reason(),
                resp.compact_revision()
            );
        }
        let mut changes = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            match etcd.decode(kv.key(), value, kv.create_revision(), kv.mod_revision()) {
                Decoded::Change(c) => changes.push((c, kv.mod_revision())),
                Decoded::Replica(name, present) => {
                    let mut r = etcd.replicas.lock().unwrap_or_else(|e| e.into_inner());
                    if present {
                        if r.insert(name.clone()) {
                            info!(replica = %name, replicas = r.len(), "replica: an instance joined");
                        }
                    } else if r.remove(&name) {
                        info!(replica = %name, replicas = r.len(), "replica: an instance left");
                    }
                }
                Decoded::Other => {}
            }
        }
        if changes.is_empty() {
            continue;
        }
        let Some(svc) = service.upgrade() else { return String::new() };
        let orphans = svc.apply(changes);
        etcd.forget(orphans);
    }
}
