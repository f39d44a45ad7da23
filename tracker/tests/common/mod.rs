//! Helpers shared by the tracker's process tests: an in-process tracker, fake peers with real identities that
//! answer reachability probes, authenticated sessions, and an overlay whose circuits are peeled hop by hop.

#![allow(dead_code)]

pub use std::collections::HashSet;
pub use std::net::SocketAddr;
pub use std::sync::OnceLock;
pub use std::time::Duration;

pub use anomos_proto::identity::{save_identity, Identity, PublicKey};
pub use anomos_proto::ids::{ChainId, NeighborId};
pub use anomos_proto::link::{answer_probe, decode_probe_body, PROBE_MAGIC};
pub use anomos_proto::tc::{peel, LayerKind};
pub use anomos_proto::tracker::{
    make_hello, Announce, CircuitGrant, CircuitRequest, ErrorCode, FailureKind, FailureReport, FromTracker,
    NeighborInfo, ToTracker, TrackerChannel,
};
pub use anomos_tracker::{Ready, TrackerArgs};
pub use rand::rngs::OsRng;
pub use rand::SeedableRng;
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub use tokio::net::{TcpListener, TcpStream};
pub use tokio::task::JoinHandle;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Identity 0 is the tracker's; 1..16 are peers. Generated once per test binary, in parallel, from fixed seeds.
pub fn ids() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..16u64)
                .map(|i| {
                    s.spawn(move || {
                        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1000 + i);
                        Identity::generate(&mut rng, 2048).expect("keygen")
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("keygen thread")).collect()
        })
    })
}

pub fn tracker_id() -> &'static Identity {
    &ids()[0]
}

pub fn chain() -> ChainId {
    ChainId::new("regtest").unwrap()
}

/// A tracker running in this process.
pub struct Tracker {
    pub _dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub key: PublicKey,
    pub task: JoinHandle<Result<(), anomos_tracker::TrackerError>>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start(tweak: impl FnOnce(&mut TrackerArgs)) -> Tracker {
    // Tracker logs show up in the output of a failing test (RUST_LOG to change the level).
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "anomos_tracker=debug".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    save_identity(&dir.path().join("tracker.key"), tracker_id()).unwrap();
    let mut args = TrackerArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        allow_same_ip: true,
        ..TrackerArgs::default()
    };
    tweak(&mut args);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(anomos_tracker::run(args, Some(tx)));
    let ready: Ready = tokio::time::timeout(TIMEOUT, rx).await.expect("tracker ready in time").expect("ready sent");
    assert_eq!(ready.fingerprint, tracker_id().fingerprint());
    assert_ne!(ready.listen.port(), 0);
    Tracker { _dir: dir, addr: ready.listen, key: tracker_id().public().clone(), task }
}

/// A fake peer: answers reachability probes on `listen` with `id`'s key.
pub struct FakePeer {
    pub n: usize,
    pub listen: SocketAddr,
    pub task: JoinHandle<()>,
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePeer {
    pub fn id(&self) -> &'static Identity {
        &ids()[self.n]
    }
}

pub async fn fake_peer(n: usize) -> FakePeer {
    fake_peer_at(n, [127, 0, 0, 1].into()).await
}

/// A fake peer listening on `ip` (any address of 127.0.0.0/8 works on Linux loopback).
pub async fn fake_peer_at(n: usize, ip: std::net::IpAddr) -> FakePeer {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let listen = listener.local_addr().unwrap();
    let task = tokio::spawn(probe_responder(listener, &ids()[n]));
    FakePeer { n, listen, task }
}

pub async fn probe_responder(listener: TcpListener, id: &'static Identity) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut magic = [0u8; 8];
            let mut body = [0u8; 34];
            if s.read_exact(&mut magic).await.is_err() || magic != PROBE_MAGIC || s.read_exact(&mut body).await.is_err()
            {
                return;
            }
            if let Ok(nonce) = decode_probe_body(&body) {
                let answer = answer_probe(id, &nonce, &mut OsRng);
                let _ = s.write_all(&answer).await;
            }
        });
    }
}

/// A peer's session with the tracker.
pub struct Client {
    pub stream: TcpStream,
    pub chan: TrackerChannel,
}

/// Opens the channel (ClientHello) without authenticating.
pub async fn open_channel(addr: SocketAddr, tracker: &PublicKey) -> Result<Client, String> {
    open_channel_from(addr, tracker, [127, 0, 0, 1].into()).await
}

/// [`open_channel`] from source address `from` (the tracker requires announces of the session's own address).
pub async fn open_channel_from(
    addr: SocketAddr,
    tracker: &PublicKey,
    from: std::net::IpAddr,
) -> Result<Client, String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let (hello, handshake) = TrackerChannel::connect(&mut OsRng, tracker).unwrap();
    stream.write_all(&hello).await.unwrap();
    let mut reply = [0u8; anomos_proto::tracker::EPHEMERAL_LEN];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut reply))
        .await
        .map_err(|_| "no tracker hello in time".to_string())?
        .map_err(|e| e.to_string())?;
    let chan = handshake.finish(&reply).map_err(|e| e.to_string())?;
    Ok(Client { stream, chan })
}

