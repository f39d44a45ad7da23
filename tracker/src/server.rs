//! Startup, the accept loop, and one session per TCP connection (channel setup, authentication, framing).
//!
//! A connection either answers a key fetch (`"ANOMOSK1"`) and closes; or reads the 12-byte ClientHello header and
//! its RSA ciphertext, opens the channel, sends `Challenge`, requires a valid `Hello` (all within
//! [`HELLO_TIMEOUT`]) and replies `Welcome`; or resumes a session from its ticket (`"ANOMOSR1"`, no RSA,
//! module `tickets`). Then it answers requests one by one. A connection whose session has a ticket is closed after
//! `--conn-idle-timeout` (5 s) without a request — the session stays resumable — so the tracker's descriptors
//! follow the connections in use, not the peers; one without a ticket (a peer that never asks for one) after the
//! session idle timeout (2 × the longest announce interval handed out + 30 s). Anything malformed drops that connection only, with one warning naming the peer address
//! and the reason. Per source address, concurrent connections and the rate of ClientHellos (each an RSA
//! decryption) are limited (module `limits`).

use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anomos_net::{Net, Stream};
use anomos_proto::identity::{load_or_create_identity, Fingerprint, Identity, PublicKey};
use anomos_proto::probe_v2::ProbeAuth;
use anomos_proto::tracker::{
    encode_key_answer, encode_key_answer_v2, parse_hello_header, verify_hello, verify_hello_v2, ChannelV2, ErrorCode,
    FromTracker, HelloHeader, ToTracker, TrackerChannel, CLIENT_HELLO_HEADER, CLIENT_HELLO_V2_LEN, EPHEMERAL_LEN,
    KEY_FETCH_MAGIC, RESUME_HELLO_LEN, RESUME_MAGIC, RESUME_UNKNOWN,
};
use anomos_proto::ProtoError;
use rand::rngs::OsRng;
use rand::RngCore;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::TrackerArgs;
use crate::error::TrackerError;
use crate::limits::{Limits, BUSY};
use crate::metrics::{Refusal, RequestKind};
use crate::service::{error_reply, Service};
use crate::tickets::{TicketId, Tickets};

/// Default time allowed from connecting to a verified `Hello` (`--hello-timeout`).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to write one reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame a peer may send. Its messages are small (a Hello is about 1 KiB), so this is far below the
/// protocol's `MAX_FRAME`, which bounds replies carrying tracking codes.
const MAX_REQUEST_FRAME: usize = 16 * 1024;
/// How often the graph's changes are written to the state database.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How often silent peers are expired and old circuits forgotten.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// Sent once the tracker is listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The bound address (the real port when `--listen` had port 0).
    pub listen: SocketAddr,
    /// The tracker's key fingerprint, which peers pin.
    pub fingerprint: Fingerprint,
}

/// Runs the tracker until SIGINT or SIGTERM (then returns `Ok`; a second signal exits the process at once
/// with status 130). Prints `anomos-tracker ready listen=<addr> fingerprint=<hex>` on stdout once listening,
/// and sends the same facts on `ready`.
pub async fn run(args: TrackerArgs, ready: Option<oneshot::Sender<Ready>>) -> Result<(), TrackerError> {
    let signal = shutdown_signal();
    let stop = async {
        signal.await;
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("second signal: exiting at once");
            std::process::exit(130);
        });
    };
    serve(anomos_net::tcp(), args, ready, stop, Exit::Process).await
}

/// What follows the tracker's stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The process exits ([`run`]): memory is left to the exit, not freed first.
    Process,
    /// The process goes on (tests, a simulation): everything is freed.
    Return,
}

