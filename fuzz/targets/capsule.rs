//! Fuzzes `iounit::fuzz::capsule` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        iounit::fuzz::capsule(data);
    });
}