/// Resumes a session with `ticket` (SPEC §3.4): `Ok(None)` if the tracker answered "unknown ticket".
pub async fn resume(t: &Tracker, ticket: &anomos_proto::tracker::Ticket) -> Result<Option<Client>, String> {
    use anomos_proto::tracker::{ResumeAnswer, EPHEMERAL_LEN};
    let mut stream = TcpStream::connect(t.addr).await.map_err(|e| e.to_string())?;
    let (hello, hs) = TrackerChannel::resume(&mut OsRng, &t.key.fingerprint(), ticket).map_err(|e| e.to_string())?;
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await.map_err(|e| e.to_string())?;
    if ResumeAnswer::from_byte(status[0]).map_err(|e| e.to_string())? == ResumeAnswer::Unknown {
        return Ok(None);
    }
    let mut e_t = [0u8; EPHEMERAL_LEN];
    stream.read_exact(&mut e_t).await.map_err(|e| e.to_string())?;
    Ok(Some(Client { chan: hs.finish(&e_t).map_err(|e| e.to_string())?, stream }))
}

/// A fully authenticated session for identity `id`.
pub async fn connect(t: &Tracker, id: &Identity) -> Client {
    connect_from(t, id, [127, 0, 0, 1].into()).await
}

/// [`connect`] from source address `from`.
pub async fn connect_from(t: &Tracker, id: &Identity, from: std::net::IpAddr) -> Client {
    let mut c = open_channel_from(t.addr, &t.key, from).await.unwrap();
    let FromTracker::Challenge { nonce } = c.recv().await.unwrap() else { panic!("expected a challenge") };
    c.send(&make_hello(id, &t.key.fingerprint(), &nonce, &mut OsRng)).await;
    match c.recv().await.unwrap() {
        FromTracker::Welcome { peer_id } => assert_eq!(peer_id, id.fingerprint()),
        other => panic!("expected welcome, got {other:?}"),
    }
    c
}

impl Client {
    pub async fn send(&mut self, msg: &ToTracker) {
        let frame = self.chan.seal(msg).unwrap();
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Reads one reply; an error means the tracker closed the connection (or sent garbage).
    pub async fn recv(&mut self) -> Result<FromTracker, String> {
        let read = async {
            let mut prefix = [0u8; 4];
            self.stream.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
            let len = TrackerChannel::frame_len(prefix).map_err(|e| e.to_string())?;
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).await.map_err(|e| e.to_string())?;
            let msg: FromTracker = self.chan.open(&body).map_err(|e| e.to_string())?;
            msg.validate().map_err(|e| e.to_string())?;
            Ok(msg)
        };
        tokio::time::timeout(TIMEOUT, read).await.map_err(|_| "timeout".to_string())?
    }

    /// Asks for the session's ticket.
    pub async fn ticket(&mut self) -> anomos_proto::tracker::Ticket {
        match self.call(ToTracker::Resumable).await {
            FromTracker::Ticket { ticket, .. } => {
                anomos_proto::tracker::Ticket { id: ticket, secret: self.chan.resumption_secret().clone() }
            }
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    /// Whether the tracker closed the connection (EOF or reset) within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(within, self.stream.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }

    pub async fn call(&mut self, msg: ToTracker) -> FromTracker {
        self.send(&msg).await;
        self.recv().await.expect("reply")
    }

    pub async fn announce(&mut self, listen: SocketAddr, chains: Vec<ChainId>) -> FromTracker {
        self.call(ToTracker::Announce(Announce { listen, chains, family: vec![] })).await
    }

    pub async fn announce_ok(&mut self, listen: SocketAddr) -> Vec<NeighborInfo> {
        match self.announce(listen, vec![chain()]).await {
            FromTracker::Announced(r) => r.neighbors,
            other => panic!("announce refused: {other:?}"),
        }
    }

    pub async fn circuits(&mut self, count: u8, relays: u8) -> FromTracker {
        self.call(ToTracker::RequestCircuits(CircuitRequest { chain: chain(), count, relays })).await
    }

    pub async fn circuits_ok(&mut self, count: u8, relays: u8) -> Vec<CircuitGrant> {
        match self.circuits(count, relays).await {
            FromTracker::Circuits(r) => r.circuits,
            other => panic!("circuit request refused: {other:?}"),
        }
    }

    pub async fn report(
        &mut self,
        kind: FailureKind,
        neighbor: Option<NeighborId>,
        circuit: Option<u64>,
        hop_tag: Option<[u8; 16]>,
    ) {
        let r = self.call(ToTracker::Report(FailureReport { kind, neighbor, circuit, hop_tag })).await;
        assert_eq!(r, FromTracker::Ack);
    }

    /// True if the tracker closed this connection (EOF or reset) within the timeout.
    pub async fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue, // e.g. an error reply before the close
            }
        }
    }
}

