//! # anomos-proto
//!
//! Every byte anomos puts on a wire, and the cryptography that protects it.
//! Pure code: no sockets, no async, no clocks except where a caller passes the time in.
//! `SPEC.md` beside this crate is the normative description; this crate is its reference implementation.

#![forbid(unsafe_code)]

pub mod btc;
pub mod cell;
pub mod circuit;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod ids;
pub mod link;
pub mod probe_v2;
pub mod tc;
pub mod tracker;

pub use error::{ProtoError, Result};
