//! Fixed-size cells: the only thing a neighbor link carries after its handshake.
//!
//! ```text
//! cell (plaintext, CELL_LEN = 4117 bytes):
//!   circ_id  u32 BE   circuit id, local to the link (0 = the link itself: PADDING)
//!   command  u8       see [`Command`]
//!   payload  [4112]   command-specific, zero-filled after its fields
//! on the wire (SEALED_CELL_LEN = 4133 bytes): AES-256-GCM(cell) || tag, nonce = per-direction counter
//! ```
//! Circuit ids: the side that dialed the link allocates ids with the top bit set, the side that accepted with
//! it clear, so both ends can open circuits without coordination and ids never collide.

use crate::crypto::TAG_LEN;
use crate::error::{take_array, take_u16, ProtoError, Result};
use crate::tc::TC_LEN;

/// Bytes of payload in every cell.
pub const CELL_PAYLOAD_LEN: usize = 4112;
/// circ_id + command.
pub const CELL_HEADER_LEN: usize = 5;
/// A cell before link encryption.
pub const CELL_LEN: usize = CELL_HEADER_LEN + CELL_PAYLOAD_LEN;
/// A cell on the wire.
pub const SEALED_CELL_LEN: usize = CELL_LEN + TAG_LEN;
/// The top bit of a circuit id marks ids allocated by the link's dialer.
pub const DIALER_CIRC_BIT: u32 = 0x8000_0000;

/// Smallest receive window a link may announce.
pub const MIN_WINDOW: u16 = 4;

/// A circuit id, local to one link.
pub type CircId = u32;

/// Cell commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Link-level filler, dropped on receipt; circ_id must be 0. Also the key-confirmation cell of a new link.
    Padding = 0,
    /// Open a circuit: payload = tracking code (TC_LEN bytes) + zero fill.
    Open = 1,
    /// The circuit reached its target and is ready; travels back to the requester.
    Confirm = 2,
    /// The circuit was refused: payload = [`DenyReason`] u8, has_tag u8, replay tag (16 bytes) of the refusing hop.
    Deny = 3,
    /// Onion-encrypted relay payload (CELL_PAYLOAD_LEN bytes).
    Data = 4,
    /// Tear the circuit down: payload = [`BreakReason`] u8, has_tag u8, replay tag (16 bytes) of the hop that saw the
    /// failure first (set by a relay whose other link failed; lets the tracker avoid the peer behind that link).
    Break = 5,
    /// Acknowledges a BREAK on a circuit the receiver held (any state), to the BREAK's sender. Informational:
    /// ignored on receipt, and ids are not reused soon (SPEC §6.3, §7.6). A BREAK for an unknown id gets none.
    AckBreak = 6,
    /// Flow-control credit: payload = u16 BE number of DATA cells the receiver may send on.
    Sendme = 7,
}

impl Command {
    /// Decodes a command byte.
    pub fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            0 => Command::Padding,
            1 => Command::Open,
            2 => Command::Confirm,
            3 => Command::Deny,
            4 => Command::Data,
            5 => Command::Break,
            6 => Command::AckBreak,
            7 => Command::Sendme,
            _ => return Err(ProtoError::Invalid { what: "cell command", detail: b.to_string() }),
        })
    }
}

macro_rules! reason_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr => $s:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
            /// A code this version does not know (kept, not an error).
            Other(u8),
        }
        impl $name {
            /// Every code this version knows (not `Other`), in wire-code order: the label values of the metrics.
            pub const KNOWN: &'static [$name] = &[$($name::$v,)*];
            /// Wire code.
            pub fn code(self) -> u8 { match self { $($name::$v => $n,)* $name::Other(c) => c } }
            /// From a wire code.
            pub fn from_code(c: u8) -> Self { match c { $($n => $name::$v,)* c => $name::Other(c) } }
            /// A short stable label (for logs and metrics).
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s,)* $name::Other(_) => "other" } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self { $name::Other(c) => write!(f, "other({c})"), r => f.write_str(r.as_str()) }
            }
        }
    };
}

