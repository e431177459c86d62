use proptest::prelude::*;

use super::*;

fn controller() -> IdentifyController {
    IdentifyController {
        vid: 0x1b36,
        ssvid: 0x1af4,
        sn: AsciiField::new("SN-0001").unwrap(),
        mn: AsciiField::new("chanio I/O unit").unwrap(),
        fr: AsciiField::new("0.1.0").unwrap(),
        ieee: [1, 2, 3],
        mdts: 5,
        cntlid: 0x0102,
        ver: IdentifyController::version(2, 0, 0),
        oaes: IdentifyController::OAES_NAMESPACE_ATTRIBUTE,
        ctratt: IdentifyController::CTRATT_HOST_ID_128,
        cntrltype: IdentifyController::CNTRLTYPE_IO,
        acl: 3,
        aerl: 3,
        lpa: IdentifyController::LPA_EXTENDED_DATA,
        elpe: 63,
        kas: 50,
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: 128,
        nn: 32,
        oncs: IdentifyController::ONCS_DATASET_MANAGEMENT | IdentifyController::ONCS_WRITE_ZEROES,
        vwc: IdentifyController::VWC_PRESENT,
        sgls: IdentifyController::SGLS_SUPPORTED | IdentifyController::SGLS_KEYED | IdentifyController::SGLS_OFFSET,
        subnqn: Some(Nqn::new("nqn.2024-01.io.chanio:unit0").unwrap()),
        ioccsz: 4 + 512,
        iorcsz: 1,
        icdoff: 0,
        fcatt: 0,
        msdbd: 1,
        ..IdentifyController::default()
    }
}

#[test]
fn controller_layout_matches_spec() {
    let c = controller();
    let b = c.encode();
    assert_eq!(b.len(), 4096);
    assert_eq!(&b[0..4], &[0x36, 0x1b, 0xf4, 0x1a], "VID, SSVID");
    assert_eq!(&b[4..24], b"SN-0001             ", "SN at 4, space padded");
    assert_eq!(&b[24..39], b"chanio I/O unit", "MN at 24");
    assert_eq!(&b[64..72], b"0.1.0   ", "FR at 64");
    assert_eq!(&b[73..76], &[1, 2, 3], "IEEE at 73");
    assert_eq!(b[77], 5, "MDTS at 77");
    assert_eq!(&b[78..80], &[2, 1], "CNTLID at 78");
    assert_eq!(&b[80..84], &[0, 0, 2, 0], "VER at 80");
    assert_eq!(&b[92..96], &[0, 1, 0, 0], "OAES at 92");
    assert_eq!(b[111], 1, "CNTRLTYPE at 111");
    assert_eq!((b[258], b[259], b[261], b[262]), (3, 3, 4, 63), "ACL, AERL, LPA, ELPE");
    assert_eq!(&b[320..322], &[50, 0], "KAS at 320");
    assert_eq!((b[512], b[513]), (0x66, 0x44), "SQES, CQES");
    assert_eq!(&b[514..516], &[128, 0], "MAXCMD at 514");
    assert_eq!(&b[516..520], &[32, 0, 0, 0], "NN at 516");
    assert_eq!(&b[520..522], &[0x0c, 0], "ONCS at 520: DSM bit 2, Write Zeroes bit 3");
    assert_eq!(b[525], 1, "VWC at 525");
    assert_eq!(&b[536..540], &[0x05, 0, 0x10, 0], "SGLS at 536");
    assert_eq!(&b[768..795], b"nqn.2024-01.io.chanio:unit0", "SUBNQN at 768");
    assert_eq!(b[795], 0);
    assert_eq!(&b[1792..1796], &516u32.to_le_bytes(), "IOCCSZ at 1792");
    assert_eq!(&b[1796..1800], &1u32.to_le_bytes(), "IORCSZ at 1796");
    assert_eq!(b[1803], 1, "MSDBD at 1803");
    assert_eq!(IdentifyController::decode(&b), Ok(c));
}

#[test]
fn controller_decode_checks() {
    assert!(IdentifyController::decode(&[0u8; 4095]).is_err());
    let zero = IdentifyController::decode(&[0u8; 4096]).unwrap();
    assert_eq!(zero.subnqn, None);
    assert_eq!(zero.sn.text(), "");
    let mut bad = controller().encode();
    bad[768..772].copy_from_slice(b"xyz.");
    assert!(matches!(
        IdentifyController::decode(&bad),
        Err(NvmeError::InvalidNqn { .. })
    ));
}

