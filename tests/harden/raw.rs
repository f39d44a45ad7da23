//! A raw peer: the protocol from `anomos-proto`, driven by the test (announces, completes link handshakes,
//! then sends whatever the test wants).

use super::*;

// ---------------------------------------------------------------------------------------------------------
// A raw peer: the protocol from anomos-proto, driven by the test
// ---------------------------------------------------------------------------------------------------------

/// One neighbor as the tracker described it.
#[derive(Clone)]
pub struct Nb {
    pub key: PublicKey,
    pub nid: NeighborId,
    pub addr: SocketAddr,
}

type Table = Arc<Mutex<HashMap<Fingerprint, Nb>>>;

/// A peer of the overlay made of protocol pieces: it answers probes, announces, and completes link
/// handshakes; everything after that is up to the test.
pub struct RawPeer {
    pub id: Arc<Identity>,
    pub addr: SocketAddr,
    tracker: SocketAddr,
    tracker_key: PublicKey,
    table: Table,
    incoming: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<RawLink>>,
}

impl RawPeer {
    /// A new identity listening on a free loopback port (not yet announced).
    pub async fn start(tracker: SocketAddr, tracker_fp: &Fingerprint) -> Arc<RawPeer> {
        Self::start_below(tracker, tracker_fp, &[]).await
    }

