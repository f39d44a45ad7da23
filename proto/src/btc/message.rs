//! Typed P2P messages: the commands anomos looks into, everything else kept raw.
//!
//! Payloads are (de)serialized with `bitcoin::consensus`; a payload must be consumed
//! exactly ([`BtcError::TrailingBytes`] otherwise), so `decode_payload` followed by
//! `encode_payload` gives back the same bytes for every payload Bitcoin Core produces. The
//! one normalisation: a `version` relay byte other than 0/1 reads as true (as in Core) and
//! re-encodes as 1. A `version` without the relay byte (protocol < 70001) is rejected.
//! Commands not listed in [`MODELED_COMMANDS`] (`wtxidrelay`, `sendaddrv2`, `sendcmpct`,
//! `addrv2`, `cmpctblock`, ...) decode to [`Message::Unknown`] and are never an error.
//!
//! Memory: `addr`, `inv`/`getdata`/`notfound`, `getheaders`/`getblocks` and `headers`
//! check their item count against the bytes actually present before allocating; `block` and
//! `tx` rely on `bitcoin`'s capped pre-allocation, and every payload is at most
//! [`MAX_PAYLOAD`] bytes.

use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize_partial, serialize, Decodable, VarInt};
use bitcoin::p2p::message_blockdata::{GetBlocksMessage, GetHeadersMessage, Inventory};
use bitcoin::p2p::message_network::VersionMessage;
use bitcoin::p2p::Address;
use bitcoin::{Block, Transaction};

use super::envelope::{validate_command, Envelope, MAX_PAYLOAD};
use super::error::BtcError;

/// Commands with a typed [`Message`] variant. Any other command is [`Message::Unknown`].
pub const MODELED_COMMANDS: [&str; 18] = [
    "version",
    "verack",
    "ping",
    "pong",
    "getaddr",
    "addr",
    "inv",
    "getdata",
    "notfound",
    "getheaders",
    "headers",
    "getblocks",
    "block",
    "tx",
    "mempool",
    "sendheaders",
    "feefilter",
    "reject",
];

/// Wire size of one `addr` entry: time (4) + services (8) + IPv6 (16) + port (2).
const ADDR_ENTRY: usize = 30;
/// Wire size of one inventory vector: type (4) + hash (32).
const INV_ENTRY: usize = 36;
/// Wire size of one `headers` entry: header (80) + tx count (1, always 0).
const HEADERS_ENTRY: usize = Header::SIZE + 1;

/// The (deprecated, BIP 61) `reject` message.
///
/// Modeled on the wire rather than with `bitcoin`'s type so that any reject code and a
/// missing hash (rejects of non-`tx`/`block` messages carry none) round-trip exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Command of the rejected message.
    pub message: String,
    /// Reject code (0x01 malformed, 0x10 invalid, 0x11 obsolete, 0x12 duplicate,
    /// 0x40 nonstandard, 0x41 dust, 0x42 insufficient fee, 0x43 checkpoint).
    pub ccode: u8,
    /// Human-readable reason.
    pub reason: String,
    /// Hash of the rejected transaction or block, wire (little-endian) byte order.
    pub hash: Option<[u8; 32]>,
}

impl Reject {
    fn encode(&self) -> Vec<u8> {
        let mut out = serialize(&self.message);
        out.push(self.ccode);
        out.extend_from_slice(&serialize(&self.reason));
        if let Some(hash) = &self.hash {
            out.extend_from_slice(hash);
        }
        out
    }

    fn decode(payload: &[u8]) -> Result<Reject, BtcError> {
        let (message, rest) = decode_prefix::<String>("reject", payload)?;
        let (&ccode, rest) = rest.split_first().ok_or_else(|| decode_err("reject", "missing reject code"))?;
        let (reason, rest) = decode_prefix::<String>("reject", rest)?;
        let hash = match rest.split_first_chunk::<32>() {
            None if rest.is_empty() => None,
            None => return Err(decode_err("reject", "truncated hash")),
            Some((hash, [])) => Some(*hash),
            Some((_, extra)) => return Err(BtcError::TrailingBytes { command: "reject".into(), extra: extra.len() }),
        };
        Ok(Reject { message, ccode, reason, hash })
    }
}