#[test]
fn ascii_fields() {
    let f = AsciiField::<8>::new("abc").unwrap();
    assert_eq!(&f.0, b"abc     ");
    assert_eq!(f.text(), "abc");
    assert_eq!(f.to_string(), "abc");
    assert!(AsciiField::<4>::new("abcde").is_err());
    assert!(AsciiField::<8>::new("é").is_err());
    assert!(AsciiField::<8>::new("a\tb").is_err());
    assert_eq!(AsciiField::<4>([b'a', 0xff, 0, 0]).text(), "a\u{fffd}");
    assert_eq!(AsciiField::<4>([b'a', 0, b'b', b' ']).text(), "a\u{fffd}b");
    assert_eq!(AsciiField::<4>::default().0, [b' '; 4]);
}

#[test]
fn namespace_layout_matches_spec() {
    let mut ns = IdentifyNamespace::new(1 << 20, 4096).unwrap();
    ns.lba_formats.insert(0, LbaFormat::with_block_size(512).unwrap());
    ns.set_formatted_lba_index(1).unwrap();
    ns.dlfeat = IdentifyNamespace::DLFEAT_READ_ZEROES | IdentifyNamespace::DLFEAT_WRITE_ZEROES_DEALLOCATES;
    ns.nguid = [7; 16];
    let b = ns.encode();
    assert_eq!(&b[0..8], &(1u64 << 20).to_le_bytes(), "NSZE at 0");
    assert_eq!(&b[8..16], &(1u64 << 20).to_le_bytes(), "NCAP at 8");
    assert_eq!(&b[16..24], &(1u64 << 20).to_le_bytes(), "NUSE at 16");
    assert_eq!(b[25], 1, "NLBAF at 25 is 0-based");
    assert_eq!(b[26], 1, "FLBAS at 26");
    assert_eq!(b[33], 0x09, "DLFEAT at 33");
    assert_eq!(&b[104..120], &[7; 16], "NGUID at 104");
    assert_eq!(&b[128..132], &[0, 0, 9, 0], "LBAF0 at 128: LBADS 9 in bits 23:16");
    assert_eq!(&b[132..136], &[0, 0, 12, 0], "LBAF1: 4096 bytes");
    let back = IdentifyNamespace::decode(&b).unwrap();
    assert_eq!(back, ns);
    assert_eq!(back.block_size(), Ok(4096));
    assert_eq!(back.size_bytes(), Ok(4 << 30));
}

#[test]
fn lba_formats() {
    assert_eq!(LbaFormat::with_block_size(512).unwrap().lbads, 9);
    assert_eq!(LbaFormat::with_block_size(4096).unwrap().lbads, 12);
    assert!(LbaFormat::with_block_size(256).is_err());
    assert!(LbaFormat::with_block_size(1000).is_err());
    assert!(LbaFormat {
        lbads: 8,
        ..LbaFormat::default()
    }
    .block_size()
    .is_err());
    assert!(LbaFormat {
        lbads: 40,
        ..LbaFormat::default()
    }
    .block_size()
    .is_err());
    let f = LbaFormat {
        ms: 8,
        lbads: 12,
        rp: 2,
    };
    assert_eq!(f.to_dword(), 0x020c_0008);
    assert_eq!(
        LbaFormat::from_dword(0xfe0c_0008),
        LbaFormat {
            ms: 8,
            lbads: 12,
            rp: 2
        }
    );
}

#[test]
fn flbas_index_uses_high_bits() {
    let mut ns = IdentifyNamespace {
        lba_formats: vec![LbaFormat::with_block_size(512).unwrap(); 40],
        flbas: 0x10,
        ..IdentifyNamespace::default()
    };
    ns.set_formatted_lba_index(37).unwrap();
    assert_eq!(ns.flbas, 0x10 | 0x5 | 0x2 << 5);
    assert_eq!(ns.formatted_lba_index(), 37);
    assert!(ns.set_formatted_lba_index(40).is_err());
    ns.lba_formats.truncate(2);
    assert!(ns.current_lba_format().is_err());
    assert!(ns.block_size().is_err());
}

#[test]
fn namespace_decode_checks() {
    assert!(IdentifyNamespace::decode(&[0u8; 100]).is_err());
    let mut b = vec![0u8; IDENTIFY_LEN];
    b[25] = 64;
    assert!(IdentifyNamespace::decode(&b).is_err());
    b[25] = 63;
    assert_eq!(IdentifyNamespace::decode(&b).unwrap().lba_formats.len(), 64);
    let huge = IdentifyNamespace {
        nsze: u64::MAX,
        ..IdentifyNamespace::new(1, 4096).unwrap()
    };
    assert!(huge.size_bytes().is_err());
}

