//! Joining one TCP connection to one circuit, envelope by envelope, both ways.

use std::fmt;
use std::time::Duration;

use anomos_proto::btc::envelope::checksum;
use anomos_proto::btc::{BtcError, Envelope, EnvelopeHeader, EnvelopeReader, HEADER_LEN};
use anomos_proto::cell::BreakReason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::scrub::scrub_version_payload;
use super::BridgeStats;
use crate::circuit::{CircuitSender, CircuitStream};
use crate::error::PeerError;

/// Bytes asked of the socket per read (the envelope reader bounds what is buffered in total).
const READ_CHUNK: usize = 64 * 1024;

/// Why a bridged connection ended.
#[derive(Debug)]
pub enum End {
    /// The TCP side closed its connection.
    TcpClosed,
    /// Reading from or writing to TCP failed.
    TcpError(std::io::Error),
    /// The TCP side sent bytes that are not a valid envelope of our network (bad magic, command, length or
    /// checksum).
    BadTcpData(BtcError),
    /// The circuit ended (the other end closed it, or it broke).
    CircuitClosed(BreakReason),
    /// The circuit failed otherwise.
    CircuitError(String),
    /// The circuit delivered a message that is not exactly one valid envelope of our network.
    BadCircuitData(String),
    /// Nothing but `ping`/`pong` crossed for the idle limit while every slot was taken (upstream side only).
    Idle(Duration),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::TcpClosed => write!(f, "tcp side closed"),
            End::TcpError(e) => write!(f, "tcp error: {e}"),
            End::BadTcpData(e) => write!(f, "tcp side sent an invalid envelope: {e}"),
            End::CircuitClosed(r) => write!(f, "circuit ended: {r}"),
            End::CircuitError(e) => write!(f, "circuit error: {e}"),
            End::BadCircuitData(e) => write!(f, "circuit delivered an invalid envelope: {e}"),
            End::Idle(d) => write!(f, "nothing but ping/pong for {d:?} while every slot was taken"),
        }
    }
}

fn circuit_end(e: PeerError) -> End {
    match e {
        PeerError::Broken(r) => End::CircuitClosed(r),
        other => End::CircuitError(other.to_string()),
    }
}

/// Checks that a circuit message is exactly one envelope of the network with `magic`: magic, command bytes,
/// length field (at most [`MAX_PAYLOAD`](anomos_proto::btc::MAX_PAYLOAD), equal to what follows the header)
/// and checksum. Does not copy the payload.
pub fn check_circuit_envelope(msg: &[u8], magic: [u8; 4]) -> Result<(), String> {
    let header = EnvelopeHeader::decode(msg).map_err(|e| e.to_string())?;
    if header.magic != magic {
        return Err(BtcError::BadMagic { expected: magic, got: header.magic }.to_string());
    }
    let payload = msg.get(HEADER_LEN..).unwrap_or_default();
    if payload.len() != header.length as usize {
        return Err(format!(
            "'{}' envelope of {} payload bytes claims {}",
            header.command.escape_default(),
            payload.len(),
            header.length
        ));
    }
    let computed = checksum(payload);
    if computed != header.checksum {
        return Err(BtcError::BadChecksum { command: header.command, header: header.checksum, computed }.to_string());
    }
    Ok(())
}

/// Which bridge a splice runs in (for logs and for how a bad circuit message is blamed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client bridge: the circuit's other end is a serving peer.
    Client,
    /// The upstream service: the circuit's other end is a requester.
    Upstream,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client bridge",
            Side::Upstream => "upstream",
        }
    }

    /// How to break a circuit that delivered garbage. A serving peer forwards only envelopes it validated
    /// itself, so garbage from it is misbehaviour (reported to the tracker); a requester's garbage is a
    /// protocol error.
    fn blame(self) -> BreakReason {
        match self {
            Side::Client => BreakReason::Misbehaving,
            Side::Upstream => BreakReason::Protocol,
        }
    }
}

