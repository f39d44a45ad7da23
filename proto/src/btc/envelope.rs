//! The 24-byte Bitcoin P2P envelope ("v1 transport") and a bounded streaming reader.
//!
//! ```text
//! offset  size  field
//! 0       4     magic           network identifier
//! 4       12    command         printable ASCII, NUL-padded on the right
//! 16      4     length          payload length, u32 little-endian, at most MAX_PAYLOAD
//! 20      4     checksum        first 4 bytes of SHA-256d(payload)
//! 24      len   payload
//! ```
//!
//! Decoding checks magic, command bytes and the length field before it allocates anything,
//! so a hostile length costs nothing; the checksum is verified before a payload is returned.

use bitcoin::hashes::{sha256d, Hash};

use super::error::BtcError;

/// Length of the envelope header.
pub const HEADER_LEN: usize = 24;

/// Largest payload accepted or produced: Bitcoin Core's `MAX_PROTOCOL_MESSAGE_LENGTH`.
pub const MAX_PAYLOAD: usize = 4_000_000;

/// Width of the command field.
pub const COMMAND_LEN: usize = 12;

/// First 4 bytes of SHA-256d of `payload`: the envelope checksum.
pub fn checksum(payload: &[u8]) -> [u8; 4] {
    let h = sha256d::Hash::hash(payload).to_byte_array();
    [h[0], h[1], h[2], h[3]]
}

/// Checks that `command` can be put on the wire: at most 12 bytes, all printable ASCII
/// (0x20..=0x7e). The empty command is allowed (12 NUL bytes), as in Bitcoin Core.
pub fn validate_command(command: &str) -> Result<(), BtcError> {
    let b = command.as_bytes();
    if b.len() > COMMAND_LEN || !b.iter().all(|c| (0x20..=0x7e).contains(c)) {
        return Err(BtcError::BadCommand(b.escape_ascii().to_string()));
    }
    Ok(())
}

/// The 12-byte wire form of a command (validated by [`validate_command`]).
pub fn encode_command(command: &str) -> Result<[u8; COMMAND_LEN], BtcError> {
    validate_command(command)?;
    let mut raw = [0u8; COMMAND_LEN];
    for (dst, src) in raw.iter_mut().zip(command.as_bytes()) {
        *dst = *src;
    }
    Ok(raw)
}

/// Parses a 12-byte command field: printable ASCII, then only NUL bytes (Bitcoin Core's
/// `IsMessageTypeValid`).
pub fn decode_command(raw: &[u8; COMMAND_LEN]) -> Result<String, BtcError> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(COMMAND_LEN);
    let (text, padding) = raw.split_at(end);
    if !text.iter().all(|c| (0x20..=0x7e).contains(c)) || padding.iter().any(|&c| c != 0) {
        return Err(BtcError::BadCommand(raw.escape_ascii().to_string()));
    }
    // All bytes are ASCII, so this never fails; map instead of unwrapping anyway.
    String::from_utf8(text.to_vec()).map_err(|_| BtcError::BadCommand(raw.escape_ascii().to_string()))
}

/// A decoded envelope header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Network magic.
    pub magic: [u8; 4],
    /// Command, without the NUL padding.
    pub command: String,
    /// Payload length (at most [`MAX_PAYLOAD`] once decoded).
    pub length: u32,
    /// Claimed checksum of the payload.
    pub checksum: [u8; 4],
}

impl EnvelopeHeader {
    /// Decodes the header at the start of `buf` (extra bytes are ignored).
    ///
    /// Errors: [`BtcError::Truncated`] if `buf` is shorter than [`HEADER_LEN`],
    /// [`BtcError::PayloadTooLarge`] if the length field exceeds [`MAX_PAYLOAD`] (checked
    /// before anything is allocated), [`BtcError::BadCommand`] for bad command bytes.
    /// The magic is not checked here; [`Envelope::decode`] does that.
    pub fn decode(buf: &[u8]) -> Result<EnvelopeHeader, BtcError> {
        let truncated = BtcError::Truncated { need: HEADER_LEN, have: buf.len() };
        let (magic, rest) = buf.split_first_chunk::<4>().ok_or(truncated.clone())?;
        let (command, rest) = rest.split_first_chunk::<COMMAND_LEN>().ok_or(truncated.clone())?;
        let (length, rest) = rest.split_first_chunk::<4>().ok_or(truncated.clone())?;
        let (checksum, _) = rest.split_first_chunk::<4>().ok_or(truncated)?;
        let length = u32::from_le_bytes(*length);
        if length as usize > MAX_PAYLOAD {
            return Err(BtcError::PayloadTooLarge(length));
        }
        Ok(EnvelopeHeader { magic: *magic, command: decode_command(command)?, length, checksum: *checksum })
    }

