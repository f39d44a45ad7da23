//! Startup, the accept loop, and one session per TCP connection (channel setup, authentication, framing).
//!
//! A session either answers a key fetch (`"ANOMOSK1"`) and closes, or reads the 12-byte ClientHello header and
//! its RSA ciphertext, opens the channel, sends `Challenge`, requires a valid `Hello` (all within
//! [`HELLO_TIMEOUT`]) and replies `Welcome`; then it answers requests one by one, closing after [`IDLE_TIMEOUT`]
//! without a request. Anything malformed drops that connection only, with one warning naming the peer address
//! and the reason.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::{load_or_create_identity, Fingerprint, Identity, PublicKey};
use anomos_proto::tracker::{
    encode_key_answer, verify_hello, ErrorCode, FromTracker, ToTracker, TrackerChannel, CLIENT_HELLO_HEADER,
    EPHEMERAL_LEN, KEY_FETCH_MAGIC,
};
use anomos_proto::ProtoError;
use rand::rngs::OsRng;
use rand::RngCore;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::TrackerArgs;
use crate::error::TrackerError;
use crate::service::{error_reply, Service};

/// Time allowed from connecting to a verified `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a session may sit without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to write one reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame a peer may send. Its messages are small (a Hello is about 1 KiB), so this is far below the
/// protocol's `MAX_FRAME`, which bounds replies carrying tracking codes.
const MAX_REQUEST_FRAME: usize = 16 * 1024;
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

/// Runs the tracker until ctrl-c (then returns `Ok`). Prints `anomos-tracker ready listen=<addr>
/// fingerprint=<hex>` on stdout once listening, and sends the same facts on `ready`.
pub async fn run(args: TrackerArgs, ready: Option<oneshot::Sender<Ready>>) -> Result<(), TrackerError> {
    run_until(args, ready, async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling available: run until killed.
            std::future::pending::<()>().await;
        }
    })
    .await
}

/// Like [`run`], but stops (returning `Ok`) when `shutdown` completes instead of on ctrl-c.
pub async fn run_until(
    args: TrackerArgs,
    ready: Option<oneshot::Sender<Ready>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TrackerError> {
    args.validate()?;
    let identity = Arc::new(load_key(&args).await?);
    let listener =
        TcpListener::bind(args.listen).await.map_err(|e| TrackerError::io(format!("binding {}", args.listen), e))?;
    let listen = listener.local_addr().map_err(|e| TrackerError::io("reading the bound address", e))?;
    let fingerprint = identity.fingerprint();
    {
        let mut out = std::io::stdout().lock();
        let line = writeln!(out, "anomos-tracker ready listen={listen} fingerprint={}", fingerprint.to_hex());
        line.and_then(|_| out.flush()).map_err(|e| TrackerError::io("writing the ready line", e))?;
    }
    info!(
        %listen, fingerprint = %fingerprint.to_hex(), neighbors = args.neighbors, interval = args.interval,
        "tracker listening"
    );
    if let Some(tx) = ready {
        let _ = tx.send(Ready { listen, fingerprint });
    }

    let max_sessions = args.max_sessions;
    let service = Arc::new(Service::new(args));
    let sessions = Arc::new(Semaphore::new(max_sessions));
    let mut tasks = JoinSet::new();
    let hk = Arc::clone(&service);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            hk.housekeeping();
        }
    });

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&sessions).try_acquire_owned() else {
                    warn!(%addr, limit = max_sessions, "connection dropped: too many sessions");
                    drop(stream);
                    continue;
                };
                let (service, identity) = (Arc::clone(&service), Arc::clone(&identity));
                tasks.spawn(async move {
                    let _permit = permit;
                    match session(service, identity, stream).await {
                        Ok(()) => debug!(%addr, "session closed"),
                        Err(e) => warn!(%addr, reason = %e, "connection dropped"),
                    }
                });
            }
            Some(_) = tasks.join_next() => {}
            () = &mut shutdown => {
                info!("tracker shutting down");
                tasks.shutdown().await;
                return Ok(());
            }
        }
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
    let (identity, created) = tokio::task::spawn_blocking(move || load_or_create_identity(&path, bits))
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
}

/// The channel and the stream it runs over.
struct Conn {
    stream: TcpStream,
    chan: TrackerChannel,
}