/// A Bitcoin P2P message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `version`: the handshake opener.
    Version(VersionMessage),
    /// `verack`: handshake acknowledgement (empty payload).
    Verack,
    /// `ping` with its nonce.
    Ping(u64),
    /// `pong` echoing a ping nonce.
    Pong(u64),
    /// `getaddr` (empty payload).
    GetAddr,
    /// `addr`: (timestamp, address) pairs.
    Addr(Vec<(u32, Address)>),
    /// `inv`: announced inventory.
    Inv(Vec<Inventory>),
    /// `getdata`: requested inventory.
    GetData(Vec<Inventory>),
    /// `notfound`: inventory the peer does not have.
    NotFound(Vec<Inventory>),
    /// `getheaders`: block locator and stop hash.
    GetHeaders(GetHeadersMessage),
    /// `headers`: up to 2000 headers (each followed by a 0x00 tx count on the wire).
    Headers(Vec<Header>),
    /// `getblocks`: block locator and stop hash.
    GetBlocks(GetBlocksMessage),
    /// `block`: a full block.
    Block(Block),
    /// `tx`: a transaction.
    Tx(Transaction),
    /// `mempool` (empty payload).
    MemPool,
    /// `sendheaders` (BIP 130, empty payload).
    SendHeaders,
    /// `feefilter` (BIP 133): minimum fee rate in sat/kvB. Any `i64` is kept as sent; Bitcoin
    /// Core ignores values outside 0..=MAX_MONEY.
    FeeFilter(i64),
    /// `reject` (BIP 61, deprecated).
    Reject(Reject),
    /// Any command not in [`MODELED_COMMANDS`], payload kept verbatim.
    ///
    /// Building one with a modeled command is allowed but does not round-trip: decoding
    /// its encoding yields the typed variant (or an error).
    Unknown {
        /// The command (0..=12 printable ASCII characters).
        command: String,
        /// The raw payload.
        payload: Vec<u8>,
    },
}

impl Message {
    /// The command string this message is sent under.
    pub fn command(&self) -> &str {
        match self {
            Message::Version(_) => "version",
            Message::Verack => "verack",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::GetAddr => "getaddr",
            Message::Addr(_) => "addr",
            Message::Inv(_) => "inv",
            Message::GetData(_) => "getdata",
            Message::NotFound(_) => "notfound",
            Message::GetHeaders(_) => "getheaders",
            Message::Headers(_) => "headers",
            Message::GetBlocks(_) => "getblocks",
            Message::Block(_) => "block",
            Message::Tx(_) => "tx",
            Message::MemPool => "mempool",
            Message::SendHeaders => "sendheaders",
            Message::FeeFilter(_) => "feefilter",
            Message::Reject(_) => "reject",
            Message::Unknown { command, .. } => command,
        }
    }

    /// True if `command` has a typed variant.
    pub fn is_modeled(command: &str) -> bool {
        MODELED_COMMANDS.contains(&command)
    }

    /// The payload bytes (without envelope).
    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            Message::Version(v) => serialize(v),
            Message::Verack | Message::GetAddr | Message::MemPool | Message::SendHeaders => Vec::new(),
            Message::Ping(n) | Message::Pong(n) => n.to_le_bytes().to_vec(),
            Message::Addr(a) => serialize(a),
            Message::Inv(v) | Message::GetData(v) | Message::NotFound(v) => serialize(v),
            Message::GetHeaders(g) => serialize(g),
            Message::Headers(headers) => {
                let mut out = serialize(&VarInt(headers.len() as u64));
                out.reserve(headers.len() * HEADERS_ENTRY);
                for h in headers {
                    out.extend_from_slice(&serialize(h));
                    out.push(0);
                }
                out
            }
            Message::GetBlocks(g) => serialize(g),
            Message::Block(b) => serialize(b),
            Message::Tx(t) => serialize(t),
            Message::FeeFilter(f) => f.to_le_bytes().to_vec(),
            Message::Reject(r) => r.encode(),
            Message::Unknown { payload, .. } => payload.clone(),
        }
    }

    /// Decodes the payload of a `command` message.
    ///
    /// Errors: [`BtcError::BadCommand`] for a command that could not be on the wire,
    /// [`BtcError::PayloadTooLarge`] above [`MAX_PAYLOAD`], [`BtcError::Decode`] for a
    /// malformed or truncated payload, [`BtcError::TrailingBytes`] if bytes are left over.
    /// Unmodeled commands are never an error: they become [`Message::Unknown`].
    pub fn decode_payload(command: &str, payload: &[u8]) -> Result<Message, BtcError> {
        validate_command(command)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(BtcError::PayloadTooLarge(u32::try_from(payload.len()).unwrap_or(u32::MAX)));
        }
        let msg = match command {
            "version" => Message::Version(decode_exact(command, payload)?),
            "verack" => empty(command, payload, Message::Verack)?,
            "ping" => Message::Ping(u64::from_le_bytes(fixed(command, payload)?)),
            "pong" => Message::Pong(u64::from_le_bytes(fixed(command, payload)?)),
            "getaddr" => empty(command, payload, Message::GetAddr)?,
            "addr" => {
                check_count(command, payload, 0, ADDR_ENTRY, 0)?;
                Message::Addr(decode_exact(command, payload)?)
            }
            "inv" | "getdata" | "notfound" => {
                check_count(command, payload, 0, INV_ENTRY, 0)?;
                let inv: Vec<Inventory> = decode_exact(command, payload)?;
                match command {
                    "inv" => Message::Inv(inv),
                    "getdata" => Message::GetData(inv),
                    _ => Message::NotFound(inv),
                }
            }
            "getheaders" => {
                check_count(command, payload, 4, 32, 32)?;
                Message::GetHeaders(decode_exact(command, payload)?)
            }
            "getblocks" => {
                check_count(command, payload, 4, 32, 32)?;
                Message::GetBlocks(decode_exact(command, payload)?)
            }
            "headers" => Message::Headers(decode_headers(payload)?),
            "block" => Message::Block(decode_exact(command, payload)?),
            "tx" => Message::Tx(decode_exact(command, payload)?),
            "mempool" => empty(command, payload, Message::MemPool)?,
            "sendheaders" => empty(command, payload, Message::SendHeaders)?,
            "feefilter" => Message::FeeFilter(i64::from_le_bytes(fixed(command, payload)?)),
            "reject" => Message::Reject(Reject::decode(payload)?),
            _ => Message::Unknown { command: command.to_owned(), payload: payload.to_vec() },
        };
        Ok(msg)
    }

    /// Wraps the encoded payload in an envelope for the network with `magic`.
    ///
    /// The envelope is valid (see [`Envelope::validate`]) for every decoded message. A
    /// hand-built one can be invalid only by being an [`Message::Unknown`] with a bad command
    /// or by encoding to more than [`MAX_PAYLOAD`] bytes (beyond protocol limits, e.g. more
    /// than 49,000 headers; a consensus-valid block always fits).
    pub fn to_envelope(&self, magic: [u8; 4]) -> Envelope {
        Envelope { magic, command: self.command().to_owned(), payload: self.encode_payload() }
    }
}

