use super::*;

fn exports() -> Vec<Export> {
    vec![
        Export {
            name: "1".into(),
            nsid: Nsid(1),
            size: 64 << 20,
            block_size: 512,
        },
        Export {
            name: "7".into(),
            nsid: Nsid(7),
            size: 1 << 30,
            block_size: 4096,
        },
    ]
}

/// Splits option replies into (option, reply type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(u64::from_be_bytes(be(&b[..8])), OPTION_REPLY_MAGIC);
        let option = u32::from_be_bytes(be(&b[8..12]));
        let kind = u32::from_be_bytes(be(&b[12..16]));
        let len = u32::from_be_bytes(be(&b[16..20])) as usize;
        out.push((option, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    out
}

fn info_request(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn negotiation() -> Negotiation {
    Negotiation::new(false, 32 << 20, None)
}

#[test]
fn the_greeting_is_fixed_newstyle_without_zeroes() {
    let g = greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_client_flags_and_bad_option_headers_end_the_negotiation() {
    let mut n = negotiation();
    assert_eq!(n.handle_client_flags(4), Err(NegotiationError::ClientFlags(4)));
    assert_eq!(n.handle_client_flags(3), Ok(()));
    let mut h = [0u8; OPTION_HEADER_LEN];
    h[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    assert_eq!(n.handle_option_header(&h), Err(NegotiationError::OptionMagic(NBDMAGIC)));
    h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
    h[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    assert_eq!(
        n.handle_option_header(&h),
        Err(NegotiationError::OptionTooLong {
            option: OPT_GO,
            len: MAX_OPTION_LEN + 1
        })
    );
    h[12..16].copy_from_slice(&12u32.to_be_bytes());
    assert_eq!(n.handle_option_header(&h), Ok((OPT_GO, 12)));
}

#[test]
fn list_names_every_namespace_with_a_description() {
    let Step::Continue(out) = negotiation().handle_option(OPT_LIST, &[], &exports()) else {
        panic!("LIST ends nothing");
    };
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    let names: Vec<String> = r[..2]
        .iter()
        .map(|(opt, kind, d)| {
            assert_eq!((*opt, *kind), (OPT_LIST, REP_SERVER));
            let len = u32::from_be_bytes(be(&d[..4])) as usize;
            let desc = String::from_utf8_lossy(&d[4 + len..]).into_owned();
            assert!(desc.starts_with("chanio namespace"), "{desc}");
            String::from_utf8(d[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["1", "7"]);
    assert_eq!((r[2].0, r[2].1), (OPT_LIST, REP_ACK));
    // LIST with data is malformed.
    let Step::Continue(out) = negotiation().handle_option(OPT_LIST, b"x", &exports()) else {
        panic!()
    };
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn go_gives_size_flags_and_block_sizes_then_serves() {
    let mut n = negotiation();
    let step = n.handle_option(OPT_GO, &info_request("7", &[INFO_NAME]), &exports());
    let Step::Serve(out, export) = step else {
        panic!("GO of a known export serves it: {step:?}")
    };
    assert_eq!(export.nsid, Nsid(7));
    let r = replies(&out);
    let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(kinds, [REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    let info = &r[0].2;
    assert_eq!(u16::from_be_bytes(be(&info[..2])), INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(be(&info[2..10])), 1 << 30);
    let flags = u16::from_be_bytes(be(&info[10..12]));
    assert_eq!(flags & TX_READ_ONLY, 0);
    assert_ne!(flags & TX_SEND_FUA, 0);
    assert_ne!(flags & TX_CAN_MULTI_CONN, 0);
    let sizes = &r[1].2;
    assert_eq!(u16::from_be_bytes(be(&sizes[..2])), INFO_BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(be(&sizes[2..6])), 4096);
    assert_eq!(u32::from_be_bytes(be(&sizes[10..14])), 32 << 20);
    assert_eq!(&r[2].2[2..], b"7");
}

#[test]
fn an_empty_name_selects_the_default_namespace() {
    let step = negotiation().handle_option(OPT_GO, &info_request("", &[]), &exports());
    assert!(matches!(step, Step::Serve(_, ref e) if e.nsid == Nsid(1)), "{step:?}");
    let mut n = Negotiation::new(false, 1 << 20, Some(Nsid(7)));
    let step = n.handle_option(OPT_GO, &info_request("", &[]), &exports());
    assert!(matches!(step, Step::Serve(_, ref e) if e.nsid == Nsid(7)), "{step:?}");
    // No namespace at all: unknown, and the message says why.
    let Step::Continue(out) = negotiation().handle_option(OPT_GO, &info_request("", &[]), &[]) else {
        panic!()
    };
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("none is active"));
}

#[test]
fn info_and_go_refuse_unknown_names_and_malformed_data() {
    let mut n = negotiation();
    let Step::Continue(out) = n.handle_option(OPT_INFO, &info_request("3", &[]), &exports()) else {
        panic!()
    };
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("1, 7"), "{:?}", r[0]);
    // INFO of a known name answers and goes on negotiating.
    assert!(matches!(
        n.handle_option(OPT_INFO, &info_request("1", &[]), &exports()),
        Step::Continue(_)
    ));
    let mut bad = info_request("1", &[INFO_NAME]);
    bad.pop();
    for data in [&bad[..], &[0, 0, 0, 9, b'1'][..], &[][..]] {
        let Step::Continue(out) = n.handle_option(OPT_GO, data, &exports()) else {
            panic!("{data:?}")
        };
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "{data:?}");
    }
}

#[test]
fn export_name_answers_in_the_old_form_or_closes() {
    let mut n = negotiation();
    n.handle_client_flags(CLIENT_FIXED_NEWSTYLE).unwrap();
    let Step::Serve(out, e) = n.handle_option(OPT_EXPORT_NAME, b"1", &exports()) else {
        panic!()
    };
    assert_eq!(e.nsid, Nsid(1));
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(be(&out[..8])), 64 << 20);
    let mut n = negotiation();
    n.handle_client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).unwrap();
    let Step::Serve(out, _) = n.handle_option(OPT_EXPORT_NAME, b"", &exports()) else {
        panic!()
    };
    assert_eq!(out.len(), 10);
    assert_eq!(
        n.handle_option(OPT_EXPORT_NAME, b"nope", &exports()),
        Step::Close(Vec::new())
    );
}

#[test]
fn structured_replies_are_acked_once_and_add_do_not_fragment() {
    let mut n = negotiation();
    assert_eq!(n.transmission_flags() & TX_SEND_DF, 0);
    let Step::Continue(out) = n.handle_option(OPT_STRUCTURED_REPLY, &[], &[]) else {
        panic!()
    };
    assert_eq!(replies(&out)[0].1, REP_ACK);
    assert!(n.structured());
    assert_ne!(n.transmission_flags() & TX_SEND_DF, 0);
    let Step::Continue(out) = n.handle_option(OPT_STRUCTURED_REPLY, &[], &[]) else {
        panic!()
    };
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn metadata_contexts_tls_and_unknown_options_get_their_answers() {
    let mut n = negotiation();
    let answer = |n: &mut Negotiation, opt| match n.handle_option(opt, &[], &[]) {
        Step::Continue(out) => replies(&out)[0].1,
        other => panic!("{other:?}"),
    };
    assert_eq!(answer(&mut n, OPT_SET_META_CONTEXT), REP_ERR_INVALID);
    assert_eq!(answer(&mut n, OPT_STARTTLS), REP_ERR_POLICY);
    assert_eq!(answer(&mut n, 99), REP_ERR_UNSUP);
    answer(&mut n, OPT_STRUCTURED_REPLY);
    assert_eq!(answer(&mut n, OPT_SET_META_CONTEXT), REP_ACK);
    assert_eq!(
        n.handle_option(OPT_ABORT, &[], &[]),
        Step::Close(option_reply(OPT_ABORT, REP_ACK, &[]))
    );
}

#[test]
fn read_only_exports_say_so_and_offer_no_trim() {
    let n = Negotiation::new(true, 1 << 20, None);
    let f = n.transmission_flags();
    assert_ne!(f & TX_READ_ONLY, 0);
    assert_eq!(f & (TX_SEND_TRIM | TX_SEND_WRITE_ZEROES), 0);
}

fn req(kind: u16, offset: u64, len: u32) -> Request {
    Request {
        flags: 0,
        kind,
        cookie: 42,
        offset,
        len,
    }
}

#[test]
fn requests_round_trip_and_a_bad_magic_is_refused() {
    let r = Request {
        flags: CMD_FLAG_FUA,
        ..req(CMD_WRITE, 4096, 8192)
    };
    let b = r.encode();
    assert_eq!(Request::parse(&b), Some(r));
    assert_eq!(r.payload(), 8192);
    assert_eq!(req(CMD_READ, 0, 512).payload(), 0);
    let mut bad = b;
    bad[0] ^= 1;
    assert_eq!(Request::parse(&bad), None);
}

#[test]
fn checks_turn_requests_into_block_actions() {
    let e = &exports()[1]; // 4096-byte blocks, 1 GiB
    let max = 1 << 20;
    assert_eq!(
        check(&req(CMD_READ, 8192, 4096), e, false, max),
        Ok(Action::Read { lba: 2, len: 4096 })
    );
    let fua = Request {
        flags: CMD_FLAG_FUA,
        ..req(CMD_WRITE, 0, 8192)
    };
    assert_eq!(
        check(&fua, e, false, max),
        Ok(Action::Write {
            lba: 0,
            len: 8192,
            fua: true
        })
    );
    assert_eq!(
        check(&req(CMD_TRIM, 4096, 8 << 20), e, false, max),
        Ok(Action::Trim { lba: 1, blocks: 2048 })
    );
    assert_eq!(
        check(&req(CMD_WRITE_ZEROES, 0, 4096), e, false, max),
        Ok(Action::WriteZeroes {
            lba: 0,
            blocks: 1,
            fua: false
        })
    );
    assert_eq!(check(&req(CMD_FLUSH, 0, 0), e, false, max), Ok(Action::Flush));
    assert_eq!(check(&req(CMD_DISC, 0, 0), e, false, max), Ok(Action::Disconnect));
}

#[test]
fn checks_refuse_with_the_errors_the_spec_names() {
    let e = &exports()[1];
    let max = 1 << 20;
    let errno = |r: Request, ro: bool| check(&r, e, ro, max).map_err(|x| x.errno);
    assert_eq!(errno(req(CMD_READ, 512, 4096), false), Err(EINVAL), "unaligned offset");
    assert_eq!(errno(req(CMD_WRITE, 0, 1000), false), Err(EINVAL), "partial block");
    assert_eq!(errno(req(CMD_READ, 0, 0), false), Err(EINVAL), "empty read");
    assert_eq!(errno(req(CMD_READ, 0, max + 4096), false), Err(EINVAL), "too long");
    assert_eq!(errno(req(CMD_READ, 1 << 30, 4096), false), Err(EINVAL), "read past end");
    assert_eq!(
        errno(req(CMD_WRITE, 1 << 30, 4096), false),
        Err(ENOSPC),
        "write past end"
    );
    assert_eq!(
        errno(req(CMD_TRIM, (1 << 30) - 4096, 8192), false),
        Err(ENOSPC),
        "trim past end"
    );
    assert_eq!(
        errno(req(CMD_READ, u64::MAX - 4095, 4096), false),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(errno(req(CMD_WRITE, 0, 4096), true), Err(EPERM), "read-only");
    assert_eq!(errno(req(CMD_WRITE_ZEROES, 0, 4096), true), Err(EPERM), "read-only");
    assert_eq!(
        errno(req(CMD_READ, 0, 4096), true),
        Ok(Action::Read { lba: 0, len: 4096 })
    );
    assert_eq!(errno(req(5, 0, 4096), false), Err(EINVAL), "cache");
    assert_eq!(errno(req(99, 0, 0), false), Err(EINVAL), "unknown");
    let m = check(&req(CMD_WRITE, 0, 1000), e, false, max).unwrap_err().message;
    assert!(m.contains("not whole 4096-byte blocks"), "{m}");
}

#[test]
fn nvme_statuses_map_to_nbd_errors() {
    let nvme = |status| HostError::Nvme {
        command: "Write",
        status,
    };
    let write = Action::Write {
        lba: 0,
        len: 512,
        fua: false,
    };
    let read = Action::Read { lba: 0, len: 512 };
    assert_eq!(errno(&nvme(nvme::Status::LBA_OUT_OF_RANGE), &write), ENOSPC);
    assert_eq!(errno(&nvme(nvme::Status::LBA_OUT_OF_RANGE), &read), EINVAL);
    assert_eq!(errno(&nvme(nvme::Status::CAPACITY_EXCEEDED), &write), ENOSPC);
    assert_eq!(errno(&nvme(nvme::Status::INVALID_FIELD), &read), EINVAL);
    assert_eq!(errno(&nvme(nvme::Status::INVALID_OPCODE), &read), ENOTSUP);
    assert_eq!(errno(&nvme(nvme::Status::ACCESS_DENIED), &write), EPERM);
    assert_eq!(errno(&nvme(nvme::Status::UNRECOVERED_READ_ERROR), &read), EIO);
    assert_eq!(errno(&nvme(nvme::Status::WRITE_FAULT), &write), EIO);
    assert_eq!(errno(&nvme(nvme::Status::INTERNAL_ERROR), &write), EIO);
    assert_eq!(errno(&HostError::Closed, &read), ESHUTDOWN);
    let lost = HostError::ConnectionLost {
        uri: "tcp://x".into(),
        waited: std::time::Duration::from_secs(1),
    };
    assert_eq!(errno(&lost, &read), EIO);
    assert_eq!(errno(&HostError::InvalidArgument("x".into()), &read), EINVAL);
}

#[test]
fn replies_encode_as_the_spec_lays_them_out() {
    let s = simple_reply(0x1122, EIO);
    assert_eq!(u32::from_be_bytes(be(&s[..4])), SIMPLE_REPLY_MAGIC);
    assert_eq!(u32::from_be_bytes(be(&s[4..8])), EIO);
    assert_eq!(u64::from_be_bytes(be(&s[8..16])), 0x1122);
    assert_eq!(ok_reply(false, 7, Some((0, 4096))), simple_reply(7, 0).to_vec());
    let r = ok_reply(true, 7, Some((8192, 4096)));
    assert_eq!(r.len(), 28);
    assert_eq!(u32::from_be_bytes(be(&r[..4])), STRUCTURED_REPLY_MAGIC);
    assert_eq!(u16::from_be_bytes(be(&r[4..6])), REPLY_FLAG_DONE);
    assert_eq!(u16::from_be_bytes(be(&r[6..8])), REPLY_TYPE_OFFSET_DATA);
    assert_eq!(u64::from_be_bytes(be(&r[8..16])), 7);
    assert_eq!(u32::from_be_bytes(be(&r[16..20])), 8 + 4096);
    assert_eq!(u64::from_be_bytes(be(&r[20..28])), 8192);
    let n = ok_reply(true, 9, None);
    assert_eq!(n.len(), 20);
    assert_eq!(u16::from_be_bytes(be(&n[6..8])), REPLY_TYPE_NONE);
    let e = error_reply(true, 9, EINVAL, "LBA Out of Range");
    assert_eq!(u16::from_be_bytes(be(&e[6..8])), REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(be(&e[16..20])) as usize, e.len() - 20);
    assert_eq!(u32::from_be_bytes(be(&e[20..24])), EINVAL);
    assert_eq!(u16::from_be_bytes(be(&e[24..26])), 16);
    assert_eq!(&e[26..], b"LBA Out of Range");
    assert_eq!(error_reply(false, 9, EIO, "x"), simple_reply(9, EIO).to_vec());
}