reason_enum!(
    /// Why a hop refused an OPEN.
    DenyReason {
        /// The TC layer did not decrypt/authenticate under this hop's key.
        BadTc = 1 => "bad-tc",
        /// The TC has expired.
        Expired = 2 => "expired",
        /// The TC's replay tag was seen before.
        Replayed = 3 => "replayed",
        /// The hop is at its circuit limit.
        CircuitLimit = 4 => "circuit-limit",
        /// The OPEN arrived on a link other than the one the TC names.
        WrongLink = 5 => "wrong-link",
        /// The next NeighborID is not a live link of this hop.
        NoSuchNeighbor = 6 => "no-such-neighbor",
        /// The target does not serve the requested chain.
        NoSuchChain = 7 => "no-such-chain",
        /// The link is not (yet) an authenticated neighbor link.
        NotNeighbor = 8 => "not-neighbor",
        /// A later hop could not be reached in time.
        Timeout = 9 => "timeout",
        /// Malformed OPEN (e.g. on an id already in use).
        Protocol = 10 => "protocol",
        /// The path loops: a relay layer names the edge the OPEN came in on as its next hop.
        Loop = 11 => "loop",
        /// The next hop refused the OPEN without peeling it (an untagged `circuit-limit`); the tag is that of the
        /// relay passing the refusal back, so the tracker can name the hop after it (SPEC §4.7, §7.5).
        NextRefused = 12 => "next-refused",
    }
);

reason_enum!(
    /// Why a circuit was broken.
    BreakReason {
        /// An endpoint closed it normally.
        Finished = 1 => "finished",
        /// A link on the path failed.
        LinkFailed = 2 => "link-failed",
        /// A peer violated the protocol (e.g. DATA beyond credit, bad e2e tag).
        Protocol = 3 => "protocol",
        /// Resource limits.
        Resources = 4 => "resources",
        /// The peer is shutting down.
        Shutdown = 5 => "shutdown",
        /// Data failed end-to-end authentication (tampering: SPEC.md "tagging").
        Integrity = 6 => "integrity",
        /// The chain service rejected the other end (invalid blocks etc.).
        Misbehaving = 7 => "misbehaving",
        /// A hop gave no sign of life in time.
        Timeout = 8 => "timeout",
        /// The target serves its chain from another node (`--upstream`) and could not reach it.
        UpstreamUnavailable = 9 => "upstream-unavailable",
    }
);

/// A decoded cell. DATA and OPEN payloads are kept as fixed arrays so the relay path never allocates.
#[derive(Clone, PartialEq, Eq)]
pub struct Cell {
    /// Circuit id on this link.
    pub circ_id: CircId,
    /// What this cell does.
    pub command: Command,
    /// Exactly CELL_PAYLOAD_LEN bytes.
    pub payload: Box<[u8; CELL_PAYLOAD_LEN]>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cell({:#010x}, {:?})", self.circ_id, self.command)
    }
}

// Bounds: every index and range in this impl is a constant into `payload: Box<[u8; CELL_PAYLOAD_LEN]>` (4112
// bytes; the largest is `2..18` for a replay tag and `..TC_LEN` for a TC, both far below it) or into
// `[u8; CELL_LEN]`. Clippy cannot see through the Box to the array length; the fixed-layout accessors stay
// plain indexing on the relay hot path.
#[allow(clippy::indexing_slicing)]
impl Cell {
    /// A cell with a zero payload.
    pub fn new(circ_id: CircId, command: Command) -> Self {
        Cell { circ_id, command, payload: Box::new([0u8; CELL_PAYLOAD_LEN]) }
    }

    /// PADDING on circuit 0 (keepalive: all-zero payload).
    pub fn padding() -> Self {
        Cell::new(0, Command::Padding)
    }

    /// The first cell each side sends on a new link (key confirmation): PADDING whose payload starts with the
    /// sender's receive window, u16 BE — how many DATA cells per circuit it lets the other side send before
    /// a SENDME. The other side starts every circuit on this link with that much credit.
    pub fn link_params(window: u16) -> Self {
        let mut c = Cell::padding();
        c.payload[..2].copy_from_slice(&window.to_be_bytes());
        c
    }

