//! Fuzzes the Bitcoin wire layer: `btc::Envelope::decode`, `Envelope::message`, `btc::decode_message`,
//! `Message::decode_payload` and the streaming `EnvelopeReader`, on the regtest magic.
//!
//! Input: byte 0 selects the mode (mod 3), the rest is the payload.
//! * 0: wire bytes. `Envelope::decode`; a decoded envelope re-encodes to exactly the bytes it consumed, its
//!   message (if it decodes) survives encode→decode, and `decode_message` agrees with decode + `message()`.
//! * 1: payload[0] picks one of `MODELED_COMMANDS`, payload[1..] is that command's payload, decoded directly
//!   with `Message::decode_payload` (reaching the payload decoders without a valid checksum); a decoded message
//!   survives encode→decode and keeps its command.
//! * 2: payload[0] is a chunk size; the rest is pushed into an `EnvelopeReader` in such chunks. The envelopes
//!   it yields must be exactly those that repeated `Envelope::decode` finds in the whole stream, and an error
//!   from one must be an error from the other.

#![no_main]

use anomos_proto::btc::{decode_message, Envelope, EnvelopeReader, Message, NetParams, MODELED_COMMANDS};
use anomos_proto_fuzz::mode;
use libfuzzer_sys::fuzz_target;

fn check_message(msg: &Message, command: &str) {
    assert_eq!(msg.command(), command);
    let again = Message::decode_payload(command, &msg.encode_payload());
    assert_eq!(again.as_ref(), Ok(msg), "{command}: encode/decode round trip");
}

/// Every envelope repeated `Envelope::decode` finds at the start of `stream`, and how it ended.
fn decode_all(stream: &[u8], magic: [u8; 4]) -> (Vec<Envelope>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match Envelope::decode(&stream[at..], magic) {
            Ok(Some((env, used))) => {
                assert!(used >= 24 && at + used <= stream.len());
                at += used;
                out.push(env);
            }
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let magic = NetParams::regtest().magic;
    let (m, rest) = mode(data);
    match m % 3 {
        0 => {
            let res = Envelope::decode(rest, magic);
            let dm = decode_message(rest, magic);
            match &res {
                Ok(Some((env, used))) => {
                    assert_eq!(env.encode(), &rest[..*used], "re-encoding an envelope changed it");
                    let msg = env.message();
                    match (&msg, &dm) {
                        (Ok(msg), Ok(Some((m2, u2)))) => {
                            assert_eq!((msg, used), (m2, u2));
                            check_message(msg, &env.command);
                            let wire = msg.to_envelope(magic).encode();
                            assert_eq!(decode_message(&wire, magic), Ok(Some((msg.clone(), wire.len()))));
                        }
                        (Err(_), Err(_)) => {}
                        _ => panic!("Envelope::message {msg:?} vs decode_message {dm:?}"),
                    }
                }
                Ok(None) => assert_eq!(dm, Ok(None)),
                Err(_) => assert!(dm.is_err()),
            }
        }
        1 => {
            let Some((&pick, payload)) = rest.split_first() else { return };
            let command = MODELED_COMMANDS[pick as usize % MODELED_COMMANDS.len()];
            if let Ok(msg) = Message::decode_payload(command, payload) {
                check_message(&msg, command);
            }
        }
        _ => {
            let Some((&chunk, stream)) = rest.split_first() else { return };
            let chunk = chunk as usize + 1;
            let (want, want_err) = decode_all(stream, magic);
            let mut reader = EnvelopeReader::new(magic);
            let mut got = Vec::new();
            let mut err = false;
            'feed: for piece in stream.chunks(chunk) {
                let mut piece = piece;
                while !piece.is_empty() {
                    let n = reader.push(piece);
                    piece = &piece[n..];
                    loop {
                        match reader.next() {
                            Ok(Some(env)) => got.push(env),
                            Ok(None) => break,
                            Err(_) => {
                                err = true;
                                break 'feed;
                            }
                        }
                    }
                }
            }
            if !err {
                // Drain anything complete that the last push left buffered.
                while let Ok(Some(env)) = reader.next() {
                    got.push(env);
                }
                err = reader.next().is_err();
            }
            assert_eq!(got, want, "EnvelopeReader disagrees with Envelope::decode");
            assert_eq!(err, want_err, "error in one and not the other");
        }
    }
});