/// Messages a requester sends between its `version` and its `verack`, held back from a Bitcoin node until the
/// `verack` has gone out. A requester pipelines `getheaders` behind its `version` (SPEC §9.1: one circuit round
/// trip less before the first block); Bitcoin Core ignores what arrives before the `verack` ("unsupported
/// message prior to verack"), so the upstream side puts the requester's messages in the order Core expects.
/// Messages that belong between `version` and `verack` (BIP 155 `sendaddrv2`, BIP 339 `wtxidrelay`, BIP 330
/// `sendtxrcncl`) pass at once; everything else is relayed as it comes, byte for byte.
#[derive(Default)]
pub(crate) struct PreVerack {
    version_seen: bool,
    done: bool,
    held: Vec<Vec<u8>>,
    bytes: usize,
}

/// Most bytes held back before a `verack` (a `version`'s worth of small requests; more is a protocol error).
const PRE_VERACK_MAX: usize = 64 * 1024;

impl PreVerack {
    /// What to write now for `msg` (a checked envelope), in order; `Err` when too much was held back.
    pub(crate) fn admit(&mut self, msg: Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
        if self.done {
            return Ok(vec![msg]);
        }
        let command = msg.get(4..16).unwrap_or_default();
        let command = command.split(|&b| b == 0).next().unwrap_or_default();
        if !self.version_seen {
            self.version_seen = command == b"version";
            return Ok(vec![msg]);
        }
        match command {
            b"verack" => {
                self.done = true;
                let mut out = vec![msg];
                out.append(&mut self.held);
                Ok(out)
            }
            b"version" | b"sendaddrv2" | b"wtxidrelay" | b"sendtxrcncl" => Ok(vec![msg]),
            _ => {
                self.bytes += msg.len();
                if self.bytes > PRE_VERACK_MAX {
                    return Err(format!("more than {PRE_VERACK_MAX} bytes of messages before 'verack'"));
                }
                self.held.push(msg);
                Ok(Vec::new())
            }
        }
    }
}

/// How a splice runs.
pub(crate) struct SpliceCtx<'a> {
    pub side: Side,
    pub magic: [u8; 4],
    pub scrub_version: bool,
    pub stats: &'a BridgeStats,
    /// For log lines: the TCP peer.
    pub label: String,
    /// End the splice (BREAK `timeout`) when nothing but `ping`/`pong` crossed, either way, for this long while
    /// every slot is taken.
    pub idle: Option<IdleLimit>,
}

