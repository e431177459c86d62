use proptest::prelude::*;

use super::*;

fn sample() -> Sqe {
    Sqe {
        opcode: 0x02,
        flags: 0x40,
        command_id: CommandId(0xbeef),
        nsid: Nsid(0x0102_0304),
        cdw2: 0x1111_1111,
        cdw3: 0x2222_2222,
        metadata_pointer: 0x3333_3333_3333_3333,
        data_pointer: DataPointer::from_prp(0x4444, 0x5555),
        cdw10: 0xa0a0_a0a0,
        cdw11: 0xa1a1_a1a1,
        cdw12: 0xa2a2_a2a2,
        cdw13: 0xa3a3_a3a3,
        cdw14: 0xa4a4_a4a4,
        cdw15: 0xa5a5_a5a5,
    }
}

#[test]
fn layout_matches_spec() {
    let b = sample().encode();
    assert_eq!(b[0], 0x02, "opcode at byte 0");
    assert_eq!(b[1], 0x40, "flags at byte 1");
    assert_eq!(&b[2..4], &[0xef, 0xbe], "command id at bytes 2..4");
    assert_eq!(&b[4..8], &[4, 3, 2, 1], "NSID at bytes 4..8");
    assert_eq!(&b[8..12], &[0x11; 4], "CDW2");
    assert_eq!(&b[12..16], &[0x22; 4], "CDW3");
    assert_eq!(&b[16..24], &[0x33; 8], "MPTR");
    assert_eq!(&b[24..32], &0x4444u64.to_le_bytes(), "PRP1 at 24..32");
    assert_eq!(&b[32..40], &0x5555u64.to_le_bytes(), "PRP2 at 32..40");
    for (i, fill) in [0xa0u8, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5].into_iter().enumerate() {
        assert_eq!(&b[40 + 4 * i..44 + 4 * i], &[fill; 4], "CDW{}", 10 + i);
    }
    assert_eq!(Sqe::decode(&b), Ok(sample()));
}

#[test]
fn sgl_type_byte_lands_at_39() {
    let mut sqe = Sqe::new(IoOpcode::Write.into(), CommandId(1));
    sqe.set_sgl(&Sgl::KeyedDataBlock {
        addr: 0x1000,
        len: 512,
        key: 7,
    })
    .unwrap();
    let b = sqe.encode();
    assert_eq!(b[39], 0x40, "SGL identifier at byte 39");
    assert_eq!(&b[24..32], &0x1000u64.to_le_bytes());
    assert_eq!(b[1] >> 6, 0b01, "PSDT 01b");
    assert_eq!(
        Sqe::decode(&b).unwrap().sgl(),
        Ok(Sgl::KeyedDataBlock {
            addr: 0x1000,
            len: 512,
            key: 7
        })
    );
}

#[test]
fn wrong_lengths_are_refused() {
    let e = Sqe::decode(&[0u8; 63]).unwrap_err();
    assert_eq!(e.to_string(), "command capsule is 63 bytes, expected 64");
    assert!(Sqe::decode(&[0u8; 65]).is_err());
    assert!(Sqe::decode(&[]).is_err());
}

#[test]
fn flags_fields() {
    let mut sqe = Sqe::default();
    assert_eq!(sqe.fuse(), Ok(Fuse::Normal));
    assert_eq!(sqe.psdt(), Ok(Psdt::Prp));
    sqe.set_fuse(Fuse::Second);
    sqe.set_psdt(Psdt::SglMetadataSegment);
    assert_eq!(sqe.flags, 0b1000_0010);
    assert_eq!(sqe.fuse(), Ok(Fuse::Second));
    assert_eq!(sqe.psdt(), Ok(Psdt::SglMetadataSegment));
    sqe.flags = 0xff;
    assert_eq!(
        sqe.fuse(),
        Err(NvmeError::Reserved {
            field: "FUSE",
            value: 3
        })
    );
    assert_eq!(
        sqe.psdt(),
        Err(NvmeError::Reserved {
            field: "PSDT",
            value: 3
        })
    );
    assert!(sqe.sgl().is_err());
    // PRP commands have no SGL to read.
    let prp = Sqe::default();
    assert!(matches!(prp.sgl(), Err(NvmeError::InvalidField { field: "PSDT", .. })));
}

