//! Bitcoin P2P software for the bridge tests: a raw P2P client, and a Bitcoin node on a TCP port built from our
//! chain code (a TCP adapter in front of a `ChainService`), with the checks on what each sent and received.

use super::*;

// ---- a raw Bitcoin P2P client ----

/// What an unmodified node may send: a `version` with real addresses in it.
pub(crate) fn revealing_version(recv: SocketAddr, from: SocketAddr, height: i32) -> VersionMessage {
    let services = ServiceFlags::NETWORK | ServiceFlags::WITNESS;
    let mut v = VersionMessage::new(
        services,
        1_700_000_123,
        Address::new(&recv, ServiceFlags::NONE),
        Address::new(&from, services),
        rand::random(),
        "/Satoshi:27.0.0/".into(),
        height,
    );
    v.version = 70016;
    v.relay = true;
    v
}

pub(crate) struct RawPeer {
    pub(crate) tcp: TcpStream,
    pub(crate) reader: EnvelopeReader,
    pub(crate) magic: [u8; 4],
}

impl RawPeer {
    pub(crate) async fn connect(addr: SocketAddr) -> RawPeer {
        let tcp = TcpStream::connect(addr).await.unwrap();
        RawPeer { tcp, reader: EnvelopeReader::new(regtest().magic), magic: regtest().magic }
    }

    pub(crate) async fn send(&mut self, m: &Message) {
        self.tcp.write_all(&encode_message(self.magic, m)).await.unwrap();
    }

    /// The next envelope; `None` once the bridge closed the connection.
    pub(crate) async fn recv(&mut self) -> Option<Envelope> {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(env) = self.reader.next().unwrap() {
                return Some(env);
            }
            let room = self.reader.remaining_capacity().min(buf.len());
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut buf[..room])).await.expect("bridge went silent");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => assert_eq!(self.reader.push(&buf[..n]), n),
            }
        }
    }

    /// The next message with command `cmd` (others are skipped).
    pub(crate) async fn expect(&mut self, cmd: &str) -> Message {
        loop {
            let env = self.recv().await.unwrap_or_else(|| panic!("connection closed while waiting for '{cmd}'"));
            if env.command == cmd {
                return env.message().unwrap();
            }
        }
    }

    /// version/verack both ways; returns the other side's `version`.
    pub(crate) async fn handshake(&mut self, v: VersionMessage) -> VersionMessage {
        self.send(&Message::Version(v)).await;
        let (mut theirs, mut verack) = (None, false);
        while theirs.is_none() || !verack {
            let env = self.recv().await.expect("closed during the handshake");
            match env.message().unwrap() {
                Message::Version(v) => theirs = Some(v),
                Message::Verack => verack = true,
                _ => {}
            }
        }
        self.send(&Message::Verack).await;
        theirs.unwrap()
    }

    /// True if the bridge closes the connection within `limit` (anything it sends before is skipped).
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// Headers from genesis, checked: linkage, proof of work.
pub(crate) fn check_headers(headers: &[Header], params: &NetParams) {
    let genesis = params.genesis_block().unwrap().header;
    let mut prev = genesis;
    for h in headers {
        check_linkage(&prev, h).unwrap();
        check_header_pow(h, params).unwrap();
        prev = *h;
    }
}

/// Syncs headers and two blocks (tip plain, first as witness) over `c`; returns the header count.
pub(crate) async fn headers_and_blocks(c: &mut RawPeer, store: &SharedStore) -> usize {
    let params = regtest();
    c.send(&Message::GetHeaders(GetHeadersMessage::new(vec![params.genesis_hash], BlockHash::all_zeros()))).await;
    let Message::Headers(headers) = c.expect("headers").await else { unreachable!() };
    check_headers(&headers, &params);
    let (tip, height) = store.read().unwrap().best_tip();
    assert_eq!(headers.len() as u32, height);
    assert_eq!(headers.last().unwrap().block_hash(), tip);
    let first = headers[0].block_hash();
    c.send(&Message::GetData(vec![Inventory::Block(tip), Inventory::WitnessBlock(first)])).await;
    for (want, header) in [(tip, headers.last().unwrap()), (first, &headers[0])] {
        let Message::Block(block) = c.expect("block").await else { unreachable!() };
        assert_eq!(block.block_hash(), want, "the block asked for");
        assert_eq!(block.header, *header);
        // Merkle root, coinbase, sizes, witness commitment.
        check_block(&block).unwrap();
        assert!(block.check_merkle_root());
        let stored = store.read().unwrap().block_bytes(&want).unwrap().unwrap();
        assert_eq!(bitcoin::consensus::serialize(&block), stored);
    }
    headers.len()
}

// ---- a Bitcoin node on a TCP port, built from our chain code ----

/// Every envelope a TCP adapter received and sent, raw.
#[derive(Default)]
pub(crate) struct Transcript {
    pub(crate) inbound: Vec<Vec<u8>>,
    pub(crate) outbound: Vec<Vec<u8>>,
}