/// When an idle splice gives up its slot (the upstream service's).
pub(crate) struct IdleLimit {
    /// How long nothing but `ping`/`pong` may cross before the slot is given up when another circuit needs it.
    pub after: Duration,
    /// The service's slots: the splice is ended only when none is free.
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Whether a checked envelope is a `ping` or `pong` (keep-alives: they do not make a bridged circuit active).
fn keepalive(msg: &[u8]) -> bool {
    let command = msg.get(4..16).unwrap_or_default();
    matches!(command.split(|&b| b == 0).next(), Some(b"ping" | b"pong"))
}

/// The wire bytes to send into the circuit for an envelope read from TCP: the bytes received (a decoded
/// envelope re-encodes exactly), with the `version` address fields cleared if asked.
pub(crate) fn outgoing(mut env: Envelope, ctx: &SpliceCtx<'_>) -> Result<Vec<u8>, End> {
    if ctx.scrub_version && env.command == "version" && scrub_version_payload(&mut env.payload) {
        BridgeStats::bump(&ctx.stats.versions_scrubbed, 1);
        debug!(side = ctx.side.name(), "cleared the address fields of a 'version'");
    }
    // Cannot fail for a decoded envelope; mapped rather than unwrapped all the same.
    env.try_encode().map_err(End::BadTcpData)
}

/// Sends one envelope read from TCP into the circuit (waiting for credit).
pub(crate) async fn forward(sender: &CircuitSender, env: Envelope, ctx: &SpliceCtx<'_>) -> Result<(), End> {
    let bytes = outgoing(env, ctx)?;
    let len = bytes.len() as u64;
    sender.send(bytes).await.map_err(circuit_end)?;
    BridgeStats::bump(&ctx.stats.messages_to_circuit, 1);
    BridgeStats::bump(&ctx.stats.bytes_to_circuit, len);
    Ok(())
}

/// Reads from TCP until the reader holds a complete envelope, or the connection ends. `Ok(None)` is a clean
/// EOF between envelopes.
pub(crate) async fn read_envelope<R: AsyncRead + Unpin>(
    rd: &mut R,
    reader: &mut EnvelopeReader,
    buf: &mut [u8],
) -> Result<Option<Envelope>, End> {
    loop {
        if let Some(env) = reader.next().map_err(End::BadTcpData)? {
            return Ok(Some(env));
        }
        // A full reader always holds a complete envelope or an error, so there is room here.
        let room = reader.remaining_capacity().min(buf.len());
        let Some(chunk) = buf.get_mut(..room).filter(|c| !c.is_empty()) else {
            return Err(End::TcpError(std::io::Error::other("envelope reader full")));
        };
        let n = rd.read(chunk).await.map_err(End::TcpError)?;
        if n == 0 {
            return if reader.buffered() == 0 {
                Ok(None)
            } else {
                Err(End::TcpError(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed in the middle of an envelope ({} bytes pending)", reader.buffered()),
                )))
            };
        }
        let took = reader.push(chunk.get(..n).unwrap_or_default());
        debug_assert_eq!(took, n, "read no more than the reader's free room");
    }
}

