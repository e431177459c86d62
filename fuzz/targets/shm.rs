//! Fuzzes `messaging::fuzz::shm` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        messaging::fuzz::shm(data);
    });
}