/// How long a stopping tracker waits for a state write still running before it closes the database.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Resolves on SIGINT or SIGTERM (never, if signals cannot be handled). The handlers are installed when this
/// is called (not when the future is first polled), so a signal arriving in between is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
        async move {
            match streams {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Like [`run`], but stops (returning `Ok`) when `shutdown` completes instead of on ctrl-c.
pub async fn run_until(
    args: TrackerArgs,
    ready: Option<oneshot::Sender<Ready>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TrackerError> {
    run_on(anomos_net::tcp(), args, ready, shutdown).await
}

/// [`run_until`] over the transport `net` (a simulated network in `tests/simulation.rs`): the tracker listens and
/// probes peers through it. The metrics endpoint, if any, stays on TCP.
pub async fn run_on(
    net: Net,
    args: TrackerArgs,
    ready: Option<oneshot::Sender<Ready>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TrackerError> {
    serve(net, args, ready, shutdown, Exit::Return).await
}

async fn serve(
    net: Net,
    args: TrackerArgs,
    ready: Option<oneshot::Sender<Ready>>,
    shutdown: impl Future<Output = ()>,
    exit: Exit,
) -> Result<(), TrackerError> {
    args.validate()?;
    let replicated = args.replicated();
    if let Some(idle) = args.idle_timeout.filter(|s| *s < 2 * u64::from(args.max_interval())) {
        warn!(
            idle_timeout = idle,
            longest_interval = args.max_interval(),
            "--idle-timeout is shorter than 2 × the longest interval handed out: at that size tickets expire \
             between announces and every announce is a full handshake"
        );
    }
    let max_sessions = crate::fds::connections_for(&args)?;
    let tickets = Arc::new(Tickets::new(args.sessions_limit(), args.idle()));
    let identity = Arc::new(load_key(&args).await?);
    let timeouts =
        Timeouts { hello: Duration::from_secs(args.hello_timeout), idle: args.idle(), conn_idle: args.conn_idle() };
    let limits = Limits::new(&args);
    let metrics_addr = args.metrics;
    let (neighbors, interval, listen_at) = (args.neighbors, args.interval, args.listen);
    let bind = |net: &Net| {
        let net = net.clone();
        async move { net.bind(listen_at).await.map_err(|e| TrackerError::io(format!("binding {listen_at}"), e)) }
    };
    let db = args.db_path();
    let (mut service, replica, listener) = if args.replicated() {
        // Replicas keep their state in etcd (crate::replica), not in tracker.redb, and register their address.
        let listener = bind(&net).await?;
        let listen = listener.local_addr().map_err(|e| TrackerError::io("reading the bound address", e))?;
        let (service, _, replica) = crate::replica::open(args, identity.fingerprint(), listen).await?;
        (service, Some(replica), listener)
    } else {
        // The state is loaded before the port is bound: peers that come back during the load (after a restart,
        // all of them within an interval) are refused at once and retry with jitter, instead of waiting in the
        // kernel's accept queue until it overflows and their connections stall for seconds (SPEC §3.10).
        let started = std::time::Instant::now(); // wall time, for the log only
        let (service, restored) = anomos_net::rt::spawn_blocking(move || Service::open(args))
            .await
            .map_err(|e| TrackerError::io("loading the state database", std::io::Error::other(e)))??;
        info!(
            path = %db.display(), peers = restored.peers, edges = restored.edges, dropped = restored.dropped,
            read_ms = restored.read.as_millis() as u64, rebuilt_ms = restored.rebuilt.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64, "state database opened"
        );
        (service, None, bind(&net).await?)
    };
    let listen = listener.local_addr().map_err(|e| TrackerError::io("reading the bound address", e))?;
    service.net = net;
    let service = Arc::new(service);
    // The static key of version-2 channels (one RSA signature now, one a day).
    let clock = service.net.clock();
    let statics = Arc::new(crate::static_key::StaticKeys::new(Arc::clone(&identity), clock));
    let kept = service.take_tickets();
    let kept_n = kept.len();
    for (t, key) in kept {
        let idle = Duration::from_secs(u64::from(t.idle_secs));
        tickets.restore(t.id, Arc::new(key), anomos_proto::crypto::Secret(t.secret), idle);
    }
    tickets.restored();
    if kept_n > 0 {
        info!(tickets = tickets.len(), "session tickets restored: peers resume without a full handshake");
    }
    let sessions = Arc::new(Semaphore::new(max_sessions));
    let mut tasks = JoinSet::new();
    if let Some(replica) = replica {
        replica.start(&service, &mut tasks);
    }
    let _metrics = match metrics_addr {
        Some(addr) => {
            let (svc, sess, tk) = (Arc::clone(&service), Arc::clone(&sessions), Arc::downgrade(&tickets));
            let gauges = crate::service::TrackerGauges {
                service: Arc::downgrade(&svc),
                open_sessions: Box::new(move || max_sessions - sess.available_permits()),
                tickets: Box::new(move || tk.upgrade().map_or(0, |t| t.len())),
            };
            let registry = Arc::new(svc.metrics.registry(gauges));
            let (bound, task) = crate::metrics::serve(addr, registry)
                .await
                .map_err(|e| TrackerError::io(format!("binding the metrics address {addr}"), e))?;
            Some((bound, AbortOnDrop(task)))
        }
        None => None,
    };
    let fingerprint = identity.fingerprint();
    {
        let mut out = std::io::stdout().lock();
        let line = writeln!(out, "anomos-tracker ready listen={listen} fingerprint={}", fingerprint.to_hex());
        line.and_then(|_| out.flush()).map_err(|e| TrackerError::io("writing the ready line", e))?;
    }
    info!(
        %listen, fingerprint = %fingerprint.to_hex(), neighbors, interval,
        "tracker listening"
    );
    if let Some(tx) = ready {
        let _ = tx.send(Ready { listen, fingerprint });
    }

    if let Some((bound, _)) = &_metrics {
        println!("anomos-tracker metrics listen={bound}");
        let _ = std::io::stdout().flush();
    }
    let ps = Arc::clone(&service);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(PERSIST_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match ps.persist().await {
                Ok(rows) if rows > 0 => debug!(rows, "state written"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "writing the state database failed (kept in memory, retried)"),
            }
        }
    });
    let hk = Arc::clone(&service);
    let hk_limits = Arc::clone(&limits);
    let hk_tickets = Arc::clone(&tickets);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            hk.housekeeping();
            hk_limits.prune();
            hk_tickets.prune();
        }
    });

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // In this order, so a simulation replays: a stop first, then reaping, then new connections.
            biased;
            () = &mut shutdown => {
                let stopping = std::time::Instant::now(); // wall time, for the log only
                let open = max_sessions - sessions.available_permits();
                let (peers, edges, remembered) = service.sizes();
                tasks.shutdown().await;
                let saved = service.persist().await;
                let state_ms = stopping.elapsed().as_millis() as u64;
                let kept = tickets.export();
                let (svc, n) = (Arc::clone(&service), kept.len());
                let written = anomos_net::rt::spawn_blocking(move || {
                    let r = svc.save_tickets(&kept);
                    (r, svc.close_store(CLOSE_WAIT))
                });
                match written.await {
                    Ok((kept, closed)) => {
                        match kept {
                            Ok(()) => debug!(tickets = n, "session tickets kept for the next start"),
                            Err(e) => warn!(error = %e, "keeping the session tickets failed: peers do a full handshake"),
                        }
                        if !closed {
                            warn!("a state write was still running: the state database closes when it ends");
                        }
                    }
                    Err(e) => warn!(error = %e, "keeping the session tickets failed"),
                }
                info!(sessions_closed = open, peers, edges, circuits_remembered = remembered, tickets = n, state_ms,
                    total_ms = stopping.elapsed().as_millis() as u64,
                    "shutdown: tracker stopped (peers and edges are in the state database)");
                if exit == Exit::Process && !replicated {
                    // Freeing the graph and the tickets takes most of a second at 100,000 peers, and the process
                    // exits next: that is left to a thread the exit ends (the database is closed already). Not
                    // for a replica, whose state holds its etcd client (dropped within the runtime).
                    let state = (service, tickets, limits);
                    let _ = std::thread::Builder::new().name("free".into()).spawn(move || drop(state));
                }
                return saved.map(drop);
            }
            Some(_) = tasks.join_next() => {}
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(c) => (c.stream, c.peer),
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&sessions).try_acquire_owned() else {
                    warn!(%addr, limit = max_sessions, "connection dropped: too many connections (--max-connections)");
                    service.metrics.refused.inc(Refusal::SessionLimit);
                    drop(stream);
                    continue;
                };
                let Some(slot) = limits.conn(addr.ip()) else {
                    warn!(%addr, limit = limits.per_ip_max, "connection dropped: too many sessions from this address");
                    service.metrics.refused.inc(Refusal::SessionLimitPerIp);
                    drop(stream);
                    continue;
                };
                let shared = Shared {
                    service: Arc::clone(&service),
                    identity: Arc::clone(&identity),
                    limits: Arc::clone(&limits),
                    tickets: Arc::clone(&tickets),
                    statics: Arc::clone(&statics),
                    timeouts,
                };
                tasks.spawn(async move {
                    let _permit = permit;
                    let _slot = slot;
                    match session(shared, stream, addr.ip()).await {
                        Ok(()) => debug!(%addr, "session closed"),
                        Err(e) => warn!(%addr, reason = %e, "connection dropped"),
                    }
                });
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Loads `<data-dir>/tracker.key`, creating the directory (0700) and the key (0600) if needed.
async fn load_key(args: &TrackerArgs) -> Result<Identity, TrackerError> {
    let dir = args.data_dir.clone();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(&dir).map_err(|e| TrackerError::io(format!("creating {}", dir.display()), e))?;
    let path = args.key_path();
    let bits = args.key_bits;
    let (identity, created) = anomos_net::rt::spawn_blocking(move || load_or_create_identity(&path, bits))
        .await
        .map_err(|e| TrackerError::io("loading the identity key", std::io::Error::other(e)))??;
    let path = args.key_path();
    if created {
        info!(path = %path.display(), bits = identity.public().bits(), "created a new tracker identity key");
    } else {
        info!(path = %path.display(), bits = identity.public().bits(), "loaded the tracker identity key");
    }
    Ok(identity)
}

