//! The requesting side: bring a store up to a serving peer's best chain over circuits.
//!
//! 1. **Handshake** on every circuit: our anonymous `version` (see [`super::wire`]), their
//!    `version` answered with `verack`, until both `version` and `verack` are in.
//! 2. **Headers first**, on the first circuit: `getheaders` with our locator, repeated from the
//!    last received header while replies are full (2000). Every header is checked before it is
//!    stored: linkage to the previous header of the reply and to a known header
//!    ([`check_linkage`]), proof of work ([`check_header_pow`] via
//!    [`check_header`]), difficulty, timestamps (after the median of the previous 11, at most
//!    2 hours ahead of our clock) and version.
//! 3. **Blocks**: every best-chain block we lack goes, oldest first, into a shared
//!    [`WorkQueue`]; one downloader per circuit takes up to `window` hashes at a time, asks for
//!    them with `getdata`, and checks each arriving block ([`check_block_in_context`]: merkle
//!    root, coinbase, sizes, witness commitment, BIP 34) before storing it. A block's hash must
//!    be one the downloader asked for (so its header, already validated, is the one we stored);
//!    unsolicited blocks are ignored. If a downloader fails, its outstanding hashes go back to
//!    the queue for the others.
//!
//! [`sync`] uses one circuit; [`sync_with`] takes several (headers from the first, blocks from
//! all). On an invalid header or block the offending circuit's stream is dropped (which breaks
//! the circuit) and the error says what was wrong; [`ChainError::is_peer_fault`] tells the
//! caller to report it.
//!
//! [`check_linkage`]: anomos_proto::btc::check_linkage
//! [`check_header_pow`]: anomos_proto::btc::check_header_pow

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::btc::{
    check_linkage, GetHeadersMessage, Inventory, Message, NetParams, ServiceFlags, VersionMessage,
};
use bitcoin::block::Header;
use bitcoin::BlockHash;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::debug;

use super::mine::unix_now;
use super::store::no_stop;
use super::validate::{check_block_in_context, check_header};
use super::wire::{version_message, BtcPeer, MIN_PEER_VERSION, PROTOCOL_VERSION};
use super::{read, write, ChainError, SharedStore, MAX_HEADERS};
use crate::circuit::endpoint::CircuitStream;

/// Tuning of [`sync_with`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Blocks requested and not yet received, per circuit.
    pub window: usize,
    /// Time for the whole version/verack exchange.
    pub handshake_timeout: Duration,
    /// Longest wait for the next message while a request is outstanding.
    pub request_timeout: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions { window: 16, handshake_timeout: Duration::from_secs(60), request_timeout: Duration::from_secs(60) }
    }
}

/// Which part of the sync is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Fetching and validating headers.
    Headers,
    /// Fetching and validating blocks.
    Blocks,
}

/// Reported after each `headers` reply and each stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// What is running.
    pub phase: SyncPhase,
    /// Height of our best header.
    pub header_height: u32,
    /// Blocks stored so far in this sync.
    pub blocks_done: u64,
    /// Blocks this sync has to fetch (known once headers are done).
    pub blocks_total: u64,
    /// Bytes received so far, envelopes included.
    pub bytes: u64,
}

/// What a sync did.
#[derive(Debug)]
pub struct SyncReport {
    /// New headers stored.
    pub headers: u64,
    /// Blocks stored.
    pub blocks: u64,
    /// Bytes received over all circuits, envelopes included.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Our best tip afterwards.
    pub tip: BlockHash,
    /// Its height.
    pub height: u32,
    /// Circuits (by index in the list given) that failed while others finished the work; the
    /// caller breaks and reports them. Always empty for [`sync`].
    pub peer_errors: Vec<(usize, ChainError)>,
}

/// Syncs `store` from the peer at the other end of `stream`, with default options.
pub async fn sync(
    stream: CircuitStream,
    params: &NetParams,
    store: &SharedStore,
    progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    sync_with(vec![stream], params, store, &SyncOptions::default(), progress).await
}

