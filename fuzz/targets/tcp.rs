//! Fuzzes `messaging::fuzz::tcp` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        messaging::fuzz::tcp(data);
    });
}
