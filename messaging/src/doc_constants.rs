//! `docs/protocol.md` states the wire constants twice: in its appendix
//! table, and as `` `NAME` (value) `` where the text uses them. This test
//! reads both from the document (compiled in, so an edit of either side
//! reruns it) and compares them with the code's.

use std::collections::HashMap;

use crate::proto::{self, wire};
use crate::provider::tcp;

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// How the document writes a size: in whole MiB or KiB from 8 KiB up,
/// smaller ones in bytes.
fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 8 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => b.to_string(),
    }
}

fn magic(m: [u8; 4]) -> String {
    format!("`\"{}\"`", String::from_utf8_lossy(&m))
}

/// Every constant the appendix lists, as the document writes its value.
fn code_values() -> Vec<(&'static str, String)> {
    let cfg = proto::Config::default();
    #[allow(unused_mut)]
    let mut values = vec![
        ("`VERSION`", wire::VERSION.to_string()),
        ("`PARAMS_LEN`", wire::PARAMS_LEN.to_string()),
        ("`HEADER_LEN`", wire::HEADER_LEN.to_string()),
        ("`MAX_RELEASES`", wire::MAX_RELEASES.to_string()),
        ("`INDICATION_LEN`", wire::INDICATION_LEN.to_string()),
        ("`GRANT_LEN`", wire::GRANT_LEN.to_string()),
        ("`MAX_INDEX`", format!("{:#x}", wire::MAX_INDEX)),
        ("`MAX_TAG`", format!("{:#x}", wire::MAX_TAG)),
        ("`DIRECT_FLAG`", format!("{:#x}", wire::DIRECT_FLAG)),
        ("`MIN_RECV_DEPTH`", proto::MIN_RECV_DEPTH.to_string()),
        ("`MAX_MSG_SIZE`", size(proto::MAX_MSG_SIZE as usize)),
        (
            "`Config::default()`",
            format!(
                "recv_depth {}, send_depth {} (≥ 2), msg_size {}, slot_size {}, slot_count {}, {} indications",
                cfg.recv_depth,
                cfg.send_depth,
                cfg.msg_size,
                size(cfg.slot_size as usize),
                cfg.slot_count,
                if cfg.separate_indication {
                    "separate"
                } else {
                    "immediate"
                }
            ),
        ),
        ("`HELLO_MAGIC`", magic(tcp::HELLO_MAGIC)),
        ("`HELLO_VERSION`", tcp::HELLO_VERSION.to_string()),
        ("`MAX_PARAMS`", tcp::MAX_PARAMS.to_string()),
        ("`FRAME_HEADER`", tcp::FRAME_HEADER.to_string()),
        ("pending-connection limit", tcp::MAX_PENDING.to_string()),
        ("read-ahead between frames", size(tcp::READ_AHEAD)),
        ("iovecs per write", tcp::MAX_IOVECS.to_string()),
    ];
    #[cfg(target_os = "linux")]
    values.extend([
        ("shm `HELLO_MAGIC`", magic(crate::provider::shm::HELLO_MAGIC)),
        ("shm `HELLO_VERSION`", crate::provider::shm::HELLO_VERSION.to_string()),
    ]);
    #[cfg(feature = "verbs")]
    values.extend([
        ("verbs `MAGIC`", magic(crate::provider::verbs::oob::MAGIC)),
        ("verbs `VERSION`", crate::provider::verbs::oob::VERSION.to_string()),
    ]);
    values
}

/// The appendix table: each name of a row (`A / B` rows name several)
/// with its value, less any parenthesised remark after it.
fn appendix() -> HashMap<String, String> {
    let table = DOC
        .split_once("## Appendix: constants")
        .expect("docs/protocol.md has its constants appendix")
        .1;
    let mut rows = HashMap::new();
    for line in table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| name"))
    {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let [names, values, _where] = cells[..] else {
            panic!("appendix row without three cells: {line}");
        };
        // A value list is split at " / ", unless the row names one thing.
        let names: Vec<&str> = names.split(" / ").collect();
        let values: Vec<&str> = if names.len() == 1 {
            vec![values]
        } else {
            values.split(" / ").collect()
        };
        assert_eq!(names.len(), values.len(), "names and values do not pair up: {line}");
        for (name, value) in names.into_iter().zip(values) {
            let value = value.split(" (bit").next().unwrap_or(value).trim();
            rows.insert(name.to_string(), value.to_string());
        }
    }
    rows
}

#[test]
fn the_appendix_states_the_codes_constants() {
    let doc = appendix();
    let mut wrong = Vec::new();
    for (name, value) in code_values() {
        match doc.get(name) {
            Some(stated) if *stated == value => {}
            Some(stated) => wrong.push(format!("{name}: the document says {stated}, the code {value}")),
            None => wrong.push(format!("{name}: not in the appendix (the code says {value})")),
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/protocol.md is out of date:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_constant_named_in_the_text_has_the_codes_value() {
    let mut wrong = Vec::new();
    let mut seen = 0;
    for (name, value) in code_values() {
        if !name.starts_with('`') {
            continue;
        }
        let mention = format!("{name} (");
        for (at, _) in DOC.match_indices(&mention) {
            // Only the plain mentions: "`NAME` (1)", not "`NAME` (shm)".
            let rest = &DOC[at + mention.len()..];
            let Some(stated) = rest.split_once(')').map(|(v, _)| v) else {
                continue;
            };
            if !stated.starts_with(|c: char| c.is_ascii_digit() || c == '"') {
                continue;
            }
            seen += 1;
            if stated != value {
                wrong.push(format!("{name} ({stated}): the code says {value}"));
            }
        }
    }
    assert!(seen >= 3, "the text's mentions were not found ({seen})");
    assert!(
        wrong.is_empty(),
        "docs/protocol.md is out of date:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn sizes_read_as_the_document_writes_them() {
    assert_eq!(size(1 << 20), "1 MiB");
    assert_eq!(size(16 * 1024), "16 KiB");
    assert_eq!(size(4096), "4096");
    assert_eq!(size(40), "40");
}