/// Why a session ended early.
#[derive(Debug, Error)]
enum SessionError {
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Refused(&'static str),
    /// A resumption with a ticket the tracker does not hold (answered, then closed; the peer does a full
    /// handshake): routine after a restart or a long silence, so not worth a warning.
    #[error("unknown session ticket")]
    UnknownTicket,
}

/// The channel and the stream it runs over.
struct Conn {
    stream: Box<dyn Stream>,
    chan: TrackerChannel,
}

impl Conn {
    /// Closes after a refusal so that its reply reaches the peer: requests pipelined behind what was refused (SPEC
    /// §3.4 "Pipelining") are read and dropped, at most 64 KiB within 1 s, until the peer closes. Closing with them
    /// unread would reset the connection, and a reset can discard the reply before the peer reads it.
    async fn close_gently(mut self) {
        let _ = self.stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024_usize;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while left > 0 {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Reads one frame; `None` on a clean close between frames.
    async fn recv(&mut self) -> Result<Option<ToTracker>, SessionError> {
        let mut prefix = [0u8; 4];
        let n = self.stream.read(&mut prefix).await?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(rest) = prefix.get_mut(n..) {
            self.stream.read_exact(rest).await?;
        }
        let len = TrackerChannel::frame_len(prefix)?;
        if len > MAX_REQUEST_FRAME {
            return Err(ProtoError::TooLarge { what: "request frame", len, limit: MAX_REQUEST_FRAME }.into());
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).await?;
        Ok(Some(self.chan.open(&body)?))
    }

    async fn send(&mut self, msg: &FromTracker) -> Result<(), SessionError> {
        let frame = self.chan.seal(msg)?;
        tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&frame))
            .await
            .map_err(|_| SessionError::Timeout("the peer to read a reply"))??;
        Ok(())
    }
}

/// The session timers (from the configuration).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    hello: Duration,
    /// A session's lifetime unused (`--idle-timeout`): the idle timeout of a connection without a ticket.
    idle: Duration,
    /// The idle timeout of a connection whose session has a ticket (`--conn-idle-timeout`).
    conn_idle: Duration,
}