impl Conn {
    /// Reads one frame; `None` on a clean close between frames.
    async fn recv(&mut self) -> Result<Option<ToTracker>, SessionError> {
        let mut prefix = [0u8; 4];
        let n = self.stream.read(&mut prefix).await?;
        if n == 0 {
            return Ok(None);
        }
        self.stream.read_exact(&mut prefix[n..]).await?;
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

async fn session(service: Arc<Service>, identity: Arc<Identity>, stream: TcpStream) -> Result<(), SessionError> {
    let _ = stream.set_nodelay(true);
    let remote_ip = stream.peer_addr().map(|a| a.ip()).ok();
    let Some((mut conn, key)) = tokio::time::timeout(HELLO_TIMEOUT, handshake(stream, &identity))
        .await
        .map_err(|_| SessionError::Timeout("hello"))??
    else {
        return Ok(()); // a key fetch, answered
    };
    let peer = key.fingerprint();
    debug!(peer = %peer.short(), "session authenticated");
    loop {
        let msg = match tokio::time::timeout(IDLE_TIMEOUT, conn.recv()).await {
            Err(_) => return Err(SessionError::Timeout("a request (idle)")),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(msg))) => msg,
            Ok(Err(e)) => return Err(e),
        };
        let reply = match msg.validate() {
            Err(e) => error_reply(ErrorCode::BadRequest, e.to_string()),
            Ok(()) => match msg {
                ToTracker::Hello { .. } => error_reply(ErrorCode::BadRequest, "already authenticated"),
                ToTracker::Announce(a) => service.announce(&key, a, remote_ip).await,
                ToTracker::RequestCircuits(r) => service.request_circuits(peer, r).await,
                ToTracker::Report(r) => service.report(peer, r),
            },
        };
        conn.send(&reply).await?;
    }
}

/// Channel setup and authentication; returns the connection and the peer's verified key, or `None` after
/// answering a key fetch (`"ANOMOSK1"`: a peer that pins our fingerprint asks for the full public key).
async fn handshake(mut stream: TcpStream, identity: &Arc<Identity>) -> Result<Option<(Conn, PublicKey)>, SessionError> {
    let mut header = [0u8; CLIENT_HELLO_HEADER];
    let magic_len = KEY_FETCH_MAGIC.len();
    stream.read_exact(&mut header[..magic_len]).await?;
    if header[..magic_len] == KEY_FETCH_MAGIC {
        let answer = encode_key_answer(identity.public());
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer))
            .await
            .map_err(|_| SessionError::Timeout("the peer to read the key"))??;
        debug!("tracker key fetched");
        return Ok(None);
    }
    stream.read_exact(&mut header[magic_len..]).await?;
    let ct_len = TrackerChannel::hello_ct_len(&header)?;
    let mut rest = vec![0u8; ct_len + EPHEMERAL_LEN];
    stream.read_exact(&mut rest).await?;
    // RSA decryption takes a few milliseconds: keep it off the async workers.
    let id = Arc::clone(identity);
    let (reply, chan) = tokio::task::spawn_blocking(move || TrackerChannel::accept(&mut OsRng, &id, &rest))
        .await
        .map_err(|_| SessionError::Refused("channel setup task failed"))??;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply))
        .await
        .map_err(|_| SessionError::Timeout("the peer to read our hello"))??;
    let mut conn = Conn { stream, chan };

    let mut nonce = [0u8; 32];
    OsRng.fill_bytes(&mut nonce);
    conn.send(&FromTracker::Challenge { nonce }).await?;
    let Some(first) = conn.recv().await? else {
        return Err(SessionError::Refused("closed before hello"));
    };
    let verified = match &first {
        ToTracker::Hello { public_key, signature } => {
            first.validate().and_then(|()| verify_hello(public_key, signature, &identity.fingerprint(), &nonce))
        }
        _ => Err(ProtoError::Unexpected("request before hello")),
    };
    match verified {
        Ok(key) => {
            conn.send(&FromTracker::Welcome { peer_id: key.fingerprint() }).await?;
            Ok(Some((conn, key)))
        }
        Err(e) => {
            let _ = conn.send(&error_reply(ErrorCode::Unauthenticated, e.to_string())).await;
            Err(e.into())
        }
    }
}
