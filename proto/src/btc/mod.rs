//! # The Bitcoin wire layer
//!
//! Everything anomos needs to read and write Bitcoin P2P traffic, as pure functions over
//! byte slices: no I/O, no async, no clocks.
//!
//! - [`network`]: [`NetParams`], magic bytes, genesis and proof-of-work limits of mainnet,
//!   testnet3, testnet4, signet, regtest and custom Bitcoin-format chains.
//! - [`envelope`]: the 24-byte `magic | command | length | checksum` framing,
//!   [`Envelope`], and the bounded streaming [`EnvelopeReader`].
//! - [`message`]: [`Message`], the commands we look into, typed; all others kept raw as
//!   [`Message::Unknown`].
//! - [`validate`]: context-free consensus checks on headers and blocks, and the difficulty rules.
//! - [`import`]: block files (Bitcoin Core's `blk*.dat` format, hex lines) split into blocks.
//!
//! Decoders never panic and never allocate by an attacker-chosen length: lengths and counts
//! are checked against [`MAX_PAYLOAD`] and the bytes actually present first. All errors are
//! [`BtcError`].
//!
//! ```
//! use anomos_proto::btc::{decode_message, encode_message, Message, NetParams};
//! let net = NetParams::regtest();
//! let wire = encode_message(net.magic, &Message::Ping(42));
//! assert_eq!(wire.len(), 24 + 8);
//! // A prefix is "need more bytes", not an error.
//! assert_eq!(decode_message(&wire[..30], net.magic), Ok(None));
//! assert_eq!(decode_message(&wire, net.magic), Ok(Some((Message::Ping(42), wire.len()))));
//! ```

pub mod envelope;
pub mod error;
pub mod import;
pub mod message;
pub mod network;
pub mod validate;

pub use envelope::{Envelope, EnvelopeHeader, EnvelopeReader, HEADER_LEN, MAX_PAYLOAD};
pub use error::BtcError;
pub use import::ImportError;
pub use message::{decode_message, encode_message, Message, Reject, MODELED_COMMANDS};
pub use network::{DifficultyRules, NetParams};
pub use validate::{check_block, check_difficulty, check_header_pow, check_linkage, header_target, next_work_required};

/// Re-exports of the `bitcoin` types that appear in [`Message`].
pub use bitcoin::p2p::message_blockdata::{GetBlocksMessage, GetHeadersMessage, Inventory};
pub use bitcoin::p2p::message_network::VersionMessage;
pub use bitcoin::p2p::{Address, ServiceFlags};
