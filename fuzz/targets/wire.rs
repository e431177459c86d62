//! Fuzzes `messaging::fuzz::wire` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        messaging::fuzz::wire(data);
    });
}
