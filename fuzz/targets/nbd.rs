//! Fuzzes `host::nbd::fuzz` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        host::nbd::fuzz(data);
    });
}