/// Syncs `store` over several circuits to serving peers: headers from the first, blocks from
/// all of them in parallel.
///
/// Fails if the first circuit fails before the headers are done, or if blocks remain that no
/// circuit could deliver (the first circuit error is returned). Circuits that failed while
/// others completed the work are listed in [`SyncReport::peer_errors`].
pub async fn sync_with(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    mut progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    let started = Instant::now();
    {
        let s = read(store);
        if s.params().magic != params.magic || s.params().genesis_hash != params.genesis_hash {
            return Err(ChainError::Params(format!(
                "store is for {}, sync asked for {}",
                s.params().name,
                params.name
            )));
        }
    }
    let our_height = read(store).best_tip().1;
    let mut streams = streams.into_iter();
    let first = streams.next().ok_or_else(|| ChainError::Params("no circuits to sync over".into()))?;

    // The other circuits shake hands while the first one fetches headers.
    let others = Tasks(
        streams
            .map(|s| {
                let (magic, limit) = (params.magic, opts.handshake_timeout);
                tokio::spawn(async move {
                    let mut peer = BtcPeer::new(s, magic);
                    handshake(&mut peer, our_height, limit).await.map(|_| peer)
                })
            })
            .collect(),
    );

    let mut peer = BtcPeer::new(first, params.magic);
    handshake(&mut peer, our_height, opts.handshake_timeout).await?;
    let headers = sync_headers(&mut peer, params, store, opts, &mut progress).await?;
    let header_bytes = peer.bytes_in;

    let queue = Arc::new(WorkQueue::new(read(store).missing_blocks(1, usize::MAX)));
    let total = queue.total;
    let (events, mut rx) = mpsc::unbounded_channel();
    let ctx =
        Downloader { queue: queue.clone(), store: store.clone(), params: params.clone(), opts: opts.clone(), events };
    let mut tasks = Tasks(vec![tokio::spawn(ctx.clone().run(0, async move { Ok(peer) }))]);
    for (i, handle) in others.take().into_iter().enumerate() {
        let ready =
            async move { handle.await.map_err(|e| ChainError::Protocol(format!("handshake task failed: {e}")))? };
        tasks.0.push(tokio::spawn(ctx.clone().run(i + 1, ready)));
    }
    drop(ctx);

    let (mut blocks, mut bytes) = (0u64, header_bytes);
    while let Some(n) = rx.recv().await {
        blocks += 1;
        bytes += n;
        let header_height = read(store).best_tip().1;
        progress(SyncProgress {
            phase: SyncPhase::Blocks,
            header_height,
            blocks_done: blocks,
            blocks_total: total,
            bytes,
        });
    }

    let mut peer_errors = Vec::new();
    let mut bytes = 0;
    for (i, task) in tasks.take().into_iter().enumerate() {
        match task.await {
            Ok((received, Ok(()))) => bytes += received,
            Ok((received, Err(e))) => {
                bytes += received;
                peer_errors.push((i, e));
            }
            Err(e) => peer_errors.push((i, ChainError::Protocol(format!("downloader task failed: {e}")))),
        }
    }
    if !queue.finished() {
        let err = peer_errors.into_iter().next().map(|(_, e)| e);
        return Err(err.unwrap_or_else(|| ChainError::Protocol("blocks left undelivered".into())));
    }
    let (tip, height) = read(store).best_tip();
    Ok(SyncReport { headers, blocks, bytes, elapsed: started.elapsed(), tip, height, peer_errors })
}

/// Spawned tasks, aborted if the sync is dropped or returns before they are awaited.
struct Tasks<T>(Vec<JoinHandle<T>>);

impl<T> Tasks<T> {
    fn take(mut self) -> Vec<JoinHandle<T>> {
        std::mem::take(&mut self.0)
    }
}