    /// A key-confirmation PADDING that also announces the largest window the sender may grow a circuit's
    /// receive window to (u16 BE after the window; SPEC §8 "Window growth"). `max` ≤ `window` announces no growth
    /// (encoded as 0, the bytes [`link_params`](Self::link_params) produces).
    pub fn link_params_growing(window: u16, max: u16) -> Self {
        let mut c = Cell::link_params(window);
        if max > window {
            c.payload[2..4].copy_from_slice(&max.to_be_bytes());
        }
        c
    }

    /// The largest receive window announced by a key-confirmation PADDING: the announced maximum, or the window
    /// itself where none is announced (0). Credit a neighbor grants beyond it is a protocol violation.
    pub fn link_params_max_window(&self) -> Result<u16> {
        let w = self.link_params_window()?;
        let max = u16::from_be_bytes([self.payload[2], self.payload[3]]);
        Ok(if max == 0 { w } else { max.max(w) })
    }

    /// The receive window announced by a key-confirmation PADDING (at least [`MIN_WINDOW`]).
    pub fn link_params_window(&self) -> Result<u16> {
        if self.command != Command::Padding {
            return Err(ProtoError::Unexpected("first link cell other than PADDING"));
        }
        let w = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        if w < MIN_WINDOW {
            return Err(ProtoError::Invalid { what: "link receive window", detail: format!("{w} (min {MIN_WINDOW})") });
        }
        Ok(w)
    }

    /// OPEN carrying `tc`.
    pub fn open(circ_id: CircId, tc: &[u8; TC_LEN]) -> Self {
        let mut c = Cell::new(circ_id, Command::Open);
        c.payload[..TC_LEN].copy_from_slice(tc);
        c
    }

    /// The TC of an OPEN cell.
    pub fn open_tc(&self) -> Result<[u8; TC_LEN]> {
        if self.command != Command::Open {
            return Err(ProtoError::Unexpected("non-OPEN cell"));
        }
        let mut tc = [0u8; TC_LEN];
        tc.copy_from_slice(&self.payload[..TC_LEN]);
        Ok(tc)
    }

    fn with_reason_tag(circ_id: CircId, command: Command, reason: u8, tag: Option<[u8; 16]>) -> Self {
        let mut c = Cell::new(circ_id, command);
        c.payload[0] = reason;
        if let Some(t) = tag {
            c.payload[1] = 1;
            c.payload[2..18].copy_from_slice(&t);
        }
        c
    }

    fn reason_tag(&self) -> Result<(u8, Option<[u8; 16]>)> {
        let p = &self.payload;
        let tag = match p[1] {
            0 => None,
            1 => {
                let mut t = [0u8; 16];
                t.copy_from_slice(&p[2..18]);
                Some(t)
            }
            b => return Err(ProtoError::Invalid { what: "has_tag", detail: b.to_string() }),
        };
        Ok((p[0], tag))
    }

    /// DENY with a reason and optionally the refusing hop's replay tag (lets the tracker tell which hop refused).
    pub fn deny(circ_id: CircId, reason: DenyReason, tag: Option<[u8; 16]>) -> Self {
        Self::with_reason_tag(circ_id, Command::Deny, reason.code(), tag)
    }

    /// Fields of a DENY cell.
    pub fn deny_fields(&self) -> Result<(DenyReason, Option<[u8; 16]>)> {
        let (r, t) = self.reason_tag()?;
        Ok((DenyReason::from_code(r), t))
    }

    /// BREAK with a reason and optionally the replay tag of the hop that saw the failure.
    pub fn brk(circ_id: CircId, reason: BreakReason, tag: Option<[u8; 16]>) -> Self {
        Self::with_reason_tag(circ_id, Command::Break, reason.code(), tag)
    }

