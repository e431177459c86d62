//! Entry points for coverage-guided fuzzing: each runs the decoders of one
//! kind of bytes a peer controls on arbitrary input. None may panic, loop
//! or allocate without bound, whatever the input; errors are the expected
//! outcome. `fuzz/` drives them with cargo-afl, and `tests/fuzz_corpus.rs`
//! replays the kept corpus through them in every test run.

use crate::nvme::{
    AdminOpcode, ChangedNamespaceList, Connect, ConnectData, DsmRange, ErrorLogEntry, GetLogPage, IdentifyController,
    IdentifyNamespace, IoOpcode, NamespaceList, PropertyGet, PropertySet,
};
use crate::transport;

/// A command capsule as the I/O unit reads it, and what a command carries:
/// its descriptor, a Connect with its data, property and log commands,
/// Dataset Management ranges.
pub fn capsule(data: &[u8]) {
    let Ok((sqe, inline)) = transport::decode_capsule(data) else {
        return;
    };
    let _ = (AdminOpcode::from_u8(sqe.opcode), IoOpcode::from_u8(sqe.opcode));
    let _ = (sqe.slba(), sqe.block_count(), sqe.fua(), transport::transfer_tag(&sqe));
    let _ = sqe.sgl();
    let _ = sqe.fabrics_command_type();
    let _ = Connect::from_sqe(&sqe);
    let _ = PropertyGet::from_sqe(&sqe);
    let _ = PropertySet::from_sqe(&sqe);
    let _ = GetLogPage::from_sqe(&sqe);
    let _ = ConnectData::decode(inline);
    let _ = DsmRange::decode_list(inline, sqe.dsm_range_count());
}

/// What a host reads from an I/O unit: a response capsule, and the data of
/// Identify and Get Log Page.
pub fn host_data(data: &[u8]) {
    let _ = transport::decode_response(data);
    let _ = IdentifyController::decode(data);
    let _ = IdentifyNamespace::decode(data);
    let _ = NamespaceList::decode(data);
    let _ = ErrorLogEntry::decode_list(data);
    let _ = ChangedNamespaceList::decode(data);
    let _ = nvme::NamespaceIds::decode(data);
}
