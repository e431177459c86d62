use super::*;

fn os(kind: ErrorKind, errno: i32) -> BlockError {
    BlockError::with_source(kind, "write at byte 0 of /x", std::io::Error::from_raw_os_error(errno))
}

#[test]
fn a_full_or_refusing_backing_store_gets_its_own_status() {
    let full = os(ErrorKind::WriteFailed, libc::ENOSPC);
    assert!(full.to_string().contains("No space left on device"), "{full}");
    assert_eq!(block_status(&full), Status::CAPACITY_EXCEEDED.with_dnr());
    assert_eq!(
        block_status(&os(ErrorKind::WriteFailed, libc::EDQUOT)),
        Status::CAPACITY_EXCEEDED.with_dnr()
    );
    let denied = os(ErrorKind::ReadFailed, libc::EACCES);
    assert!(denied.to_string().contains("Permission denied"), "{denied}");
    assert_eq!(block_status(&denied), Status::ACCESS_DENIED.with_dnr());
    // Other OS errors keep the status of their kind.
    assert_eq!(
        block_status(&os(ErrorKind::WriteFailed, libc::EIO)),
        Status::WRITE_FAULT
    );
    assert_eq!(
        block_status(&os(ErrorKind::ReadFailed, libc::EIO)),
        Status::UNRECOVERED_READ_ERROR
    );
    assert_eq!(
        block_status(&BlockError::new(ErrorKind::OutOfRange, "past the end")),
        Status::LBA_OUT_OF_RANGE.with_dnr()
    );
}