#[test]
fn namespace_lists() {
    let list = NamespaceList::new(vec![Nsid(1), Nsid(2), Nsid(9)]).unwrap();
    let b = list.encode();
    assert_eq!(&b[..16], &[1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(NamespaceList::decode(&b), Ok(list));
    assert!(NamespaceList::new(vec![Nsid(2), Nsid(1)]).is_err());
    assert!(NamespaceList::new(vec![Nsid(1), Nsid(1)]).is_err());
    assert!(NamespaceList::new(vec![Nsid(0)]).is_err());
    assert!(NamespaceList::new(vec![Nsid::BROADCAST]).is_err());
    assert!(NamespaceList::new((1..=1025).map(Nsid).collect()).is_err());
    let mut gap = vec![0u8; IDENTIFY_LEN];
    gap[0] = 1;
    gap[8] = 2;
    assert!(NamespaceList::decode(&gap).is_err());
    let full = NamespaceList::new((1..=1024).map(Nsid).collect()).unwrap();
    assert_eq!(NamespaceList::decode(&full.encode()), Ok(full));
    let after = NamespaceList::active_after([Nsid(5), Nsid(0), Nsid(3), Nsid(7), Nsid(3)], Nsid(3));
    assert_eq!(after.nsids(), &[Nsid(5), Nsid(7)]);
    assert_eq!(
        NamespaceList::active_after((1..5000).map(Nsid), Nsid(0)).nsids().len(),
        1024
    );
}

#[test]
fn identify_command_fields() {
    let sqe = Sqe::identify(CommandId(4), Cns::ActiveNamespaceList, Nsid(0));
    assert_eq!(sqe.opcode, 0x06);
    assert_eq!(sqe.cdw10, 0x02);
    assert_eq!(sqe.identify_cns(), Ok(Cns::ActiveNamespaceList));
    let mut other = sqe;
    other.cdw10 = 0x0003_0099;
    assert_eq!(
        other.identify_cns(),
        Err(NvmeError::Unknown {
            field: "CNS",
            value: 0x99
        })
    );
    assert_eq!(other.identify_cntid(), 3);
    for v in 0..=255u8 {
        if let Some(cns) = Cns::from_u8(v) {
            assert_eq!(u8::from(cns), v);
        }
    }
}

fn any_format() -> impl Strategy<Value = LbaFormat> {
    (any::<u16>(), any::<u8>(), 0u8..4).prop_map(|(ms, lbads, rp)| LbaFormat { ms, lbads, rp })
}

proptest! {
    #[test]
    fn namespace_round_trip(nsze: u64, ncap: u64, nuse: u64, flbas: u8, dlfeat: u8, nvmcap: u128,
                            nguid in proptest::array::uniform16(any::<u8>()),
                            formats in proptest::collection::vec(any_format(), 1..=64)) {
        let ns = IdentifyNamespace { nsze, ncap, nuse, flbas, dlfeat, nvmcap, nguid, lba_formats: formats,
                                     ..IdentifyNamespace::default() };
        prop_assert_eq!(IdentifyNamespace::decode(&ns.encode()), Ok(ns));
    }

    #[test]
    fn controller_round_trip(vid: u16, cntlid: u16, nn: u32, oncs: u16, sgls: u32, ioccsz: u32,
                             sn in "[ -~]{0,20}", sub in proptest::option::of("nqn\\.[a-z0-9.:-]{1,200}")) {
        let c = IdentifyController {
            vid, cntlid, nn, oncs, sgls, ioccsz,
            sn: AsciiField::new(&sn).unwrap(),
            subnqn: sub.map(|s| Nqn::new(s).unwrap()),
            ..IdentifyController::default()
        };
        prop_assert_eq!(IdentifyController::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn list_round_trip(mut ids in proptest::collection::vec(1u32..0xffff_ffff, 0..1024)) {
        ids.sort_unstable();
        ids.dedup();
        let list = NamespaceList::new(ids.into_iter().map(Nsid).collect()).unwrap();
        prop_assert_eq!(NamespaceList::decode(&list.encode()), Ok(list));
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096..=4096)) {
        if let Ok(ns) = IdentifyNamespace::decode(&bytes) {
            let _ = ns.size_bytes();
        }
        if let Ok(c) = IdentifyController::decode(&bytes) {
            let _ = c.sn.text();
        }
        let _ = NamespaceList::decode(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_any_length(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = IdentifyNamespace::decode(&bytes);
        let _ = IdentifyController::decode(&bytes);
        let _ = NamespaceList::decode(&bytes);
    }
}