/// Relays between `tcp` and `stream` until either side ends, then closes the other; returns why it ended.
/// `reader` may already hold bytes read from `tcp` (the client bridge reads the first envelope before it
/// opens the circuit).
pub(crate) async fn splice(
    mut tcp: TcpStream,
    mut stream: CircuitStream,
    mut reader: EnvelopeReader,
    ctx: &SpliceCtx<'_>,
) -> End {
    let sender = stream.sender();
    let magic = ctx.magic;
    // When something other than ping/pong last crossed, either way (milliseconds after `base`).
    let base = tokio::time::Instant::now();
    let active_ms = std::sync::atomic::AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
        active_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    };
    let active = || base + Duration::from_millis(active_ms.load(std::sync::atomic::Ordering::Relaxed));
    let end = {
        let (mut rd, mut wr) = tcp.split();
        let to_circuit = async {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match read_envelope(&mut rd, &mut reader, &mut buf).await {
                    Ok(Some(env)) => {
                        let counts = !matches!(env.command.as_str(), "ping" | "pong");
                        if let Err(e) = forward(&sender, env, ctx).await {
                            return e;
                        }
                        if counts {
                            touch();
                        }
                    }
                    Ok(None) => return End::TcpClosed,
                    Err(e) => return e,
                }
            }
        };
        let to_tcp = async {
            // Only a Bitcoin node behind us needs the requester's messages in handshake order.
            let mut order = PreVerack { done: matches!(ctx.side, Side::Client), ..PreVerack::default() };
            loop {
                let received = match &ctx.idle {
                    None => stream.recv().await,
                    Some(idle) => loop {
                        // Idle for `after`: checked again every eighth of it (at most 10 s) until a slot is wanted.
                        let now = tokio::time::Instant::now();
                        let due = active() + idle.after;
                        let wake = if now < due { due } else { now + (idle.after / 8).min(Duration::from_secs(10)) };
                        match tokio::time::timeout_at(wake, stream.recv()).await {
                            Ok(r) => break r,
                            Err(_)
                                if tokio::time::Instant::now() >= active() + idle.after
                                    && idle.slots.available_permits() == 0 =>
                            {
                                return End::Idle(idle.after)
                            }
                            Err(_) => {}
                        }
                    },
                };
                let msg = match received {
                    Ok(m) => m,
                    Err(e) => return circuit_end(e),
                };
                if let Err(why) = check_circuit_envelope(&msg, magic) {
                    return End::BadCircuitData(why);
                }
                if !keepalive(&msg) {
                    touch();
                }
                let now = match order.admit(msg) {
                    Ok(now) => now,
                    Err(why) => return End::BadCircuitData(why),
                };
                for msg in now {
                    if let Err(e) = wr.write_all(&msg).await {
                        return End::TcpError(e);
                    }
                    BridgeStats::bump(&ctx.stats.messages_to_tcp, 1);
                    BridgeStats::bump(&ctx.stats.bytes_to_tcp, msg.len() as u64);
                }
            }
        };
        tokio::select! {
            e = to_circuit => e,
            e = to_tcp => e,
        }
    };
    match &end {
        End::TcpClosed => {
            debug!(side = ctx.side.name(), peer = %ctx.label, "tcp closed; closing the circuit");
            stream.close().await;
        }
        End::BadTcpData(e) => {
            BridgeStats::bump(&ctx.stats.bad_tcp_data, 1);
            warn!(side = ctx.side.name(), peer = %ctx.label, "closing connection: invalid envelope: {e}");
            drop(stream);
        }
        End::BadCircuitData(why) => {
            BridgeStats::bump(&ctx.stats.bad_circuit_data, 1);
            warn!(side = ctx.side.name(), peer = %ctx.label, "breaking circuit: invalid envelope from it: {why}");
            stream.abort(ctx.side.blame());
        }
        End::Idle(_) => {
            BridgeStats::bump(&ctx.stats.idle, 1);
            info!(side = ctx.side.name(), peer = %ctx.label, "breaking an idle bridged circuit (timeout): {end}");
            stream.abort(BreakReason::Timeout);
        }
        End::TcpError(_) | End::CircuitClosed(_) | End::CircuitError(_) => drop(stream),
    }
    // FIN after everything the circuit delivered was written; then the socket is closed on drop.
    let _ = tcp.shutdown().await;
    match &end {
        // The circuit broke for a reason the bridged node cannot be told (it only sees its connection close):
        // say it where the operator looks.
        End::CircuitClosed(r) if *r != BreakReason::Finished => {
            warn!(side = ctx.side.name(), peer = %ctx.label, reason = %r, "bridged connection ended: {end}")
        }
        _ => info!(side = ctx.side.name(), peer = %ctx.label, "bridged connection ended: {end}"),
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Vec<u8> {
        let mut m = vec![0xfa, 0xbf, 0xb5, 0xda];
        let mut c = [0u8; 12];
        c[..command.len()].copy_from_slice(command.as_bytes());
        m.extend_from_slice(&c);
        m.extend_from_slice(&[0, 0, 0, 0, 0x5d, 0xf6, 0xe0, 0xe2]);
        m
    }

    #[test]
    fn requests_pipelined_before_verack_reach_the_node_after_it_in_order() {
        let mut o = PreVerack::default();
        assert_eq!(o.admit(env("ping")).unwrap(), vec![env("ping")], "before a version nothing is held");
        assert_eq!(o.admit(env("version")).unwrap(), vec![env("version")]);
        assert_eq!(o.admit(env("wtxidrelay")).unwrap(), vec![env("wtxidrelay")], "BIP 339 belongs before verack");
        assert!(o.admit(env("getheaders")).unwrap().is_empty());
        assert!(o.admit(env("sendheaders")).unwrap().is_empty());
        assert_eq!(o.admit(env("verack")).unwrap(), vec![env("verack"), env("getheaders"), env("sendheaders")]);
        assert_eq!(o.admit(env("getdata")).unwrap(), vec![env("getdata")]);
    }

    #[test]
    fn a_flood_before_verack_is_refused() {
        let mut o = PreVerack::default();
        o.admit(env("version")).unwrap();
        let big = vec![0u8; 40 * 1024];
        assert!(o.admit(big.clone()).unwrap().is_empty());
        assert!(o.admit(big).is_err());
    }
}