impl<T> Drop for Tasks<T> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Sends our `version` and waits for the peer's `version` (answered with `verack`) and
/// `verack`. Returns the peer's `version`.
pub async fn handshake(peer: &mut BtcPeer, our_height: u32, limit: Duration) -> Result<VersionMessage, ChainError> {
    peer.send(&Message::Version(version_message(ServiceFlags::NONE, our_height))).await?;
    let deadline = Instant::now() + limit;
    let (mut theirs, mut verack): (Option<VersionMessage>, bool) = (None, false);
    loop {
        if let (Some(v), true) = (&theirs, verack) {
            return Ok(v.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv_timeout(left, "the handshake").await? {
            Message::Version(v) if theirs.is_none() => {
                if v.version < MIN_PEER_VERSION {
                    return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
                }
                peer.send(&Message::Verack).await?;
                theirs = Some(v);
            }
            Message::Verack => verack = true,
            Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
            other => debug!(command = other.command(), "ignored during handshake"),
        }
    }
}

/// Fetches headers until a reply is not full; returns how many were new.
async fn sync_headers(
    peer: &mut BtcPeer,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    progress: &mut impl FnMut(SyncProgress),
) -> Result<u64, ChainError> {
    let mut locator = read(store).locator();
    let mut new = 0;
    loop {
        let req = GetHeadersMessage { version: PROTOCOL_VERSION, locator_hashes: locator, stop_hash: no_stop() };
        peer.send(&Message::GetHeaders(req)).await?;
        let headers = loop {
            match peer.recv_timeout(opts.request_timeout, "headers").await? {
                Message::Headers(h) => break h,
                Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
                other => debug!(command = other.command(), "ignored while waiting for headers"),
            }
        };
        if headers.len() > MAX_HEADERS {
            return Err(ChainError::Protocol(format!("{} headers in one reply", headers.len())));
        }
        let Some(last) = headers.last().map(Header::block_hash) else { break };
        new += accept_headers(params, store, &headers)?;
        let header_height = read(store).best_tip().1;
        progress(SyncProgress {
            phase: SyncPhase::Headers,
            header_height,
            blocks_done: 0,
            blocks_total: 0,
            bytes: peer.bytes_in,
        });
        if headers.len() < MAX_HEADERS {
            break;
        }
        locator = read(store).locator_from(&last);
    }
    Ok(new)
}

/// Validates and stores one `headers` reply; returns how many headers were new.
fn accept_headers(params: &NetParams, store: &SharedStore, headers: &[Header]) -> Result<u64, ChainError> {
    let now = unix_now();
    let mut store = write(store);
    let mut new = 0;
    let mut prev: Option<&Header> = None;
    for header in headers {
        if let Some(p) = prev {
            check_linkage(p, header).map_err(|e| ChainError::invalid_header(header.block_hash(), e))?;
        }
        prev = Some(header);
        if store.entry(&header.block_hash()).is_some() {
            continue;
        }
        check_header(&store, params, header, now)?;
        store.insert_header(*header)?;
        new += 1;
    }
    Ok(new)
}

/// Block hashes to fetch, shared by the downloaders.
pub struct WorkQueue {
    state: Mutex<QueueState>,
    changed: Notify,
    /// Hashes the queue started with.
    pub total: u64,
}

struct QueueState {
    pending: VecDeque<BlockHash>,
    outstanding: usize,
}

impl WorkQueue {
    /// A queue of `hashes`, fetched in this order.
    pub fn new(hashes: Vec<BlockHash>) -> WorkQueue {
        let total = hashes.len() as u64;
        WorkQueue {
            state: Mutex::new(QueueState { pending: hashes.into(), outstanding: 0 }),
            changed: Notify::new(),
            total,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `n` hashes to fetch.
    pub fn take(&self, n: usize) -> Vec<BlockHash> {
        let mut st = self.lock();
        let k = n.min(st.pending.len());
        let out: Vec<_> = st.pending.drain(..k).collect();
        st.outstanding += out.len();
        out
    }

    /// One taken hash was fetched and stored.
    pub fn complete(&self) {
        let done = {
            let mut st = self.lock();
            st.outstanding = st.outstanding.saturating_sub(1);
            st.pending.is_empty() && st.outstanding == 0
        };
        if done {
            self.changed.notify_waiters();
        }
    }

    /// Taken hashes that were not fetched go back to the front, for others.
    pub fn give_back(&self, hashes: Vec<BlockHash>) {
        {
            let mut st = self.lock();
            st.outstanding = st.outstanding.saturating_sub(hashes.len());
            for h in hashes.into_iter().rev() {
                st.pending.push_front(h);
            }
        }
        self.changed.notify_waiters();
    }

    /// Nothing pending and nothing outstanding.
    pub fn finished(&self) -> bool {
        let st = self.lock();
        st.pending.is_empty() && st.outstanding == 0
    }

    /// Waits until everything is done.
    async fn until_finished(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.finished() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until there is work again or everything is done.
    async fn wait(&self) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = self.lock();
            if !st.pending.is_empty() || st.outstanding == 0 {
                return;
            }
        }
        notified.await;
    }
}

/// What every downloader shares.
#[derive(Clone)]
struct Downloader {
    queue: Arc<WorkQueue>,
    store: SharedStore,
    params: NetParams,
    opts: SyncOptions,
    /// Bytes of each stored block's message.
    events: mpsc::UnboundedSender<u64>,
}

impl Downloader {
    /// Runs one circuit's downloader once its peer is ready; returns the bytes it received and
    /// how it ended. The stream is dropped at the end (breaking the circuit on failure).
    async fn run(
        self,
        index: usize,
        ready: impl std::future::Future<Output = Result<BtcPeer, ChainError>>,
    ) -> (u64, Result<(), ChainError>) {
        // A circuit still shaking hands when the others have fetched everything is not needed.
        let ready = tokio::select! {
            r = ready => r,
            () = self.queue.until_finished() => return (0, Ok(())),
        };
        let mut peer = match ready {
            Ok(p) => p,
            Err(e) => return (0, Err(e)),
        };
        let mut in_flight = Vec::new();
        let result = self.download(&mut peer, &mut in_flight).await;
        if let Err(e) = &result {
            debug!(circuit = index, "block download failed: {e}");
            self.queue.give_back(in_flight);
        }
        (peer.bytes_in, result)
    }

    async fn download(&self, peer: &mut BtcPeer, in_flight: &mut Vec<BlockHash>) -> Result<(), ChainError> {
        loop {
            if in_flight.len() < self.opts.window {
                let more = self.queue.take(self.opts.window - in_flight.len());
                if !more.is_empty() {
                    in_flight.extend_from_slice(&more);
                    peer.send(&Message::GetData(more.into_iter().map(Inventory::WitnessBlock).collect())).await?;
                }
            }
            if in_flight.is_empty() {
                if self.queue.finished() {
                    return Ok(());
                }
                self.queue.wait().await;
                continue;
            }
            let before = peer.bytes_in;
            match peer.recv_timeout(self.opts.request_timeout, "blocks").await? {
                Message::Block(block) => {
                    let hash = block.block_hash();
                    let Some(pos) = in_flight.iter().position(|h| *h == hash) else {
                        debug!(%hash, "unsolicited block ignored");
                        continue;
                    };
                    let height = read(&self.store)
                        .height_of(&hash)
                        .ok_or_else(|| ChainError::Store(format!("requested block {hash} has no header")))?;
                    check_block_in_context(&block, &self.params, height)?;
                    write(&self.store).insert_block(&block)?;
                    in_flight.remove(pos);
                    self.queue.complete();
                    let _ = self.events.send(peer.bytes_in - before);
                }
                Message::NotFound(items) => {
                    let ours = items.iter().find_map(|i| match i {
                        Inventory::Block(h) | Inventory::WitnessBlock(h) if in_flight.contains(h) => Some(*h),
                        _ => None,
                    });
                    if let Some(h) = ours {
                        return Err(ChainError::NotFound(h));
                    }
                }
                Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
                other => debug!(command = other.command(), "ignored while downloading"),
            }
        }
    }
}