impl Envelope {
    /// Decodes this envelope's payload according to its command.
    pub fn message(&self) -> Result<Message, BtcError> {
        Message::decode_payload(&self.command, &self.payload)
    }
}

/// Encodes `msg` as a complete envelope (header + payload) for the network with `magic`.
///
/// # Panics
///
/// Under the conditions of [`Envelope::encode`]: only for a hand-built
/// [`Message::Unknown`] with an invalid command or an over-limit payload. Use
/// `msg.to_envelope(magic).try_encode()` to get an error instead.
pub fn encode_message(magic: [u8; 4], msg: &Message) -> Vec<u8> {
    msg.to_envelope(magic).encode()
}

/// Decodes one envelope and its message from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((message, consumed)))` a whole message.
pub fn decode_message(buf: &[u8], magic: [u8; 4]) -> Result<Option<(Message, usize)>, BtcError> {
    match Envelope::decode(buf, magic)? {
        None => Ok(None),
        Some((env, used)) => Ok(Some((env.message()?, used))),
    }
}

fn decode_err(command: &str, what: impl std::fmt::Display) -> BtcError {
    BtcError::Decode(format!("{command}: {what}"))
}

/// Decodes a `T` from the start of `buf`, returning it and the rest.
fn decode_prefix<'a, T: Decodable>(command: &str, buf: &'a [u8]) -> Result<(T, &'a [u8]), BtcError> {
    let (value, used) = deserialize_partial::<T>(buf).map_err(|e| decode_err(command, e))?;
    Ok((value, buf.get(used..).unwrap_or_default()))
}

/// Decodes a `T` that must span all of `payload`.
fn decode_exact<T: Decodable>(command: &str, payload: &[u8]) -> Result<T, BtcError> {
    let (value, rest) = decode_prefix::<T>(command, payload)?;
    if !rest.is_empty() {
        return Err(BtcError::TrailingBytes { command: command.to_owned(), extra: rest.len() });
    }
    Ok(value)
}

/// A payload that must be exactly `N` bytes.
fn fixed<const N: usize>(command: &str, payload: &[u8]) -> Result<[u8; N], BtcError> {
    match payload.split_first_chunk::<N>() {
        None => Err(decode_err(command, format_args!("expected {N} bytes, got {}", payload.len()))),
        Some((value, [])) => Ok(*value),
        Some((_, extra)) => Err(BtcError::TrailingBytes { command: command.to_owned(), extra: extra.len() }),
    }
}

/// A payload that must be empty.
fn empty(command: &str, payload: &[u8], msg: Message) -> Result<Message, BtcError> {
    if payload.is_empty() {
        Ok(msg)
    } else {
        Err(BtcError::TrailingBytes { command: command.to_owned(), extra: payload.len() })
    }
}