/// What every connection's task shares.
struct Shared {
    service: Arc<Service>,
    identity: Arc<Identity>,
    limits: Arc<Limits>,
    tickets: Arc<Tickets>,
    statics: Arc<crate::static_key::StaticKeys>,
    timeouts: Timeouts,
}

/// How a connection began.
enum Opened {
    /// A key fetch, answered.
    KeyFetch,
    /// A full handshake: a new session (`true`: on a version-2 channel, whose probes are version 2).
    Full(Conn, PublicKey, bool),
    /// A session resumed from its ticket (authenticated once its first frame opens).
    Resumed(Conn, Arc<PublicKey>, TicketId),
}

async fn session(sh: Shared, stream: Box<dyn Stream>, remote_ip: IpAddr) -> Result<(), SessionError> {
    let Shared { service, identity, limits, tickets, statics, timeouts } = sh;
    let hs = tokio::time::timeout(timeouts.hello, handshake(stream, &identity, &limits, &tickets, &statics, remote_ip))
        .await
        .map_err(|_| SessionError::Timeout("hello"))
        .and_then(|r| r);
    // A resumed session probes with version 1 (tickets do not record the channel version yet).
    let mut v2_probes = false;
    let (mut conn, key, mut ticket) = match hs {
        Ok(Opened::Full(conn, key, v2)) => {
            service.metrics.sessions.inc();
            v2_probes = v2;
            (conn, Arc::new(key), None)
        }
        Ok(Opened::Resumed(conn, key, id)) => {
            service.metrics.resumptions.inc();
            (conn, key, Some(id))
        }
        Ok(Opened::KeyFetch) => {
            service.metrics.key_fetches.inc();
            return Ok(()); // a key fetch, answered
        }
        Err(SessionError::UnknownTicket) => {
            service.metrics.refused.inc(Refusal::UnknownTicket);
            debug!(ip = %remote_ip, "resumption with an unknown ticket: the peer does a full handshake");
            return Ok(());
        }
        Err(e) => {
            service.metrics.refused.inc(match &e {
                SessionError::Refused(why) if why.starts_with("ClientHello rate") => Refusal::HelloRate,
                SessionError::Refused(BUSY) => Refusal::HandshakeBusy,
                _ => Refusal::Handshake,
            });
            return Err(e);
        }
    };
    let peer = key.fingerprint();
    debug!(peer = %peer.short(), resumed = ticket.is_some(), "session authenticated");
    loop {
        // A connection whose session can resume is closed soon after its last request: the descriptor is what a
        // tracker of 100,000 peers runs short of, and the peer reconnects without RSA.
        let idle = if ticket.is_some() { timeouts.conn_idle } else { timeouts.idle };
        let msg = match tokio::time::timeout(idle, conn.recv()).await {
            Err(_) if ticket.is_some() => return Ok(()),
            Err(_) => return Err(SessionError::Timeout("a request (idle)")),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(msg))) => msg,
            Ok(Err(e)) => return Err(e),
        };
        if let Some(id) = &ticket {
            tickets.touch(id);
        }
        let read_at = anomos_net::rt::now();
        let valid = msg.validate();
        let kind = match (&valid, &msg) {
            (Err(_), _) => RequestKind::Other,
            (Ok(()), ToTracker::Announce(_)) => RequestKind::Announce,
            (Ok(()), ToTracker::RequestCircuits(_)) => RequestKind::Circuits,
            (Ok(()), ToTracker::Report(_)) => RequestKind::Report,
            (Ok(()), _) => RequestKind::Other,
        };
        let reply = match valid {
            Err(e) => {
                service.metrics.refused.inc(Refusal::BadRequest);
                error_reply(ErrorCode::BadRequest, e.to_string())
            }
            Ok(()) => match msg {
                ToTracker::Hello { .. } => {
                    service.metrics.refused.inc(Refusal::BadRequest);
                    error_reply(ErrorCode::BadRequest, "already authenticated")
                }
                ToTracker::Announce(a) => {
                    // A version-2 session's probe key, derived only when an announce may need it.
                    let auth = match v2_probes {
                        true => ProbeAuth::derive(conn.chan.resumption_secret(), &peer).ok(),
                        false => None,
                    };
                    service.announce(&key, a, remote_ip, auth.as_ref()).await
                }
                ToTracker::RequestCircuits(r) => service.request_circuits(peer, r).await,
                ToTracker::Report(r) => service.report(peer, r),
                ToTracker::Resumable => {
                    // One ticket per session: asked again, the same one.
                    let secret = conn.chan.resumption_secret();
                    let id = *ticket.get_or_insert_with(|| tickets.issue(Arc::clone(&key), secret.clone()));
                    let lifetime_secs = u32::try_from(tickets.lifetime().as_secs()).unwrap_or(u32::MAX);
                    FromTracker::Ticket { ticket: id, lifetime_secs }
                }
            },
        };
        conn.send(&reply).await?;
        service.metrics.requests.observe(kind, anomos_net::rt::since(read_at));
    }
}

