//! The one error type of the Bitcoin wire layer.

use bitcoin::{BlockHash, TxMerkleNode, Txid};

/// Everything that can go wrong while framing, decoding or checking Bitcoin P2P data.
///
/// Wire errors (`Truncated` .. `TrailingBytes`) mean the peer sent bytes that are not a valid
/// message; on a stream they are fatal (Bitcoin Core disconnects). Validation errors
/// (`BadPow` .. `TimeWarp`) mean well-formed data that breaks a consensus rule;
/// `UnknownAncestor` means the caller lacked the chain context to decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtcError {
    /// Fewer bytes than a fixed-size structure needs.
    #[error("truncated input: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },

    /// The payload length (from a header, or of a payload handed to an encoder/decoder)
    /// exceeds [`MAX_PAYLOAD`](super::envelope::MAX_PAYLOAD). Saturates at `u32::MAX`.
    #[error("payload of {0} bytes exceeds the 4000000-byte protocol limit")]
    PayloadTooLarge(u32),

    /// The envelope starts with another network's magic bytes.
    #[error("bad network magic: expected {}, got {}", hex::encode(expected), hex::encode(got))]
    BadMagic {
        /// The magic of the network we speak.
        expected: [u8; 4],
        /// The magic found on the wire.
        got: [u8; 4],
    },

    /// The checksum in the header is not the first 4 bytes of SHA-256d(payload).
    #[error(
        "bad checksum for '{command}': header says {}, payload hashes to {}",
        hex::encode(header),
        hex::encode(computed)
    )]
    BadChecksum {
        /// The command of the failing envelope.
        command: String,
        /// Checksum carried in the header.
        header: [u8; 4],
        /// Checksum computed over the payload.
        computed: [u8; 4],
    },

    /// A command that is not 0..=12 printable ASCII bytes followed only by NUL padding.
    /// Carries the offending bytes, escaped.
    #[error("bad command bytes: \"{0}\"")]
    BadCommand(String),

    /// A payload that does not decode as the message its command names.
    #[error("payload decode failed: {0}")]
    Decode(String),

    /// A payload decoded completely but bytes were left over.
    #[error("'{command}' payload has {extra} trailing byte(s)")]
    TrailingBytes {
        /// The command whose payload was decoded.
        command: String,
        /// Number of unconsumed bytes.
        extra: usize,
    },

    /// Proof of work is invalid: bad nBits encoding, target above the network's limit, or the
    /// block hash does not meet the target.
    #[error("bad proof of work for block {hash} (nBits {bits:#010x}): {reason}")]
    BadPow {
        /// Hash of the offending header.
        hash: BlockHash,
        /// Its compact target.
        bits: u32,
        /// What exactly failed.
        reason: &'static str,
    },

    /// The header's merkle root does not commit to the block's transactions.
    #[error("bad merkle root in block {block}: header has {header}, transactions give {computed:?}")]
    BadMerkleRoot {
        /// Hash of the offending block.
        block: BlockHash,
        /// Merkle root in the header.
        header: TxMerkleNode,
        /// Merkle root computed from the transactions (`None` for an empty block).
        computed: Option<TxMerkleNode>,
    },

    /// The block carries witness data but its coinbase witness commitment is missing or wrong.
    #[error("bad or missing witness commitment in block {block}")]
    BadWitnessCommitment {
        /// Hash of the offending block.
        block: BlockHash,
    },

    /// The block exceeds a size limit.
    #[error("block {block} too large: {what} is {actual}, limit {limit}")]
    Oversize {
        /// Hash of the offending block.
        block: BlockHash,
        /// Which measure: `"serialized size"` (bytes) or `"weight"` (weight units).
        what: &'static str,
        /// The block's value.
        actual: u64,
        /// The consensus limit.
        limit: u64,
    },

    /// The coinbase rules are broken: no transactions, first transaction not a coinbase,
    /// another transaction is a coinbase, or the coinbase script length is out of 2..=100.
    #[error("bad coinbase in block {block} at tx #{index}: {reason}")]
    BadCoinbase {
        /// Hash of the offending block.
        block: BlockHash,
        /// Index of the offending transaction.
        index: usize,
        /// What exactly failed.
        reason: &'static str,
    },

    /// Two transactions of a block have the same txid (includes the CVE-2012-2459 merkle
    /// mutation, where the last transactions are repeated without changing the merkle root).
    #[error("block {block} contains txid {txid} twice (tx #{first} and #{second})")]
    DuplicateTx {
        /// Hash of the offending block.
        block: BlockHash,
        /// The repeated txid.
        txid: Txid,
        /// Index of its first occurrence.
        first: usize,
        /// Index of its second occurrence.
        second: usize,
    },

    /// A header does not build on the header claimed to precede it.
    #[error("header {next} does not link: its prev_blockhash is {got}, expected {expected}")]
    BadLinkage {
        /// Hash of the header that should be the parent.
        expected: BlockHash,
        /// The `prev_blockhash` the child actually carries.
        got: BlockHash,
        /// Hash of the child header.
        next: BlockHash,
    },

    /// A header's nBits is not the difficulty the network's rules require at its height.
    #[error("block {hash} at height {height}: nBits {bits:#010x} is not the required difficulty {expected:#010x}")]
    BadDifficulty {
        /// Hash of the offending header.
        hash: BlockHash,
        /// Its height.
        height: u32,
        /// Its nBits.
        bits: u32,
        /// The nBits the rules require.
        expected: u32,
    },

    /// BIP 94 (testnet4): the first block of a difficulty period is more than 600 s earlier
    /// than its parent.
    #[error("block {hash} at height {height}: timestamp {time} is more than 600 s before its parent's {parent_time} (BIP 94 timewarp rule)")]
    TimeWarp {
        /// Hash of the offending header.
        hash: BlockHash,
        /// Its height.
        height: u32,
        /// Its timestamp.
        time: u32,
        /// Its parent's timestamp.
        parent_time: u32,
    },

    /// The difficulty rules needed a header the caller could not provide (the ancestor at
    /// this height of the header being checked). Not the checked header's fault.
    #[error("the ancestor at height {height} is unknown")]
    UnknownAncestor {
        /// Height asked for.
        height: u32,
    },
}