/// Rejects a `[prefix][varint count][count * item][tail]` payload whose count cannot fit in
/// its length, before the decoder sizes any allocation by that count.
fn check_count(command: &str, payload: &[u8], prefix: usize, item: usize, tail: usize) -> Result<(), BtcError> {
    let Some(after_prefix) = payload.get(prefix..) else {
        return Err(decode_err(command, "truncated"));
    };
    let (VarInt(count), rest) = decode_prefix::<VarInt>(command, after_prefix)?;
    let room = rest.len().saturating_sub(tail) / item;
    if count > room as u64 {
        return Err(decode_err(command, format_args!("{count} entries cannot fit in {} bytes", rest.len())));
    }
    Ok(())
}

/// `headers`: varint count, then per header 80 bytes and a tx count that must be 0.
fn decode_headers(payload: &[u8]) -> Result<Vec<Header>, BtcError> {
    const CMD: &str = "headers";
    let (VarInt(count), rest) = decode_prefix::<VarInt>(CMD, payload)?;
    let available = rest.len() / HEADERS_ENTRY;
    let count = match usize::try_from(count) {
        Ok(c) if c <= available => c,
        _ => return Err(decode_err(CMD, format_args!("{count} headers cannot fit in {} bytes", rest.len()))),
    };
    let mut headers = Vec::with_capacity(count);
    let mut entries = rest.chunks_exact(HEADERS_ENTRY);
    for (i, entry) in entries.by_ref().take(count).enumerate() {
        let (raw, tx_count) = entry.split_at(Header::SIZE);
        let header = bitcoin::consensus::deserialize::<Header>(raw).map_err(|e| decode_err(CMD, e))?;
        if tx_count != [0] {
            return Err(decode_err(CMD, format_args!("header #{i} has a non-zero tx count")));
        }
        headers.push(header);
    }
    let extra = rest.len() - count * HEADERS_ENTRY;
    if extra != 0 {
        return Err(BtcError::TrailingBytes { command: CMD.to_owned(), extra });
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_modeled_command_is_listed_once() {
        let mut v = MODELED_COMMANDS.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), MODELED_COMMANDS.len());
    }

    #[test]
    fn empty_payload_commands() {
        for cmd in ["verack", "getaddr", "mempool", "sendheaders"] {
            let m = Message::decode_payload(cmd, &[]).unwrap();
            assert_eq!(m.command(), cmd);
            assert!(m.encode_payload().is_empty());
            assert!(matches!(Message::decode_payload(cmd, &[0]), Err(BtcError::TrailingBytes { extra: 1, .. })));
        }
    }

    #[test]
    fn huge_counts_rejected_cheaply() {
        // Count 2^64-1 with no entries.
        let payload = [0xff; 9];
        for cmd in ["addr", "inv", "getdata", "notfound", "headers"] {
            assert!(matches!(Message::decode_payload(cmd, &payload), Err(BtcError::Decode(_))));
        }
        let mut gh = vec![0x80, 0x11, 0x01, 0x00];
        gh.extend_from_slice(&[0xff; 9]);
        assert!(matches!(Message::decode_payload("getheaders", &gh), Err(BtcError::Decode(_))));
    }

    #[test]
    fn headers_nonzero_tx_count() {
        let h = bitcoin::constants::genesis_block(bitcoin::Network::Regtest).header;
        let mut p = Message::Headers(vec![h]).encode_payload();
        assert_eq!(p.len(), 1 + HEADERS_ENTRY);
        *p.last_mut().unwrap() = 1;
        assert!(matches!(Message::decode_payload("headers", &p), Err(BtcError::Decode(_))));
    }

    #[test]
    fn reject_shapes() {
        let r = Reject { message: "version".into(), ccode: 0x11, reason: "old".into(), hash: None };
        let p = Message::Reject(r.clone()).encode_payload();
        assert_eq!(Message::decode_payload("reject", &p).unwrap(), Message::Reject(r));
        let mut with_hash = p.clone();
        with_hash.extend_from_slice(&[9; 32]);
        assert!(matches!(
            Message::decode_payload("reject", &with_hash).unwrap(),
            Message::Reject(Reject { hash: Some(h), .. }) if h == [9; 32]
        ));
        let mut short = p.clone();
        short.extend_from_slice(&[9; 31]);
        assert!(matches!(Message::decode_payload("reject", &short), Err(BtcError::Decode(_))));
        let mut long = p;
        long.extend_from_slice(&[9; 33]);
        assert!(matches!(Message::decode_payload("reject", &long), Err(BtcError::TrailingBytes { extra: 1, .. })));
    }
}