/// Channel setup and authentication: a full handshake (returns the connection and the peer's verified key), a
/// resumption (the connection, the session's key and its ticket), or a key fetch, answered (`"ANOMOSK1"`: a peer
/// that pins our fingerprint asks for the full public key).
async fn handshake(
    mut stream: Box<dyn Stream>,
    identity: &Arc<Identity>,
    limits: &Limits,
    tickets: &Tickets,
    statics: &crate::static_key::StaticKeys,
    remote_ip: IpAddr,
) -> Result<Opened, SessionError> {
    let mut header = [0u8; CLIENT_HELLO_HEADER];
    let magic_len = KEY_FETCH_MAGIC.len();
    let (magic, rest) = header.split_at_mut(magic_len);
    stream.read_exact(magic).await?;
    if *magic == KEY_FETCH_MAGIC {
        // With the highest channel version we speak after the key (version-1 peers stop reading before it); only
        // version 1 while no valid static key could be made.
        let answer = match statics.get() {
            Some(_) => encode_key_answer_v2(identity.public()),
            None => encode_key_answer(identity.public()),
        };
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer))
            .await
            .map_err(|_| SessionError::Timeout("the peer to read the key"))??;
        debug!("tracker key fetched");
        return Ok(Opened::KeyFetch);
    }
    if *magic == RESUME_MAGIC {
        return resume(stream, identity, tickets).await;
    }
    stream.read_exact(rest).await?;
    let version = parse_hello_header(&header)?;
    // Every version-1 ClientHello costs an RSA decryption: refuse an address over its rate before doing any.
    // (Version 2 costs three X25519 operations; the same rate bounds that too.)
    if !limits.hello(remote_ip) {
        return Err(SessionError::Refused("ClientHello rate exceeded (--hello-rate)"));
    }
    let ct_len = match version {
        HelloHeader::V1 { ct_len } => ct_len,
        HelloHeader::V2 => {
            let mut hello = [0u8; CLIENT_HELLO_V2_LEN];
            if let Some(h) = hello.get_mut(..CLIENT_HELLO_HEADER) {
                h.copy_from_slice(&header);
            }
            if let Some(tail) = hello.get_mut(CLIENT_HELLO_HEADER..) {
                stream.read_exact(tail).await?;
            }
            let Some(sk) = statics.get() else {
                return Err(SessionError::Refused("no static channel key: channel version 1 only"));
            };
            let (reply, ChannelV2 { channel, th }) =
                TrackerChannel::accept_v2(&mut OsRng, &sk, &identity.fingerprint(), &hello)?;
            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply))
                .await
                .map_err(|_| SessionError::Timeout("the peer to read our hello"))??;
            return authenticate(Conn { stream, chan: channel }, identity, Some(th)).await;
        }
    };
    let mut rest = vec![0u8; ct_len + EPHEMERAL_LEN];
    stream.read_exact(&mut rest).await?;
    // A join wave beyond what the CPU decrypts in time would queue connections until their Hello timeout, every
    // one costing a decryption for nothing: past HANDSHAKES_AT_ONCE decryptions in progress, close at once instead
    // (the peer retries with its backoff), so the work done is work that completes. The slot is taken only once
    // the whole hello is here: a client that sends the header and stalls holds none (it once held one until its
    // timeout, and a few such clients kept every newcomer out; found in review, session 10).
    let Ok(_slot) = limits.handshakes.try_acquire() else {
        return Err(SessionError::Refused(BUSY));
    };
    // RSA decryption takes a few milliseconds: keep it off the async workers.
    let id = Arc::clone(identity);
    let (reply, chan) = anomos_net::rt::spawn_blocking(move || TrackerChannel::accept(&mut OsRng, &id, &rest))
        .await
        .map_err(|_| SessionError::Refused("channel setup task failed"))??;
    drop(_slot);
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply))
        .await
        .map_err(|_| SessionError::Timeout("the peer to read our hello"))??;
    authenticate(Conn { stream, chan }, identity, None).await
}

