//! Entry points for coverage-guided fuzzing: each runs the decoders of one
//! kind of bytes a peer controls on arbitrary input. None may panic, loop
//! or allocate without bound, whatever the input; errors are the expected
//! outcome. `fuzz/` drives them with cargo-afl, and `tests/fuzz_corpus.rs`
//! replays the kept corpus through them in every test run.

use crate::proto::wire::{decode_imm, decode_indication, Grant, Header, Params};

/// A tcp hello (client or answer) and tcp frame headers.
pub fn tcp(data: &[u8]) {
    crate::provider::tcp::decode_untrusted(data);
}

/// An shm hello.
#[cfg(target_os = "linux")]
pub fn shm(data: &[u8]) {
    crate::provider::shm::decode_untrusted(data);
}

/// What the protocol core reads from a peer: the parameter block of its
/// hello, a message header with its slot releases, a transfer indication
/// and an immediate.
pub fn wire(data: &[u8]) {
    if let Ok(p) = Params::decode(data) {
        let _ = p.encode();
    }
    if let Ok(h) = Header::decode(data) {
        let _ = h.payload_offset();
        let _ = h.releases(data).count();
    }
    let _ = decode_indication(data);
    if let Ok(g) = Grant::decode(data) {
        let _ = g.encode();
    }
    if let Some(imm) = data.get(..4) {
        let _ = decode_imm(u32::from_le_bytes([imm[0], imm[1], imm[2], imm[3]]));
    }
}