    /// Fields of a BREAK cell.
    pub fn break_fields(&self) -> Result<(BreakReason, Option<[u8; 16]>)> {
        let (r, t) = self.reason_tag()?;
        Ok((BreakReason::from_code(r), t))
    }

    /// SENDME granting `credit` cells.
    pub fn sendme(circ_id: CircId, credit: u16) -> Self {
        let mut c = Cell::new(circ_id, Command::Sendme);
        c.payload[..2].copy_from_slice(&credit.to_be_bytes());
        c
    }

    /// Credit of a SENDME cell (at least 1).
    pub fn sendme_credit(&self) -> Result<u16> {
        let mut p: &[u8] = &self.payload[..];
        let n = take_u16(&mut p, "SENDME credit")?;
        if n == 0 {
            return Err(ProtoError::Invalid { what: "SENDME credit", detail: "0".into() });
        }
        Ok(n)
    }

    /// Writes the plaintext cell into `out`.
    pub fn encode_into(&self, out: &mut [u8; CELL_LEN]) {
        out[..4].copy_from_slice(&self.circ_id.to_be_bytes());
        out[4] = self.command as u8;
        out[CELL_HEADER_LEN..].copy_from_slice(&self.payload[..]);
    }

    /// Decodes a plaintext cell. Checks the command and that PADDING is on circuit 0 and nothing else is.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        Self::decode_reusing(buf, Box::new([0u8; CELL_PAYLOAD_LEN]))
    }

    /// [`decode`](Self::decode) into a payload buffer the caller already has (e.g. one that an earlier cell
    /// used): a relay moves every cell through here, and a fresh zeroed allocation per cell costs more than the
    /// copy. Every byte of `payload` is overwritten.
    pub fn decode_reusing(buf: &[u8], mut payload: Box<[u8; CELL_PAYLOAD_LEN]>) -> Result<Self> {
        if buf.len() != CELL_LEN {
            return Err(ProtoError::BadLength { what: "cell", len: buf.len(), expected: CELL_LEN });
        }
        let mut p = buf;
        let circ_id = u32::from_be_bytes(take_array(&mut p, "cell circ_id")?);
        let command = Command::from_u8(take_array::<1>(&mut p, "cell command")?[0])?;
        if (command == Command::Padding) != (circ_id == 0) {
            return Err(ProtoError::Invalid {
                what: "cell circ_id",
                detail: format!("{command:?} on circuit {circ_id:#x}"),
            });
        }
        payload.copy_from_slice(p);
        Ok(Cell { circ_id, command, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reusing_overwrites_a_dirty_buffer_and_checks_like_decode() {
        let mut c = Cell::new(0x8000_0002, Command::Data);
        c.payload[..3].copy_from_slice(b"abc");
        let mut plain = [0u8; CELL_LEN];
        c.encode_into(&mut plain);
        let dirty = Box::new([0xffu8; CELL_PAYLOAD_LEN]);
        assert_eq!(Cell::decode_reusing(&plain, dirty).unwrap(), c);
        assert_eq!(Cell::decode(&plain).unwrap(), c);
        // The same checks as `decode`: DATA on circuit 0 is refused, and so is a short buffer.
        plain[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(Cell::decode_reusing(&plain, Box::new([0u8; CELL_PAYLOAD_LEN])).is_err());
        assert!(Cell::decode_reusing(&plain[1..], Box::new([0u8; CELL_PAYLOAD_LEN])).is_err());
    }

    #[test]
    fn link_params_announce_the_window_and_its_maximum() {
        let c = Cell::link_params_growing(128, 2048);
        assert_eq!((c.link_params_window().unwrap(), c.link_params_max_window().unwrap()), (128, 2048));
        // No maximum announced (a peer that does not grow): the window is the maximum, bytes as before.
        assert_eq!(Cell::link_params_growing(128, 128), Cell::link_params(128));
        assert_eq!(Cell::link_params(128).link_params_max_window().unwrap(), 128);
        // A maximum below the window means the window.
        let mut c = Cell::link_params(256);
        c.payload[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(c.link_params_max_window().unwrap(), 256);
    }
}