/// The session's authentication on a new channel: `Challenge`, then the peer's `Hello` (version 2: bound to the
/// channel's transcript hash `th`).
async fn authenticate(mut conn: Conn, identity: &Identity, th: Option<[u8; 32]>) -> Result<Opened, SessionError> {
    let mut nonce = [0u8; 32];
    OsRng.fill_bytes(&mut nonce);
    conn.send(&FromTracker::Challenge { nonce }).await?;
    let Some(first) = conn.recv().await? else {
        return Err(SessionError::Refused("closed before hello"));
    };
    let verified = match &first {
        ToTracker::Hello { public_key, signature } => first.validate().and_then(|()| match &th {
            None => verify_hello(public_key, signature, &identity.fingerprint(), &nonce),
            Some(th) => verify_hello_v2(public_key, signature, &identity.fingerprint(), &nonce, th),
        }),
        _ => Err(ProtoError::Unexpected("request before hello")),
    };
    match verified {
        Ok(key) => {
            conn.send(&FromTracker::Welcome { peer_id: key.fingerprint() }).await?;
            // A version-2 session's probes are MACs under a key both ends derive from its resumption secret.
            Ok(Opened::Full(conn, key, th.is_some()))
        }
        Err(e) => {
            let _ = conn.send(&error_reply(ErrorCode::Unauthenticated, e.to_string())).await;
            conn.close_gently().await;
            Err(e.into())
        }
    }
}

