//! Writes the seed inputs of every target into `seeds/TARGET/`: valid
//! messages of each format, made with the crates' own encoders, from which
//! the fuzzer mutates. Run once before a first `cargo afl fuzz`.

use std::path::Path;

use iounit::nvme::{
    ChangedNamespaceList, CommandId, Connect, ConnectData, Cqe, DsmRange, ErrorLogEntry, GetLogPage, HostId,
    IdentifyController, IdentifyNamespace, LogPageId, NamespaceList, Nqn, Nsid, Sgl, Sqe, Status,
};
use iounit::transport;
use messaging::mr::RKey;
use messaging::proto::wire::{encode_imm, encode_indication, Grant, Header, Kind, Params, Target, HEADER_LEN};

fn hello(magic: &[u8; 4], version: u16, kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn frame_header(opcode: u8, len: u32, psn: u64, addr: u64, rkey: u32, imm: u32, ack: u64) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = opcode;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&psn.to_le_bytes());
    h[16..24].copy_from_slice(&addr.to_le_bytes());
    h[24..28].copy_from_slice(&rkey.to_le_bytes());
    h[28..32].copy_from_slice(&imm.to_le_bytes());
    h[32..40].copy_from_slice(&ack.to_le_bytes());
    h
}

/// An NBD option as a client sends it.
fn nbd_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = b"IHAVEOPT".to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_OPT_GO/INFO data for `name`, asking for the items `info`.
fn nbd_go(name: &str, info: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(info.len() as u16).to_be_bytes());
    info.iter().for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
    d
}

/// An NBD request header, and its payload for a write.
fn nbd_request(flags: u16, kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&0x1122_3344u64.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    if kind == 1 {
        out.extend(std::iter::repeat_n(0x5a, len as usize));
    }
    out
}

/// NBD sessions: client flags, options, requests.
fn nbd_sessions() -> Vec<Vec<u8>> {
    let requests: Vec<u8> = [
        nbd_request(0, 0, 4096, 4096),
        nbd_request(1, 1, 0, 1024),
        nbd_request(0, 3, 0, 0),
        nbd_request(0, 4, 512, 8192),
        nbd_request(1, 6, 0, 4096),
        nbd_request(0, 2, 0, 0),
    ]
    .concat();
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend(nbd_option(8, &[]));
    go.extend(nbd_option(7, &nbd_go("1", &[1, 2, 3])));
    go.extend_from_slice(&requests);
    let mut old = 1u32.to_be_bytes().to_vec();
    old.extend(nbd_option(1, b"2"));
    old.extend_from_slice(&requests);
    let mut list = 0x8000_0003u32.to_be_bytes().to_vec();
    list.extend(nbd_option(3, &[]));
    list.extend(nbd_option(6, &nbd_go("2", &[])));
    list.extend(nbd_option(10, &[]));
    list.extend(nbd_option(5, &[]));
    list.extend(nbd_option(7, &nbd_go("", &[])));
    list.extend_from_slice(&requests);
    let mut abort = 3u32.to_be_bytes().to_vec();
    abort.extend(nbd_option(6, &nbd_go("9", &[])));
    abort.extend(nbd_option(2, &[]));
    vec![go, old, list, abort]
}

fn params() -> Params {
    Params {
        recv_depth: 40,
        msg_size: 4160,
        slot_count: 32,
        slot_size: 128 * 1024,
        slot_addr: 0x7f00_0000_0000,
        slot_rkey: RKey(0x1234_5678),
        separate_indication: false,
    }
}

