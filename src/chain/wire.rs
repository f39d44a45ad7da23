//! One Bitcoin P2P conversation over one circuit.
//!
//! Every circuit message is exactly one Bitcoin envelope: magic of our network, command,
//! length, checksum, payload, and nothing else. [`BtcPeer`] frames and unframes messages,
//! counts bytes and applies timeouts; a message that is not exactly one valid envelope is a
//! [`ChainError::Malformed`] or [`ChainError::Protocol`] error, after which the caller drops the
//! stream (which breaks the circuit).
//!
//! [`version_message`] builds the `version` both sides send: it reveals no address (both
//! address fields are `[::]:0` with no service bits, as Bitcoin Core sends for unroutable
//! peers), the shared user agent [`USER_AGENT`], a random nonce and a timestamp rounded to the
//! minute (a precise clock is a fingerprint).

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use anomos_proto::btc::{Address, Envelope, Message, ServiceFlags, VersionMessage};

use super::ChainError;
use crate::circuit::CircuitStream;

/// The user agent every anomos peer sends.
pub const USER_AGENT: &str = "/anomos:0.1.0/";

/// The protocol version we speak (Bitcoin Core 0.21+: `sendheaders`, `feefilter`, ...).
pub const PROTOCOL_VERSION: u32 = 70016;

/// Oldest protocol version we talk to (`getheaders`/`headers` need 31800; we require the
/// `version` relay byte, i.e. 70001).
pub const MIN_PEER_VERSION: u32 = 70001;

/// The unspecified address `[::]:0` without services: what we say about both ends.
pub fn unspecified_address() -> Address {
    Address::new(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), ServiceFlags::NONE)
}

/// Our `version`: no addresses, the shared user agent, a random nonce; `relay` says whether we
/// want transaction announcements (a following requester does; nothing else).
pub fn version_message(services: ServiceFlags, start_height: u32, relay: bool) -> VersionMessage {
    let now = super::mine::unix_now();
    let timestamp = i64::try_from(now - now % 60).unwrap_or(0);
    let mut v = VersionMessage::new(
        services,
        timestamp,
        unspecified_address(),
        unspecified_address(),
        rand::random(),
        USER_AGENT.to_owned(),
        i32::try_from(start_height).unwrap_or(i32::MAX),
    );
    v.version = PROTOCOL_VERSION;
    v.relay = relay;
    v
}

/// Decodes one circuit message: exactly one envelope of the network with `magic`.
pub fn decode_circuit_message(bytes: &[u8], magic: [u8; 4]) -> Result<Message, ChainError> {
    match Envelope::decode(bytes, magic) {
        Err(e) => Err(ChainError::Malformed(e)),
        Ok(None) => {
            Err(ChainError::Protocol(format!("circuit message of {} bytes is a truncated envelope", bytes.len())))
        }
        Ok(Some((env, used))) if used == bytes.len() => env.message().map_err(ChainError::Malformed),
        Ok(Some((env, used))) => {
            Err(ChainError::Protocol(format!("{} bytes after the '{}' envelope", bytes.len() - used, env.command)))
        }
    }
}

/// A Bitcoin conversation over one circuit.
pub struct BtcPeer {
    stream: CircuitStream,
    magic: [u8; 4],
    /// Bytes received (whole envelopes).
    pub bytes_in: u64,
    /// Bytes sent (whole envelopes).
    pub bytes_out: u64,
}

impl BtcPeer {
    /// Speaks the network with `magic` over `stream`.
    pub fn new(stream: CircuitStream, magic: [u8; 4]) -> BtcPeer {
        BtcPeer { stream, magic, bytes_in: 0, bytes_out: 0 }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ChainError> {
        self.send_envelope(&msg.to_envelope(self.magic)).await
    }

    /// Sends one envelope (e.g. a stored block's raw bytes as a `block` payload).
    pub async fn send_envelope(&mut self, env: &Envelope) -> Result<(), ChainError> {
        // Only our own hand-built envelopes can fail here; that is not the peer's fault.
        let bytes = env.try_encode().map_err(|e| ChainError::Store(format!("cannot encode '{}': {e}", env.command)))?;
        self.bytes_out += bytes.len() as u64;
        self.stream.send(bytes).await?;
        Ok(())
    }

    /// Receives and decodes the next message.
    pub async fn recv(&mut self) -> Result<Message, ChainError> {
        let bytes = self.stream.recv().await?;
        self.bytes_in += bytes.len() as u64;
        decode_circuit_message(&bytes, self.magic)
    }

    /// [`recv`](Self::recv), failing with [`ChainError::Timeout`]`(what)` after `limit`.
    pub async fn recv_timeout(&mut self, limit: Duration, what: &'static str) -> Result<Message, ChainError> {
        tokio::time::timeout(limit, self.recv()).await.map_err(|_| ChainError::Timeout(what))?
    }

    /// The network magic.
    pub fn magic(&self) -> [u8; 4] {
        self.magic
    }

    /// Gives the stream back (e.g. to close it gracefully).
    pub fn into_stream(self) -> CircuitStream {
        self.stream
    }
}