/// A `ResumeHello` (SPEC §3.4): look the ticket up, answer `RESUME_ACCEPTED | e_T` and derive the connection's keys
/// from the session's resumption secret and a fresh X25519 exchange (two X25519 operations, no RSA; not rate-limited
/// like ClientHellos, which cost a decryption). Unknown tickets get `RESUME_UNKNOWN` and the connection closes.
async fn resume(mut stream: Box<dyn Stream>, identity: &Identity, tickets: &Tickets) -> Result<Opened, SessionError> {
    let mut hello = [0u8; RESUME_HELLO_LEN];
    let (magic, rest) = hello.split_at_mut(RESUME_MAGIC.len());
    magic.copy_from_slice(&RESUME_MAGIC);
    stream.read_exact(rest).await?;
    let (id, e_p) = TrackerChannel::resume_hello(&hello)?;
    let Some(session) = tickets.resume(&id) else {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&[RESUME_UNKNOWN])).await;
        return Err(SessionError::UnknownTicket);
    };
    let (answer, chan) =
        TrackerChannel::accept_resume(&mut OsRng, &identity.fingerprint(), &id, &session.secret, &e_p)?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer))
        .await
        .map_err(|_| SessionError::Timeout("the peer to read our resume answer"))??;
    Ok(Opened::Resumed(Conn { stream, chan }, session.key, id))
}
