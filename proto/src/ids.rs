//! Small identifiers shared by the tracker protocol, tracking codes and links.

use serde::{Deserialize, Serialize};

use crate::error::{ProtoError, Result};

/// The secret identifier of one neighbor edge (64 bits, random, non-zero). Known only to the two ends and the
/// tracker; never sent in clear (SPEC.md §5: it is mixed into the link keys instead).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NeighborId(pub u64);

impl NeighborId {
    /// A fresh random non-zero id.
    pub fn random(rng: &mut impl rand::RngCore) -> Self {
        loop {
            let v = rng.next_u64();
            if v != 0 {
                return NeighborId(v);
            }
        }
    }
}

impl std::fmt::Debug for NeighborId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Logs show only a short prefix of a NeighborID: it is a secret of the edge.
        write!(f, "nid:{:04x}…", self.0 >> 48)
    }
}

/// Maximum length of a chain id.
pub const CHAIN_ID_MAX: usize = 32;

/// Names a blockchain a peer serves ("mainnet", "regtest", or a custom name): 1–32 bytes of `[a-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChainId(String);

impl ChainId {
    /// Validates and wraps a chain name.
    pub fn new(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > CHAIN_ID_MAX {
            return Err(ProtoError::Invalid { what: "chain id", detail: format!("length {} (1..=32)", s.len()) });
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
            return Err(ProtoError::Invalid { what: "chain id", detail: format!("{s:?}: only [a-z0-9._-]") });
        }
        Ok(ChainId(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// NUL-padded 32-byte form used inside tracking codes.
    pub fn to_fixed(&self) -> [u8; CHAIN_ID_MAX] {
        let mut out = [0u8; CHAIN_ID_MAX];
        // `ChainId::new` keeps the id at most CHAIN_ID_MAX bytes; zip stops at the shorter side regardless.
        for (dst, &src) in out.iter_mut().zip(self.0.as_bytes()) {
            *dst = src;
        }
        out
    }

    /// Parses the NUL-padded form (NULs only at the end).
    pub fn from_fixed(b: &[u8; CHAIN_ID_MAX]) -> Result<Self> {
        let len = b.iter().position(|&c| c == 0).unwrap_or(CHAIN_ID_MAX);
        let (id, pad) = b.split_at(len);
        if pad.iter().any(|&c| c != 0) {
            return Err(ProtoError::Invalid { what: "chain id", detail: "bytes after NUL padding".into() });
        }
        let s = std::str::from_utf8(id)
            .map_err(|_| ProtoError::Invalid { what: "chain id", detail: "not UTF-8".into() })?;
        ChainId::new(s)
    }
}

impl TryFrom<String> for ChainId {
    type Error = ProtoError;
    fn try_from(s: String) -> Result<Self> {
        ChainId::new(&s)
    }
}

impl From<ChainId> for String {
    fn from(c: ChainId) -> String {
        c.0
    }
}

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainId({})", self.0)
    }
}

impl std::str::FromStr for ChainId {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self> {
        ChainId::new(s)
    }
}

/// Identifies one circuit request at its target (lets a target group the circuits of one request).
pub type SessionId = [u8; 16];