pub fn error_code(r: &FromTracker) -> Option<ErrorCode> {
    match r {
        FromTracker::Error(e) => Some(e.code),
        _ => None,
    }
}

/// A running overlay: the peers, their sessions and their latest neighbor tables.
pub struct Overlay {
    pub peers: Vec<FakePeer>,
    pub clients: Vec<Client>,
    pub tables: Vec<Vec<NeighborInfo>>,
}

impl Overlay {
    pub async fn new(t: &Tracker, n: usize) -> Overlay {
        Overlay::new_at(t, &vec![[127, 0, 0, 1].into(); n]).await
    }

    /// An overlay of one peer per address in `ips` (identities 1, 2, …), each announcing from its address.
    pub async fn new_at(t: &Tracker, ips: &[std::net::IpAddr]) -> Overlay {
        let n = ips.len();
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let p = fake_peer_at(i + 1, *ip).await;
            clients.push(connect_from(t, p.id(), *ip).await);
            peers.push(p);
        }
        let mut o = Overlay { peers, clients, tables: vec![Vec::new(); n] };
        // Early announcers are topped up on their next announce; after that round nobody changes.
        for _ in 0..3 {
            o.announce_all().await;
        }
        o
    }

    pub async fn announce_all(&mut self) {
        for i in 0..self.peers.len() {
            self.tables[i] = self.clients[i].announce_ok(self.peers[i].listen).await;
        }
    }

    /// Index of the peer with this SPKI DER.
    pub fn by_der(&self, der: &[u8]) -> usize {
        self.peers.iter().position(|p| p.id().public().der() == der).expect("known key")
    }

    /// The neighbor of `at` over edge `nid`, from `at`'s own table.
    pub fn across(&self, at: usize, nid: NeighborId) -> usize {
        let n = self.tables[at].iter().find(|n| n.id == nid).expect("edge in the hop's own table");
        self.by_der(&n.public_key)
    }

    /// Peels `g` hop by hop with the hops' own keys, checking every layer against the edges the tracker gave
    /// the peers. Returns the path (hop indices, requester excluded) and each hop's replay tag.
    pub fn trace(&self, requester: usize, g: &CircuitGrant, relays: usize) -> (Vec<usize>, Vec<[u8; 16]>) {
        let mut tc = g.tc_array().expect("TC_LEN bytes");
        let mut prev = g.first_hop;
        let mut at = self.across(requester, prev);
        let mut path = Vec::new();
        let mut tags = Vec::new();
        loop {
            path.push(at);
            let k = path.len() - 1;
            let peeled = peel(&tc, self.peers[at].id()).expect("hop can peel its layer");
            let layer = peeled.layer;
            assert_eq!(layer.prev, prev, "layer names the edge the OPEN arrives on");
            assert_eq!(layer.hop_secret.0, g.hop_secrets[k]);
            // Each layer's expiry is jittered; the grant names the earliest.
            assert!(layer.expires >= g.expires && layer.expires <= g.expires + 20, "layer expiry within the jitter");
            tags.push(layer.replay_tag);
            match layer.kind {
                LayerKind::Relay { next } => {
                    let nxt = self.across(at, next);
                    assert_eq!(self.across(nxt, next), at, "edge ids symmetric");
                    prev = next;
                    at = nxt;
                    tc = peeled.next.expect("relay layer has a next TC");
                }
                LayerKind::Target { chain: c, session, e2e_secret } => {
                    assert!(peeled.next.is_none());
                    assert_eq!(c, chain());
                    assert_eq!(session, g.session);
                    assert_eq!(e2e_secret.0, g.e2e_secret);
                    break;
                }
            }
        }
        assert_eq!(path.len(), relays + 1, "exactly {relays} relays then the target");
        assert_eq!(g.hop_secrets.len(), relays + 1);
        let mut all = path.clone();
        all.push(requester);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len(), "no peer twice in a path");
        (path, tags)
    }

    /// Every peer used (as relay or target) by `count` circuits for `requester`, over `rounds` requests.
    pub async fn used_by(&mut self, requester: usize, count: u8, relays: u8, rounds: usize) -> HashSet<usize> {
        let mut used = HashSet::new();
        for _ in 0..rounds {
            let grants = self.clients[requester].circuits_ok(count, relays).await;
            for g in &grants {
                used.extend(self.trace(requester, g, relays as usize).0);
            }
        }
        used
    }

    pub fn targets(&self, requester: usize, grants: &[CircuitGrant], relays: usize) -> Vec<usize> {
        grants.iter().map(|g| *self.trace(requester, g, relays).0.last().unwrap()).collect()
    }
}