fn message(kind: Kind, releases: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    Header {
        kind,
        credits: 3,
        releases: releases.len() as u16,
        seq: 7,
        len: payload.len() as u32,
    }
    .encode(&mut out);
    for r in releases {
        out.extend_from_slice(&r.to_le_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn capsule(sqe: &Sqe, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    transport::encode_capsule(sqe, data, &mut out).expect("capsule");
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let p = params().encode();
    for kind in 1..=3 {
        seeds.push(("tcp", hello(b"CHIO", 2, kind, &p)));
        seeds.push(("shm", hello(b"CHSM", 3, kind, &p)));
    }
    seeds.push(("tcp", hello(b"CHIO", 2, 3, b"too many pending connections")));
    for op in 1..=8u8 {
        seeds.push(("tcp", frame_header(op, 4096, 9, 0x1000, 0xdead, 0x0102_0304, 5)));
    }
    seeds.push(("wire", p.to_vec()));
    seeds.push(("wire", message(Kind::Data, &[], b"hello")));
    seeds.push(("wire", message(Kind::Control, &[1, 2, 3], b"")));
    seeds.push((
        "wire",
        message(Kind::Indication, &[], &encode_indication(Target::Slot(4), 4096)),
    ));
    seeds.push(("wire", encode_indication(Target::Direct(9), 512).to_vec()));
    let grant = Grant {
        recv_depth: 72,
        slot_count: 32,
        slot_size: 128 * 1024,
        slot_rkey: messaging::mr::RKey(0x1234),
        slot_addr: 0x7f00_0000_1000,
    };
    seeds.push(("wire", message(Kind::Grant, &[], &grant.encode())));
    seeds.push(("wire", grant.encode().to_vec()));
    seeds.push(("wire", encode_imm(Target::Slot(1), 77).to_le_bytes().to_vec()));

    let connect = Connect::new(0, 32, 10_000).expect("connect");
    let sqe = connect
        .to_sqe(CommandId(0), &Sgl::DataBlockOffset { offset: 0, len: 1024 })
        .expect("connect sqe");
    let data = ConnectData {
        host_id: HostId([7; 16]),
        cntlid: ConnectData::CNTLID_DYNAMIC,
        subnqn: Nqn::new("nqn.2026-11.io.chanio:iounit").expect("nqn"),
        hostnqn: Nqn::new("nqn.2026-12.io.chanio:fuzz").expect("nqn"),
    }
    .encode();
    seeds.push(("capsule", capsule(&sqe, &data)));
    let mut read = Sqe::read(CommandId(3), Nsid(1), 100, 8).expect("read");
    read.set_sgl(&Sgl::KeyedDataBlock {
        addr: 0x1000,
        len: 4096,
        key: 0x42,
    })
    .expect("sgl");
    seeds.push(("capsule", capsule(&read, &[])));
    let mut write = Sqe::write(CommandId(4), Nsid(1), 8, 1).expect("write");
    write
        .set_sgl(&Sgl::DataBlockOffset { offset: 0, len: 512 })
        .expect("sgl");
    seeds.push(("capsule", capsule(&write, &[0xa5; 512])));
    let mut pushed = Sqe::write(CommandId(5), Nsid(1), 8, 256).expect("write");
    pushed.set_sgl(&Sgl::TransportDataBlock { len: 131072 }).expect("sgl");
    seeds.push(("capsule", capsule(&pushed, &[])));
    let ranges = DsmRange::encode_list(&[DsmRange {
        context_attributes: 0,
        block_count: 8,
        slba: 64,
    }]);
    let mut dsm = Sqe {
        opcode: 0x09,
        nsid: Nsid(1),
        ..Sqe::default()
    };
    dsm.set_sgl(&Sgl::DataBlockOffset {
        offset: 0,
        len: ranges.len() as u32,
    })
    .expect("sgl");
    seeds.push(("capsule", capsule(&dsm, &ranges)));
    let log = GetLogPage::new(LogPageId::ChangedNamespaceList, 4096).expect("log");
    seeds.push(("capsule", capsule(&log.to_sqe(CommandId(6), Nsid::BROADCAST), &[])));

    seeds.push(("host_data", Cqe::new(CommandId(3), Status::SUCCESS).encode().to_vec()));
    seeds.push((
        "host_data",
        Cqe::new(CommandId(3), Status::LBA_OUT_OF_RANGE).encode().to_vec(),
    ));
    seeds.push(("host_data", IdentifyController::default().encode()));
    seeds.push(("host_data", IdentifyNamespace::new(1 << 20, 4096).expect("ns").encode()));
    seeds.push((
        "host_data",
        NamespaceList::new(vec![Nsid(1), Nsid(2)]).expect("list").encode(),
    ));
    seeds.push((
        "host_data",
        ErrorLogEntry::encode_list(&[ErrorLogEntry::new(1, 1, CommandId(2), Status::WRITE_FAULT)]),
    ));
    seeds.push((
        "host_data",
        ChangedNamespaceList::new(vec![Nsid(3)]).expect("list").encode(),
    ));

    for session in nbd_sessions() {
        seeds.push(("nbd", session));
    }

    let mut counts = std::collections::BTreeMap::new();
    for (target, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        let n = counts.entry(target).or_insert(0);
        *n += 1;
        std::fs::write(dir.join(format!("seed-{n:02}")), bytes).expect("seed file");
    }
    for (target, n) in counts {
        println!("{target}: {n} seeds");
    }
}
