//! `anomos keygen`: writes a new identity key (PKCS#8 PEM, mode 0600) and prints its fingerprint.

use std::path::PathBuf;

use anomos_proto::identity::{self, Identity};
use clap::Args;

use crate::error::PeerError;

/// Flags of `anomos keygen`.
#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Where to write the key (must not exist).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Key size.
    #[arg(long, default_value_t = 2048, value_parser = crate::cmd::parse_key_bits)]
    pub bits: usize,
}

/// Runs `anomos keygen`.
pub fn run(args: &KeygenArgs) -> Result<(), PeerError> {
    let id = Identity::generate(&mut rand::rngs::OsRng, args.bits)?;
    identity::save_identity(&args.out, &id)?;
    println!("{}", id.fingerprint());
    Ok(())
}