/// Joins a TCP connection to `mem` (one end of a memory pair whose other end runs our chain code): a
/// Bitcoin node on a TCP port. With `reveal = Some((recv, from))`, our outgoing `version` is rewritten to
/// carry those addresses, as an unmodified node's may.
pub(crate) fn tcp_adapter(
    tcp: TcpStream,
    mut mem: CircuitStream,
    reveal: Option<(SocketAddr, SocketAddr)>,
    log: Arc<Mutex<Transcript>>,
) -> JoinHandle<()> {
    let magic = regtest().magic;
    tokio::spawn(async move {
        let (mut rd, mut wr) = tcp.into_split();
        let mut reader = EnvelopeReader::new(magic);
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                    assert_eq!(reader.push(&buf[..n]), n);
                    while let Some(env) = reader.next().unwrap() {
                        let bytes = env.encode();
                        log.lock().unwrap().inbound.push(bytes.clone());
                        if mem.send(bytes).await.is_err() {
                            return;
                        }
                    }
                }
                m = mem.recv() => {
                    let Ok(mut bytes) = m else { return };
                    if let (Some((recv, from)), Ok(Some((Message::Version(mut v), _)))) =
                        (reveal, anomos_proto::btc::decode_message(&bytes, magic))
                    {
                        v.receiver = Address::new(&recv, ServiceFlags::NONE);
                        v.sender = Address::new(&from, v.services);
                        bytes = encode_message(magic, &Message::Version(v));
                    }
                    log.lock().unwrap().outbound.push(bytes.clone());
                    if wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// One connection U accepted: remote address, transcript, adapter task (ends with the connection).
pub(crate) type UpstreamConn = (SocketAddr, Arc<Mutex<Transcript>>, JoinHandle<()>);

/// The upstream node U: a `ChainService` on a TCP port of its own loopback address, telling each peer its
/// own address and the peer's (as Bitcoin Core does for routable peers, and more).
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    /// Remote address and transcript of every connection; the handle ends with the connection.
    pub(crate) conns: Arc<Mutex<Vec<UpstreamConn>>>,
}

pub(crate) async fn upstream_node(ip: &str, store: SharedStore) -> Upstream {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns: Arc<Mutex<Vec<UpstreamConn>>> = Arc::default();
    let service = ChainService::new(store);
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = listener.accept().await.unwrap();
            let (mine, theirs) = CircuitStream::memory_pair();
            service.accept(theirs);
            let log: Arc<Mutex<Transcript>> = Arc::default();
            let h = tcp_adapter(tcp, mine, Some((remote, addr)), log.clone());
            c.lock().unwrap().push((remote, log, h));
        }
    });
    Upstream { addr, conns }
}

/// `msgs` in the order the upstream bridge gives a Bitcoin node: what a client sent between its `version` and
/// its `verack` (other than BIP 155/339/330 negotiation) right after the `verack` (src/bridge/splice.rs).
pub(crate) fn handshake_order(msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let command = |m: &Vec<u8>| {
        let c = &m[4..16];
        String::from_utf8_lossy(c.split(|&b| b == 0).next().unwrap()).into_owned()
    };
    let (mut out, mut held, mut state) = (Vec::new(), Vec::new(), 0);
    for m in msgs {
        let c = command(m);
        match state {
            0 if c == "version" => state = 1,
            1 if c == "verack" => state = 2,
            1 if !["version", "sendaddrv2", "wtxidrelay", "sendtxrcncl"].contains(&c.as_str()) => {
                held.push(m.clone());
                continue;
            }
            _ => {}
        }
        out.push(m.clone());
        if state == 2 {
            out.append(&mut held);
        }
    }
    out.extend(held);
    out
}

/// Checks that `sent` arrived as `got`: byte for byte, except the address fields (and checksum) of
/// `version`, which must arrive cleared to `[::]:0`.
pub(crate) fn assert_relayed(sent: &[Vec<u8>], got: &[Vec<u8>], what: &str) {
    let sent = &handshake_order(sent);
    assert_eq!(sent.len(), got.len(), "{what}: message count");
    let magic = regtest().magic;
    for (i, (s, g)) in sent.iter().zip(got).enumerate() {
        assert_eq!(s.len(), g.len(), "{what}: message {i} length");
        if s[4..11] == *b"version" {
            let Ok(Some((Message::Version(v), _))) = anomos_proto::btc::decode_message(g, magic) else { panic!() };
            for a in [&v.receiver, &v.sender] {
                assert_eq!((a.address, a.port), ([0u16; 8], 0), "{what}: version {i} still carries {a:?}");
            }
            let differing: Vec<usize> = (0..s.len()).filter(|&j| s[j] != g[j]).collect();
            // Checksum (20..24), then IP and port of addr_recv and addr_from (payload offsets 28..46, 54..72).
            assert!(
                differing.iter().all(|&j| (20..24).contains(&j) || (52..70).contains(&j) || (78..96).contains(&j)),
                "{what}: version {i} changed at {differing:?}"
            );
        } else {
            assert!(s == g, "{what}: message {i} ('{}') changed", String::from_utf8_lossy(&s[4..16]));
        }
    }
}

/// True if `ip` (IPv4-mapped, as in Bitcoin addresses) appears anywhere in `msgs`.
pub(crate) fn mentions(msgs: &[Vec<u8>], ip: [u8; 4]) -> bool {
    let needle = [0xff, 0xff, ip[0], ip[1], ip[2], ip[3]];
    msgs.iter().any(|m| m.windows(6).any(|w| w == needle))
}