#[test]
fn io_fields() {
    let mut sqe = Sqe::read(CommandId(3), Nsid(1), 0x1_2345_6789, 8).unwrap();
    assert_eq!(sqe.opcode, 0x02);
    assert_eq!(sqe.cdw10, 0x2345_6789);
    assert_eq!(sqe.cdw11, 0x1);
    assert_eq!(sqe.slba(), 0x1_2345_6789);
    assert_eq!(sqe.nlb(), 7);
    assert_eq!(sqe.block_count(), 8);
    assert!(!sqe.fua());
    sqe.set_fua(true);
    assert_eq!(sqe.cdw12, 1 << 30 | 7);
    assert!(sqe.fua());
    sqe.set_block_count(65536).unwrap();
    assert_eq!(sqe.nlb(), 0xffff);
    assert!(sqe.fua(), "NLB update keeps the other CDW12 bits");
    assert!(sqe.set_block_count(0).is_err());
    assert!(sqe.set_block_count(65537).is_err());
    assert_eq!(Sqe::write(CommandId(1), Nsid(1), 0, 1).unwrap().opcode, 0x01);
    let mut wz = Sqe::write_zeroes(CommandId(1), Nsid(1), 0, 1).unwrap();
    assert_eq!(wz.opcode, 0x08);
    wz.set_write_zeroes_deallocate(true);
    assert_eq!(wz.cdw12, 1 << 25);
    assert!(wz.write_zeroes_deallocate());
    assert_eq!(Sqe::flush(CommandId(1), Nsid(9)).nsid, Nsid(9));
}

#[test]
fn dsm_fields() {
    let sqe = Sqe::dataset_management(CommandId(1), Nsid(1), 256, true).unwrap();
    assert_eq!(sqe.opcode, 0x09);
    assert_eq!(sqe.cdw10, 0xff);
    assert_eq!(sqe.cdw11, 0x4);
    assert_eq!(sqe.dsm_range_count(), 256);
    assert!(sqe.dsm_deallocate());
    assert!(Sqe::dataset_management(CommandId(1), Nsid(1), 0, true).is_err());
    assert!(Sqe::dataset_management(CommandId(1), Nsid(1), 257, true).is_err());
    let r = DsmRange {
        context_attributes: 1,
        block_count: 2,
        slba: 3,
    };
    let b = r.encode();
    assert_eq!(&b[4..8], &2u32.to_le_bytes());
    assert_eq!(&b[8..16], &3u64.to_le_bytes());
    let list = DsmRange::encode_list(&[r, r]);
    assert_eq!(DsmRange::decode_list(&list, 2), Ok(vec![r, r]));
    assert!(DsmRange::decode_list(&list, 3).is_err());
}

#[test]
fn admin_helpers() {
    let abort = Sqe::abort(CommandId(1), 4, CommandId(0x1234));
    assert_eq!(abort.opcode, 0x08);
    assert_eq!(abort.cdw10, 0x1234_0004);
    assert_eq!(abort.abort_target(), (4, CommandId(0x1234)));
    assert_eq!(Sqe::keep_alive(CommandId(1)).opcode, 0x18);
    assert_eq!(Sqe::async_event_request(CommandId(1)).opcode, 0x0c);
}

#[test]
fn opcodes() {
    for v in 0..=255u8 {
        if let Some(op) = AdminOpcode::from_u8(v) {
            assert_eq!(u8::from(op), v);
            assert!(!op.name().is_empty());
        }
        if let Some(op) = IoOpcode::from_u8(v) {
            assert_eq!(u8::from(op), v);
        }
    }
    assert_eq!(AdminOpcode::from_u8(0x7f), Some(AdminOpcode::Fabrics));
    assert_eq!(AdminOpcode::from_u8(0x03), None);
    assert_eq!(IoOpcode::from_u8(0x09), Some(IoOpcode::DatasetManagement));
    assert_eq!(IoOpcode::from_u8(0x05), None);
    assert!(IoOpcode::Write.is_host_to_controller());
    assert!(IoOpcode::Read.is_controller_to_host());
    assert!(IoOpcode::DatasetManagement.is_host_to_controller());
    assert!(!IoOpcode::Flush.is_host_to_controller());
}

proptest! {
    #[test]
    fn decode_encode_is_identity(bytes in proptest::array::uniform32(any::<u8>()),
                                 more in proptest::array::uniform32(any::<u8>())) {
        let mut b = [0u8; SQE_LEN];
        b[..32].copy_from_slice(&bytes);
        b[32..].copy_from_slice(&more);
        let sqe = Sqe::decode(&b).unwrap();
        prop_assert_eq!(sqe.encode(), b);
        let _ = sqe.fuse();
        let _ = sqe.psdt();
        let _ = sqe.sgl();
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..130), count: u16) {
        let _ = Sqe::decode(&bytes);
        let _ = DsmRange::decode(&bytes);
        let _ = DsmRange::decode_list(&bytes, count);
    }

    #[test]
    fn io_fields_round_trip(slba: u64, blocks in 1u32..=65536, fua: bool) {
        let mut sqe = Sqe::write(CommandId(1), Nsid(1), slba, blocks).unwrap();
        sqe.set_fua(fua);
        let d = Sqe::decode(&sqe.encode()).unwrap();
        prop_assert_eq!(d.slba(), slba);
        prop_assert_eq!(d.block_count(), blocks);
        prop_assert_eq!(d.fua(), fua);
    }
}
