//! In-process peers and Bitcoin over circuits.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// In-process peers and Bitcoin over circuits
// ---------------------------------------------------------------------------------------------------------

/// An in-process peer of `net` (serving `chain` with `service`, if given), in `dir`.
pub async fn node_in(
    net: &Net,
    dir: &Path,
    service: Option<(&str, Arc<dyn anomos::Service>)>,
    tweak: impl FnOnce(&mut anomos::PeerConfig),
) -> Arc<anomos::Node> {
    let mut cfg = anomos::PeerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        net.tracker_addr(),
        net.tracker.fingerprint.clone(),
        dir.to_path_buf(),
    );
    let service = service.map(|(chain, s)| {
        cfg.serve = vec![ChainId::new(chain).unwrap()];
        s
    });
    tweak(&mut cfg);
    let id = tokio::task::spawn_blocking(|| Identity::generate(&mut rand::rngs::OsRng, 2048)).await.unwrap().unwrap();
    let key = anomos::tracker_client::fetch_tracker_key(cfg.tracker, &net.tracker_fp()).await.unwrap();
    let (node, l) = anomos::Node::bind(cfg, id, key, service).await.unwrap();
    node.start(l);
    node
}

/// Opens one circuit to a peer serving `chain` through `relays` relays (retrying up to 60 s).
pub async fn circuit(node: &Arc<anomos::Node>, chain: &str, relays: u8) -> anomos::CircuitStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if node.link_count() > 0 {
            let req = anomos_proto::tracker::CircuitRequest { chain: ChainId::new(chain).unwrap(), count: 1, relays };
            if let Ok(mut v) = node.request_circuits(req).await {
                if let Some(s) = v.pop() {
                    return s;
                }
            }
        }
        assert!(Instant::now() < deadline, "no circuit to {chain} opened");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The regtest network magic.
pub fn regtest_magic() -> [u8; 4] {
    anomos_proto::btc::NetParams::regtest().magic
}

/// A `version` message revealing nothing.
pub fn btc_version() -> anomos_proto::btc::Message {
    use anomos_proto::btc::{Address, ServiceFlags, VersionMessage};
    let none = Address::new(&SocketAddr::from(([0u16; 8], 0)), ServiceFlags::NONE);
    let mut v = VersionMessage::new(
        ServiceFlags::NONE,
        (unix_secs() - unix_secs() % 60) as i64,
        none.clone(),
        none,
        rand::random(),
        "/anomos:0.1.0/".into(),
        0,
    );
    v.version = 70016;
    v.relay = false;
    anomos_proto::btc::Message::Version(v)
}

/// Waits for a message satisfying `pred` (up to 20 s); false if the circuit ends first.
pub async fn btc_until(
    s: &mut anomos::CircuitStream,
    pred: impl Fn(&anomos_proto::btc::Message) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, s.recv()).await.map_err(|_| "timeout".to_string())?;
        let m = m.map_err(|e| e.to_string())?;
        if let Ok(Some((msg, _))) = anomos_proto::btc::decode_message(&m, regtest_magic()) {
            if pred(&msg) {
                return Ok(());
            }
        }
    }
}

/// The Bitcoin handshake over a circuit to a serving peer.
pub async fn btc_handshake(s: &mut anomos::CircuitStream) -> Result<(), String> {
    use anomos_proto::btc::{encode_message, Message};
    s.send(encode_message(regtest_magic(), &btc_version())).await.map_err(|e| e.to_string())?;
    btc_until(s, |m| matches!(m, Message::Verack)).await?;
    s.send(encode_message(regtest_magic(), &Message::Verack)).await.map_err(|e| e.to_string())
}

/// One ping/pong over a circuit.
pub async fn btc_ping(s: &mut anomos::CircuitStream) -> Result<(), String> {
    use anomos_proto::btc::{encode_message, Message};
    let n: u64 = rand::random();
    s.send(encode_message(regtest_magic(), &Message::Ping(n))).await.map_err(|e| e.to_string())?;
    btc_until(s, |m| matches!(m, Message::Pong(x) if *x == n)).await
}

/// Pings over a circuit in the background, counting answers; stops at the first failure.
pub struct Pinger {
    pub ok: Arc<std::sync::atomic::AtomicUsize>,
    pub failed: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Pinger {
    /// Starts pinging every 100 ms over `s` (handshake first).
    pub fn start(mut s: anomos::CircuitStream) -> Pinger {
        let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (ok2, failed2) = (ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = btc_handshake(&mut s).await {
                *failed2.lock().unwrap() = Some(format!("handshake: {e}"));
                return;
            }
            loop {
                match btc_ping(&mut s).await {
                    Ok(()) => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *failed2.lock().unwrap() = Some(e);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Pinger { ok, failed, task }
    }

    /// Asserts the circuit is still carrying pings (three more within 10 s).
    pub async fn assert_moving(&self, when: &str) {
        let start = self.ok.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < start + 3 {
            if let Some(e) = self.failed.lock().unwrap().clone() {
                panic!("the bystander circuit failed ({when}): {e}");
            }
            assert!(Instant::now() < deadline, "the bystander circuit stalled ({when})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.task.abort();
    }
}
