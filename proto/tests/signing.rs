//! RSA-PSS signing (SPEC §11.8): every identity a peer or tracker makes, parses or loads signs with AWS-LC
//! (constant-time; RUSTSEC-2023-0071 concerns the `rsa` crate's private-key operation), and its signatures
//! verify with `PublicKey::verify` (PSS-SHA256, salt length 32). The `rsa` crate's seeded signer remains only
//! for the known-answer vectors, where it reproduces a signature from the rng state.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use anomos_proto::identity::{load_or_create_identity, Identity, Signer};
use anomos_proto::{link, tracker};
use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PSS_2048_8192_SHA256};
use common::{ids, rng};
use rand::RngCore;

/// Identities as the peer and tracker get them: generated, parsed from PEM, loaded from a key file.
fn runtime_identities() -> Vec<Identity> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("anomos-signing-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (created, was_new) = load_or_create_identity(&dir.join("id.pem"), 2048).unwrap();
    assert!(was_new);
    let (loaded, was_new) = load_or_create_identity(&dir.join("id.pem"), 2048).unwrap();
    assert!(!was_new);
    assert_eq!(loaded.fingerprint(), created.fingerprint());
    std::fs::remove_dir_all(&dir).unwrap();
    let parsed = Identity::from_pkcs8_pem(&ids()[4].to_pkcs8_pem().unwrap()).unwrap();
    vec![created, loaded, parsed, ids()[0].clone(), ids()[4].clone()]
}

#[test]
fn runtime_identities_sign_with_aws_lc_and_their_signatures_verify() {
    for id in runtime_identities() {
        assert_eq!(id.signer(), Signer::AwsLc, "{id:?}");
        let mut r = rng(7);
        let before = r.clone().next_u64();
        let a = id.sign(&mut r, b"message");
        // AWS-LC draws the salt itself: the caller's rng is untouched, and the same rng state gives a different
        // signature (the `rsa` crate's signer would give the same one twice).
        assert_eq!(r.clone().next_u64(), before, "the AWS-LC signer must not draw from the caller's rng");
        let b = id.sign(&mut rng(7), b"message");
        assert_ne!(a, b, "same rng state, same signature: this is the seeded rsa-crate signer, not AWS-LC");
        assert_eq!(a.len(), id.public().size());
        id.public().verify(b"message", &a, "test").expect("AWS-LC signature verifies with PublicKey::verify");
        id.public().verify(b"message", &b, "test").expect("AWS-LC signature verifies with PublicKey::verify");
        assert!(id.public().verify(b"messagf", &a, "test").is_err());
    }
}

#[test]
fn seeded_signer_reproduces_and_both_signers_interoperate() {
    for id in [&ids()[1], &ids()[4]] {
        let seeded = id.clone().with_seeded_signer();
        assert_eq!(seeded.signer(), Signer::SeededRsaCrate);
        assert_eq!(id.signer(), Signer::AwsLc, "with_seeded_signer must not change the original");
        let s1 = seeded.sign(&mut rng(3), b"vector");
        assert_eq!(s1, seeded.sign(&mut rng(3), b"vector"), "seeded signer reproduces its signature");
        id.public().verify(b"vector", &s1, "test").unwrap();
        // Each implementation's signature verifies with the other implementation's verifier: the salt length
        // (32 = SHA-256 output) and MGF1 hash agree.
        let aws = id.sign(&mut rng(3), b"vector");
        let aws_lc_verifier = UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, id.public().der());
        aws_lc_verifier.verify(b"vector", &s1).expect("AWS-LC verifies the rsa crate's signature");
        aws_lc_verifier.verify(b"vector", &aws).expect("AWS-LC verifies its own signature");
        id.public().verify(b"vector", &aws, "test").expect("rsa crate verifies AWS-LC's signature");
    }
}

#[test]
fn probe_answer_and_tracker_hello_from_a_runtime_identity_verify() {
    let id = &runtime_identities()[1];
    let nonce = [9u8; 32];
    let answer = link::answer_probe(id, &nonce, &mut rng(1));
    assert_eq!(link::verify_probe_answer(&nonce, &answer).unwrap().fingerprint(), id.fingerprint());
    assert_ne!(answer, link::answer_probe(id, &nonce, &mut rng(1)), "probe answers are signed by AWS-LC");
    let tracker_fp = ids()[2].fingerprint();
    let hello = tracker::make_hello(id, &tracker_fp, &nonce, &mut rng(2));
    let anomos_proto::tracker::ToTracker::Hello { public_key, signature } = &hello else { panic!("{hello:?}") };
    let key = tracker::verify_hello(public_key, signature, &tracker_fp, &nonce).unwrap();
    assert_eq!(key.fingerprint(), id.fingerprint());
}