    /// Encodes the header (validating the command and length).
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], BtcError> {
        if self.length as usize > MAX_PAYLOAD {
            return Err(BtcError::PayloadTooLarge(self.length));
        }
        let command = encode_command(&self.command)?;
        let mut out = [0u8; HEADER_LEN];
        let fields = self.magic.into_iter().chain(command).chain(self.length.to_le_bytes()).chain(self.checksum);
        for (dst, src) in out.iter_mut().zip(fields) {
            *dst = src;
        }
        Ok(out)
    }
}

/// One framed P2P message: magic, command and the raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Network magic.
    pub magic: [u8; 4],
    /// Command (0..=12 printable ASCII characters).
    pub command: String,
    /// Raw payload (at most [`MAX_PAYLOAD`] bytes).
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Builds an envelope, checking the command and payload size.
    pub fn new(magic: [u8; 4], command: impl Into<String>, payload: Vec<u8>) -> Result<Envelope, BtcError> {
        let env = Envelope { magic, command: command.into(), payload };
        env.validate()?;
        Ok(env)
    }

    /// Checks that this envelope can be encoded: valid command, payload within [`MAX_PAYLOAD`].
    pub fn validate(&self) -> Result<(), BtcError> {
        validate_command(&self.command)?;
        if self.payload.len() > MAX_PAYLOAD {
            return Err(BtcError::PayloadTooLarge(saturate(self.payload.len())));
        }
        Ok(())
    }

    /// The header this envelope is sent with.
    pub fn header(&self) -> EnvelopeHeader {
        EnvelopeHeader {
            magic: self.magic,
            command: self.command.clone(),
            length: saturate(self.payload.len()),
            checksum: checksum(&self.payload),
        }
    }

    /// Encodes header and payload, or says why this envelope cannot be encoded.
    pub fn try_encode(&self) -> Result<Vec<u8>, BtcError> {
        self.validate()?;
        let header = self.header().encode()?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Encodes header and payload.
    ///
    /// # Panics
    ///
    /// If the envelope is invalid (see [`Envelope::validate`]). Envelopes returned by
    /// [`Envelope::new`] and [`Envelope::decode`], and those made by
    /// [`Message::to_envelope`](super::message::Message::to_envelope) from decoded messages,
    /// are always valid; use [`Envelope::try_encode`] for hand-built ones.
    #[allow(clippy::panic)] // A caller bug, documented under `# Panics`; received envelopes are validated on decode.
    pub fn encode(&self) -> Vec<u8> {
        match self.try_encode() {
            Ok(bytes) => bytes,
            Err(e) => panic!("Envelope::encode on an invalid envelope: {e}"),
        }
    }

    /// Decodes one envelope from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only a prefix of a (so far valid) envelope,
    /// `Ok(Some((envelope, consumed)))` once a whole envelope is there, and an error for a
    /// wrong magic (checked as soon as 4 bytes are there), bad command bytes, an oversized
    /// length field (before waiting for or allocating the payload) or a bad checksum.
    pub fn decode(buf: &[u8], expected_magic: [u8; 4]) -> Result<Option<(Envelope, usize)>, BtcError> {
        if let Some(got) = buf.first_chunk::<4>() {
            if *got != expected_magic {
                return Err(BtcError::BadMagic { expected: expected_magic, got: *got });
            }
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = EnvelopeHeader::decode(buf)?;
        let total = HEADER_LEN + header.length as usize;
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let computed = checksum(payload);
        if computed != header.checksum {
            return Err(BtcError::BadChecksum { command: header.command, header: header.checksum, computed });
        }
        let env = Envelope { magic: header.magic, command: header.command, payload: payload.to_vec() };
        Ok(Some((env, total)))
    }
}

fn saturate(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Streaming envelope decoder for one connection.
///
/// Feed it bytes with [`push`](Self::push) and take envelopes out with
/// [`next`](Self::next). Its buffer never holds more than [`EnvelopeReader::CAPACITY`]
/// (= `HEADER_LEN + MAX_PAYLOAD`) bytes, exactly one maximal envelope: `push` accepts only
/// what fits and returns how much that was, and a full buffer always holds a complete
/// envelope (or an error), so `next` can always make room.
///
/// ```
/// # use anomos_proto::btc::envelope::{Envelope, EnvelopeReader};
/// let magic = [0xfa, 0xbf, 0xb5, 0xda];
/// let wire = Envelope::new(magic, "verack", vec![]).unwrap().encode();
/// let mut reader = EnvelopeReader::new(magic);
/// let mut rest = &wire[..];
/// let mut got = Vec::new();
/// while !rest.is_empty() {
///     let n = reader.push(rest);
///     rest = &rest[n..];
///     while let Some(env) = reader.next().unwrap() {
///         got.push(env);
///     }
/// }
/// assert_eq!(got[0].command, "verack");
/// ```
///
/// Errors are sticky: after `next` fails, the stream is desynchronised and every further
/// call fails the same way; drop the connection.
#[derive(Debug, Clone)]
pub struct EnvelopeReader {
    magic: [u8; 4],
    buf: Vec<u8>,
    start: usize,
}

impl EnvelopeReader {
    /// Most bytes the reader ever buffers: one maximal envelope.
    pub const CAPACITY: usize = HEADER_LEN + MAX_PAYLOAD;

    /// Capacity kept after the buffer drains; more is released.
    const RETAIN: usize = 64 * 1024;

    /// A reader for envelopes of the network with this magic.
    pub fn new(magic: [u8; 4]) -> EnvelopeReader {
        EnvelopeReader { magic, buf: Vec::new(), start: 0 }
    }

    /// The magic this reader expects.
    pub fn magic(&self) -> [u8; 4] {
        self.magic
    }

    /// Bytes buffered and not yet returned as envelopes.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes [`push`](Self::push) would accept right now.
    pub fn remaining_capacity(&self) -> usize {
        Self::CAPACITY - self.buffered()
    }

    /// Appends as much of `data` as fits and returns how many bytes were taken. If that is
    /// less than `data.len()`, call [`next`](Self::next) and push the rest.
    #[must_use = "push may take only part of the data; push the rest after calling next"]
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.remaining_capacity());
        if n == 0 {
            return 0;
        }
        let (take, _) = data.split_at(n);
        // Compact when the dead prefix would push us past the cap, or is the larger half.
        if self.start > 0 && (self.buf.len() + n > Self::CAPACITY || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let needed = self.buf.len() + n;
        if needed > self.buf.capacity() {
            let target = needed.max(self.buf.capacity().saturating_mul(2)).min(Self::CAPACITY);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(take);
        n
    }

    /// The next complete envelope, `Ok(None)` if more bytes are needed, or the framing error
    /// that ends this stream.
    // Iterator-like, but fallible (Result<Option<_>>), so it cannot be `Iterator::next`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Envelope>, BtcError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        match Envelope::decode(pending, self.magic)? {
            None => Ok(None),
            Some((env, used)) => {
                self.start += used;
                if self.start >= self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                    if self.buf.capacity() > Self::RETAIN {
                        self.buf.shrink_to(Self::RETAIN);
                    }
                }
                Ok(Some(env))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGTEST: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];

    #[test]
    fn verack_vector() {
        let wire = Envelope::new(REGTEST, "verack", vec![]).unwrap().encode();
        assert_eq!(hex::encode(&wire), "fabfb5da76657261636b000000000000000000005df6e0e2");
    }

    #[test]
    fn command_rules() {
        assert!(decode_command(b"ping\0\0\0\0\0\0\0\0").is_ok());
        assert!(decode_command(b"abcdefghijkl").is_ok());
        assert_eq!(decode_command(&[0; 12]).unwrap(), "");
        assert!(decode_command(b"ping\0\0\0\0\0\0\0x").is_err());
        assert!(decode_command(b"pi\x01g\0\0\0\0\0\0\0\0").is_err());
        assert!(decode_command(b"pi\xffg\0\0\0\0\0\0\0\0").is_err());
        assert!(validate_command("abcdefghijklm").is_err());
        assert!(validate_command("a\0b").is_err());
        assert!(validate_command("caf\u{e9}").is_err());
    }

    #[test]
    fn reader_bounds_and_compaction() {
        let big = Envelope::new(REGTEST, "block", vec![7; MAX_PAYLOAD]).unwrap().encode();
        let small = Envelope::new(REGTEST, "ping", vec![1; 8]).unwrap().encode();
        let mut stream = small.clone();
        stream.extend_from_slice(&big);
        stream.extend_from_slice(&small);
        let mut r = EnvelopeReader::new(REGTEST);
        let mut rest = &stream[..];
        let mut cmds = Vec::new();
        while !rest.is_empty() {
            let n = r.push(rest);
            assert!(r.buffered() <= EnvelopeReader::CAPACITY);
            assert!(r.buf.capacity() <= EnvelopeReader::CAPACITY);
            rest = &rest[n..];
            while let Some(e) = r.next().unwrap() {
                cmds.push(e.command);
            }
        }
        assert_eq!(cmds, ["ping", "block", "ping"]);
        assert_eq!(r.buffered(), 0);
        assert!(r.buf.capacity() <= EnvelopeReader::RETAIN);
    }
}