    /// Like [`start`](Self::start), with a fingerprint smaller than all of `others`: we dial them (SPEC §5.2),
    /// they never dial us, so the only links between us are the ones the test makes.
    pub async fn start_below(tracker: SocketAddr, tracker_fp: &Fingerprint, others: &[Fingerprint]) -> Arc<RawPeer> {
        let min = others.iter().min().copied();
        // Peers started after `Net::preset_high_key` leave at least a quarter of the space below them.
        const TRIES: usize = 200;
        let id = tokio::task::spawn_blocking(move || {
            (0..TRIES)
                .map(|_| Identity::generate(&mut rand::rngs::OsRng, 2048).unwrap())
                .find(|id| min.is_none_or(|m| id.fingerprint() < m))
        })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no fingerprint below {min:?} in {TRIES} keys: preset the peers' keys high"));
        let id = Arc::new(id);
        let tracker_key = anomos::tracker_client::fetch_tracker_key(tracker, tracker_fp).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table: Table = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (id2, table2) = (id.clone(), table.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                let (id, table, tx) = (id2.clone(), table2.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Some(link)) = raw_accept(s, &id, &table).await {
                        let _ = tx.send(link);
                    }
                });
            }
        });
        Arc::new(RawPeer { id, addr, tracker, tracker_key, table, incoming: tokio::sync::Mutex::new(rx) })
    }

    /// Our fingerprint.
    pub fn fp(&self) -> Fingerprint {
        self.id.fingerprint()
    }

    /// Announces (the tracker probes us) and takes the reply as our neighbor table.
    pub async fn announce(&self) -> Vec<NeighborInfo> {
        let mut s =
            anomos::tracker_client::TrackerSession::connect(self.tracker, &self.tracker_key, &self.id).await.unwrap();
        let reply = s
            .request(&ToTracker::Announce(Announce { listen: self.addr, chains: Vec::new(), family: Vec::new() }))
            .await
            .unwrap();
        let FromTracker::Announced(a) = reply else { panic!("announce: {reply:?}") };
        let mut t = self.table.lock().unwrap();
        t.clear();
        for n in &a.neighbors {
            let key = PublicKey::from_der(&n.public_key).unwrap();
            t.insert(key.fingerprint(), Nb { key, nid: n.id, addr: n.addr });
        }
        a.neighbors
    }

    /// Keeps announcing every `every` (so the tracker keeps us and our edges).
    pub fn keep_announcing(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let m = me.clone();
                // A failed announce (tracker busy) is retried next time.
                let _ = tokio::spawn(async move { m.announce().await }).await;
            }
        })
    }

    /// Announces until `fp` is our neighbor (or panics after 30 s).
    pub async fn wait_neighbor(&self, fp: &Fingerprint) -> Nb {
        for _ in 0..60 {
            self.announce().await;
            if let Some(n) = self.neighbor(fp) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{} never became our neighbor", fp.short())
    }

    /// A neighbor from the last announce.
    pub fn neighbor(&self, fp: &Fingerprint) -> Option<Nb> {
        self.table.lock().unwrap().get(fp).cloned()
    }

    /// A link to neighbor `fp`: dialed if our fingerprint is the smaller one, else accepted when it dials us.
    pub async fn link(&self, fp: &Fingerprint) -> RawLink {
        let n = self.wait_neighbor(fp).await;
        if self.fp() < *fp {
            for _ in 0..40 {
                match self.dial(n.addr, n.key.clone(), n.nid).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
            panic!("could not link to {}", fp.short());
        }
        let mut rx = self.incoming.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(l)) if l.peer == *fp => return l,
                Ok(Some(_)) => continue,
                _ => panic!("{} never dialed us", fp.short()),
            }
        }
    }

    /// Dials `addr` for a link over edge `nid` to the key `key` (any nid: a wrong one fails key confirmation).
    pub async fn dial(&self, addr: SocketAddr, key: PublicKey, nid: NeighborId) -> Result<RawLink, String> {
        self.dial_recording(addr, key, nid).await.map(|(l, _, _)| l)
    }

    /// [`dial`](Self::dial), also returning the HELLO and AUTH we sent (to replay them).
    pub async fn dial_recording(
        &self,
        addr: SocketAddr,
        key: PublicKey,
        nid: NeighborId,
    ) -> Result<(RawLink, Vec<u8>, Vec<u8>), String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.set_nodelay(true).unwrap();
        let peer = key.fingerprint();
        let (d, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
        write(&mut s, &hello).await?;
        let mut reply = [0u8; HELLO_LEN];
        read(&mut s, &mut reply).await?;
        let id = self.id.clone();
        let (d, auth) = tokio::task::spawn_blocking(move || d.on_reply(&reply, &id, &mut rand::rngs::OsRng))
            .await
            .unwrap()
            .map_err(|e| e.to_string())?;
        write(&mut s, &auth).await?;
        let msg = read_auth(&mut s).await?;
        let cipher = d.on_auth_reply(&msg).map_err(|e| e.to_string())?;
        Ok((RawLink::up(s, cipher, peer).await?, hello.to_vec(), auth))
    }

    /// Starts a handshake by hand: connects, sends HELLO, reads REPLY; returns the stream and what is needed
    /// to build AUTH.
    pub async fn hello(
        &self,
        addr: SocketAddr,
        key: PublicKey,
        nid: NeighborId,
    ) -> (tokio::net::TcpStream, Dialer, [u8; HELLO_LEN]) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (d, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
        write(&mut s, &hello).await.unwrap();
        let mut reply = [0u8; HELLO_LEN];
        read(&mut s, &mut reply).await.unwrap();
        (s, d, reply)
    }
}

async fn write(s: &mut tokio::net::TcpStream, b: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    s.write_all(b).await.map_err(|e| e.to_string())
}

async fn read(s: &mut tokio::net::TcpStream, b: &mut [u8]) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(b))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn read_auth(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, String> {
    let mut p = [0u8; 2];
    read(s, &mut p).await?;
    let len = plink::auth_frame_len(p).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; 2 + len];
    msg[..2].copy_from_slice(&p);
    read(s, &mut msg[2..]).await?;
    Ok(msg)
}

