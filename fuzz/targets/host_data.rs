//! Fuzzes `iounit::fuzz::host_data` (cargo afl fuzz; see ../README.md).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        iounit::fuzz::host_data(data);
    });
}