async fn raw_accept(
    mut s: tokio::net::TcpStream,
    id: &Arc<Identity>,
    table: &Table,
) -> Result<Option<RawLink>, String> {
    let mut magic = [0u8; 8];
    read(&mut s, &mut magic).await?;
    if magic == plink::PROBE_MAGIC {
        let mut body = [0u8; 34];
        read(&mut s, &mut body).await?;
        let nonce = plink::decode_probe_body(&body).map_err(|e| e.to_string())?;
        let answer = plink::answer_probe(id, &nonce, &mut rand::rngs::OsRng);
        write(&mut s, &answer).await?;
        return Ok(None);
    }
    if magic != plink::LINK_MAGIC {
        return Ok(None);
    }
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&magic);
    read(&mut s, &mut hello[8..]).await?;
    let (acc, reply) = Acceptor::start(&mut rand::rngs::OsRng, &hello).map_err(|e| e.to_string())?;
    write(&mut s, &reply).await?;
    let auth = read_auth(&mut s).await?;
    let (id, table) = (id.clone(), table.clone());
    let out = tokio::task::spawn_blocking(move || {
        acc.on_auth(
            &auth,
            &id,
            &mut rand::rngs::OsRng,
            |fp| table.lock().unwrap().get(fp).map(|n| (n.key.clone(), n.nid)),
            |_| false,
        )
    })
    .await
    .unwrap()
    .map_err(|e| e.to_string())?;
    write(&mut s, &out.reply).await?;
    let cipher = out.result.map_err(|e| e.to_string())?;
    let peer = cipher.peer;
    RawLink::up(s, cipher, peer).await.map(Some)
}

/// An established link, driven cell by cell by the test.
pub struct RawLink {
    pub stream: tokio::net::TcpStream,
    sealer: CellSealer,
    opener: CellOpener,
    pub dialer: bool,
    pub nid: NeighborId,
    pub peer: Fingerprint,
    next_id: u32,
    /// The window the neighbor announced in its first cell.
    pub peer_window: u16,
}

impl RawLink {
    async fn up(s: tokio::net::TcpStream, cipher: LinkCipher, peer: Fingerprint) -> Result<RawLink, String> {
        let (dialer, nid) = (cipher.dialer, cipher.nid);
        let (sealer, opener) = cipher.split();
        let mut l = RawLink { stream: s, sealer, opener, dialer, nid, peer, next_id: 1, peer_window: 0 };
        l.send(&Cell::link_params(128)).await?;
        let first = l.recv(Duration::from_secs(10)).await.ok_or("no key-confirmation cell")?;
        l.peer_window = first.link_params_window().map_err(|e| e.to_string())?;
        Ok(l)
    }

    /// Seals a cell (advancing our counter) and returns the bytes to write.
    pub fn seal(&mut self, cell: &Cell) -> Vec<u8> {
        let mut buf = vec![0u8; SEALED_CELL_LEN];
        let plain: &mut [u8; CELL_LEN] = (&mut buf[..CELL_LEN]).try_into().unwrap();
        cell.encode_into(plain);
        self.sealer.seal_in_place(&mut buf).unwrap();
        buf
    }

    /// Sends one cell.
    pub async fn send(&mut self, cell: &Cell) -> Result<(), String> {
        let b = self.seal(cell);
        self.send_raw(&b).await
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, b: &[u8]) -> Result<(), String> {
        write(&mut self.stream, b).await
    }

    /// The next cell other than PADDING, or `None` on close, error or timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Cell> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut buf = vec![0u8; SEALED_CELL_LEN];
            tokio::time::timeout_at(deadline, self.stream.read_exact(&mut buf)).await.ok()?.ok()?;
            self.opener.open_in_place(&mut buf).ok()?;
            let cell = Cell::decode(&buf[..CELL_LEN]).ok()?;
            if cell.command != anomos_proto::cell::Command::Padding || cell.link_params_window().is_ok() {
                return Some(cell);
            }
        }
    }

    /// The next cell on circuit `id` (skipping others and SENDMEs unless `sendme`).
    pub async fn recv_on(&mut self, id: CircId, timeout: Duration) -> Option<Cell> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let c = self.recv(left).await?;
            if c.circ_id == id && c.command != anomos_proto::cell::Command::Sendme {
                return Some(c);
            }
        }
    }

    /// Whether the other side closes the connection within `timeout` (everything read meanwhile is dropped).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// A fresh circuit id from our half.
    pub fn alloc_id(&mut self) -> CircId {
        let n = self.next_id;
        self.next_id += 1;
        if self.dialer {
            n | DIALER_CIRC_BIT
        } else {
            n
        }
    }
}
