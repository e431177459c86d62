//! The NBD protocol's rules, with no I/O: the fixed newstyle negotiation
//! (options in, replies out), request headers, the checks a request must
//! pass, and the reply encodings. The server in [`super`] moves the bytes.
//!
//! Every integer on the wire is big-endian, as NBD defines it.

use crate::{HostError, Nsid};
use nvme::status::StatusCodeType;

/// The server's first eight bytes.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle greeting's second word, and each option's magic.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Each option reply's magic.
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information items of NBD_REP_INFO.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
const TX_HAS_FLAGS: u16 = 1 << 0;
const TX_READ_ONLY: u16 = 1 << 1;
const TX_SEND_FLUSH: u16 = 1 << 2;
const TX_SEND_FUA: u16 = 1 << 3;
const TX_SEND_TRIM: u16 = 1 << 5;
const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TX_SEND_DF: u16 = 1 << 7;
const TX_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
/// Command flags.
const CMD_FLAG_FUA: u16 = 1 << 0;

/// Structured reply chunk types and flags.
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// NBD's error numbers (the wire values, whatever the platform's are).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const ENOMEM: u32 = 12;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const ENOTSUP: u32 = 95;
pub(crate) const ESHUTDOWN: u32 = 108;

/// Bytes of the server's greeting.
pub(crate) const GREETING_LEN: usize = 18;
/// Bytes of an option's header: magic, option, length.
pub(crate) const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// The longest option data taken: the spec caps names and queries at 4 KiB
/// each; a longer option closes the connection.
pub(crate) const MAX_OPTION_LEN: u32 = 16 * 1024;
/// The longest name or description sent or taken (the spec's limit).
const MAX_STRING: usize = 4096;

/// One namespace as an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Export {
    pub name: String,
    pub nsid: Nsid,
    pub size: u64,
    pub block_size: u32,
}

impl Export {
    fn description(&self) -> String {
        format!(
            "chanio namespace {}: {} blocks of {} bytes",
            self.nsid.0,
            self.size / u64::from(self.block_size.max(1)),
            self.block_size
        )
    }
}

/// The server's greeting: magic, IHAVEOPT, and the handshake flags.
pub(crate) fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the negotiation does after an option.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send these bytes and read the next option.
    Continue(Vec<u8>),
    /// Send these bytes, then serve `Export` (transmission phase).
    Serve(Vec<u8>, Export),
    /// Send these bytes, then close the connection.
    Close(Vec<u8>),
}

/// A negotiation that broke the protocol: the connection closes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum NegotiationError {
    #[error("client flags {0:#x} include bits this server does not know")]
    ClientFlags(u32),
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN} allowed")]
    OptionTooLong { option: u32, len: u32 },
}

/// The negotiation of one connection: what the client asked for so far.
#[derive(Debug)]
pub(crate) struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    read_only: bool,
    max_payload: u32,
    /// The export an empty name selects.
    default_ns: Option<Nsid>,
}

impl Negotiation {
    pub(crate) fn new(read_only: bool, max_payload: u32, default_ns: Option<Nsid>) -> Negotiation {
        Negotiation {
            no_zeroes: false,
            structured: false,
            read_only,
            max_payload,
            default_ns,
        }
    }

    /// Takes the client's flags (the four bytes after the greeting).
    pub(crate) fn handle_client_flags(&mut self, flags: u32) -> Result<(), NegotiationError> {
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(NegotiationError::ClientFlags(flags));
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// Checks an option header; returns the option and its data length.
    pub(crate) fn handle_option_header(
        &self,
        header: &[u8; OPTION_HEADER_LEN],
    ) -> Result<(u32, u32), NegotiationError> {
        let magic = u64::from_be_bytes(be(&header[..8]));
        if magic != IHAVEOPT {
            return Err(NegotiationError::OptionMagic(magic));
        }
        let option = u32::from_be_bytes(be(&header[8..12]));
        let len = u32::from_be_bytes(be(&header[12..16]));
        if len > MAX_OPTION_LEN {
            return Err(NegotiationError::OptionTooLong { option, len });
        }
        Ok((option, len))
    }

    /// Whether structured replies were negotiated.
    pub(crate) fn structured(&self) -> bool {
        self.structured
    }

    /// The transmission flags of every export.
    pub(crate) fn transmission_flags(&self) -> u16 {
        let mut flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TX_READ_ONLY;
        } else {
            flags |= TX_SEND_TRIM | TX_SEND_WRITE_ZEROES;
        }
        if self.structured {
            // Reads always go in one chunk, so "don't fragment" holds.
            flags |= TX_SEND_DF;
        }
        flags
    }

    /// Answers one option with `data`, given the exports there are now.
    pub(crate) fn handle_option(&mut self, option: u32, data: &[u8], exports: &[Export]) -> Step {
        match option {
            OPT_EXPORT_NAME => match self.find(data, exports) {
                Some(e) => {
                    let mut out = Vec::with_capacity(134);
                    out.extend_from_slice(&e.size.to_be_bytes());
                    out.extend_from_slice(&self.transmission_flags().to_be_bytes());
                    if !self.no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    Step::Serve(out, e.clone())
                }
                // No way to say "unknown" to this option: the spec says close.
                None => Step::Close(Vec::new()),
            },
            OPT_ABORT => Step::Close(option_reply(option, REP_ACK, &[])),
            OPT_LIST if !data.is_empty() => {
                Step::Continue(option_error(option, REP_ERR_INVALID, "NBD_OPT_LIST carries no data"))
            }
            OPT_LIST => {
                let mut out = Vec::new();
                for e in exports {
                    let desc = e.description();
                    let mut item = Vec::with_capacity(4 + e.name.len() + desc.len());
                    item.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    item.extend_from_slice(e.name.as_bytes());
                    item.extend_from_slice(desc.as_bytes());
                    out.extend(option_reply(option, REP_SERVER, &item));
                }
                out.extend(option_reply(option, REP_ACK, &[]));
                Step::Continue(out)
            }
            OPT_STARTTLS => Step::Continue(option_error(
                option,
                REP_ERR_POLICY,
                "this bridge offers no TLS: serve it on a unix socket or a trusted network",
            )),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports),
            OPT_STRUCTURED_REPLY if !data.is_empty() => Step::Continue(option_error(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY carries no data",
            )),
            OPT_STRUCTURED_REPLY if self.structured => Step::Continue(option_error(
                option,
                REP_ERR_INVALID,
                "structured replies are already on",
            )),
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                Step::Continue(option_reply(option, REP_ACK, &[]))
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT if !self.structured => Step::Continue(option_error(
                option,
                REP_ERR_INVALID,
                "metadata contexts need structured replies first",
            )),
            // No metadata context is offered: an empty answer.
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => Step::Continue(option_reply(option, REP_ACK, &[])),
            _ => Step::Continue(option_error(
                option,
                REP_ERR_UNSUP,
                &format!("option {option} is not supported"),
            )),
        }
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: `u32` name length, name, `u16` count of
    /// information requests, and the requests.
    fn info_or_go(&mut self, option: u32, data: &[u8], exports: &[Export]) -> Step {
        let Some((name, requests)) = parse_info_request(data) else {
            return Step::Continue(option_error(
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO request",
            ));
        };
        let Some(export) = self.find(name, exports) else {
            return Step::Continue(option_error(
                option,
                REP_ERR_UNKNOWN,
                &format!(
                    "no export {:?}: the names are the namespace IDs ({})",
                    String::from_utf8_lossy(name),
                    names(exports)
                ),
            ));
        };
        let mut out = Vec::new();
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&self.transmission_flags().to_be_bytes());
        out.extend(option_reply(option, REP_INFO, &info));
        // Block sizes go whether asked for or not (the spec allows it):
        // requests must be whole blocks of the namespace.
        let mut sizes = Vec::with_capacity(14);
        sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        sizes.extend_from_slice(&export.block_size.to_be_bytes());
        sizes.extend_from_slice(&export.block_size.max(4096).to_be_bytes());
        sizes.extend_from_slice(&self.max_payload.to_be_bytes());
        out.extend(option_reply(option, REP_INFO, &sizes));
        for item in requests {
            let text = match item {
                INFO_NAME => export.name.clone(),
                INFO_DESCRIPTION => export.description(),
                _ => continue,
            };
            let mut reply = Vec::with_capacity(2 + text.len());
            reply.extend_from_slice(&item.to_be_bytes());
            reply.extend_from_slice(text.as_bytes());
            out.extend(option_reply(option, REP_INFO, &reply));
        }
        out.extend(option_reply(option, REP_ACK, &[]));
        if option == OPT_GO {
            Step::Serve(out, export.clone())
        } else {
            Step::Continue(out)
        }
    }

    /// The export `name` selects: a namespace ID in decimal, or the
    /// default one for an empty name.
    fn find<'a>(&self, name: &[u8], exports: &'a [Export]) -> Option<&'a Export> {
        if name.is_empty() {
            return match self.default_ns {
                Some(ns) => exports.iter().find(|e| e.nsid == ns),
                None => exports.first(),
            };
        }
        exports.iter().find(|e| e.name.as_bytes() == name)
    }
}

/// The names of `exports`, for error messages.
fn names(exports: &[Export]) -> String {
    if exports.is_empty() {
        return "none is active".into();
    }
    exports.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let len = u32::from_be_bytes(be(data.get(..4)?)) as usize;
    if len > MAX_STRING {
        return None;
    }
    let name = data.get(4..4 + len)?;
    let rest = &data[4 + len..];
    let count = u16::from_be_bytes(be(rest.get(..2)?)) as usize;
    let items = &rest[2..];
    if items.len() != count * 2 {
        return None;
    }
    Some((
        name,
        items
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An error reply; its data is a message for people.
fn option_error(option: u32, kind: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
    option_reply(option, kind, message)
}

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Decodes a header; `None` when its magic is wrong (the stream is lost).
    pub(crate) fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if u32::from_be_bytes(be(&b[..4])) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes(be(&b[4..6])),
            kind: u16::from_be_bytes(be(&b[6..8])),
            cookie: u64::from_be_bytes(be(&b[8..16])),
            offset: u64::from_be_bytes(be(&b[16..24])),
            len: u32::from_be_bytes(be(&b[24..28])),
        })
    }

    /// Bytes of payload that follow the header.
    pub(crate) fn payload(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }

    /// Encodes a header (for tests and clients).
    #[cfg(test)]
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// What a checked request does, in the namespace's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Read { lba: u64, len: u32 },
    Write { lba: u64, len: u32, fua: bool },
    Flush,
    Trim { lba: u64, blocks: u64 },
    WriteZeroes { lba: u64, blocks: u64, fua: bool },
    Disconnect,
}

impl Action {
    /// Bytes of data the action holds while in flight.
    pub(crate) fn data_len(&self) -> usize {
        match self {
            Action::Read { len, .. } | Action::Write { len, .. } => *len as usize,
            _ => 0,
        }
    }

    /// The command's name, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Action::Read { .. } => "read",
            Action::Write { .. } => "write",
            Action::Flush => "flush",
            Action::Trim { .. } => "trim",
            Action::WriteZeroes { .. } => "write zeroes",
            Action::Disconnect => "disconnect",
        }
    }

    /// Whether it changes data (out of range reads as "no space").
    fn writes(&self) -> bool {
        matches!(
            self,
            Action::Write { .. } | Action::WriteZeroes { .. } | Action::Trim { .. }
        )
    }
}

/// A request refused before anything is sent to the I/O unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub errno: u32,
    pub message: String,
}

fn refuse(errno: u32, message: String) -> Result<Action, Refusal> {
    Err(Refusal { errno, message })
}

/// Checks `req` against `export`: alignment to whole blocks, the export's
/// end, the payload limit, write permission.
pub(crate) fn check(req: &Request, export: &Export, read_only: bool, max_payload: u32) -> Result<Action, Refusal> {
    let bs = u64::from(export.block_size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let lba = req.offset / bs;
    let action = match req.kind {
        CMD_READ => Action::Read { lba, len: req.len },
        CMD_WRITE => Action::Write { lba, len: req.len, fua },
        CMD_DISC => return Ok(Action::Disconnect),
        CMD_FLUSH => return Ok(Action::Flush),
        CMD_TRIM => Action::Trim {
            lba,
            blocks: u64::from(req.len) / bs,
        },
        CMD_WRITE_ZEROES => Action::WriteZeroes {
            lba,
            blocks: u64::from(req.len) / bs,
            fua,
        },
        other => return refuse(EINVAL, format!("command {other} is not supported")),
    };
    if read_only && action.writes() {
        return refuse(EPERM, format!("{} on a read-only export", action.name()));
    }
    if req.offset % bs != 0 || u64::from(req.len) % bs != 0 {
        return refuse(
            EINVAL,
            format!(
                "{} of {} bytes at offset {} is not whole {bs}-byte blocks",
                action.name(),
                req.len,
                req.offset
            ),
        );
    }
    if matches!(action, Action::Read { .. } | Action::Write { .. }) && (req.len == 0 || req.len > max_payload) {
        return refuse(
            EINVAL,
            format!(
                "{} of {} bytes: the length must be 1 to {max_payload} bytes",
                action.name(),
                req.len
            ),
        );
    }
    if req
        .offset
        .checked_add(u64::from(req.len))
        .is_none_or(|end| end > export.size)
    {
        let errno = if action.writes() { ENOSPC } else { EINVAL };
        return refuse(
            errno,
            format!(
                "{} of {} bytes at offset {} runs past the export's end ({} bytes)",
                action.name(),
                req.len,
                req.offset,
                export.size
            ),
        );
    }
    Ok(action)
}

/// The NBD error for a failed host call, by what failed.
pub(crate) fn errno(e: &HostError, action: &Action) -> u32 {
    if let Some(status) = e.status() {
        let generic = status.sct() == StatusCodeType::GENERIC;
        return match status.sc() {
            0x80 | 0x81 if generic && action.writes() => ENOSPC,
            0x80 | 0x02 if generic => EINVAL,
            0x01 if generic => ENOTSUP,
            // Namespace Is Write Protected.
            0x20 if generic => EPERM,
            0x86 if status.sct() == StatusCodeType::MEDIA_DATA_INTEGRITY => EPERM,
            _ => EIO,
        };
    }
    match e {
        HostError::InvalidArgument(_) => EINVAL,
        HostError::Memory(_) => ENOMEM,
        HostError::Closed => ESHUTDOWN,
        _ => EIO,
    }
}

/// A simple reply's header (16 bytes); a successful read's data follows.
pub(crate) fn simple_reply(cookie: u64, errno: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(out: &mut Vec<u8>, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The header of a successful reply: for a read with `data_len` bytes, the
/// data follows it.
pub(crate) fn ok_reply(structured: bool, cookie: u64, read_at: Option<(u64, usize)>) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, 0).to_vec();
    }
    let mut out = Vec::with_capacity(28);
    match read_at {
        Some((offset, data_len)) => {
            chunk_header(&mut out, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len as u32);
            out.extend_from_slice(&offset.to_be_bytes());
        }
        None => chunk_header(&mut out, REPLY_TYPE_NONE, cookie, 0),
    }
    out
}

/// An error reply; with structured replies it carries `message`.
pub(crate) fn error_reply(structured: bool, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, errno).to_vec();
    }
    let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut out = Vec::with_capacity(26 + message.len());
    chunk_header(&mut out, REPLY_TYPE_ERROR, cookie, 6 + message.len() as u32);
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Runs a client's bytes through the negotiation (client flags, then
/// options until one serves an export), then as requests with their
/// payloads against that export: the fuzzing entry point, [`super::fuzz`].
pub(crate) fn fuzz(data: &[u8]) {
    let exports = [
        Export {
            name: "1".into(),
            nsid: Nsid(1),
            size: 1 << 20,
            block_size: 512,
        },
        Export {
            name: "2".into(),
            nsid: Nsid(2),
            size: 8 << 20,
            block_size: 4096,
        },
    ];
    let Some(flags) = data.get(..4) else {
        return;
    };
    // The last bit of the flags' first byte picks a read-only bridge.
    let read_only = flags[0] & 0x80 != 0;
    let mut neg = Negotiation::new(read_only, 1 << 20, None);
    let mut flags = be::<4>(flags);
    flags[0] &= 0x7f;
    if neg.handle_client_flags(u32::from_be_bytes(flags)).is_err() {
        return;
    }
    let mut rest = &data[4..];
    let export = loop {
        let Some(header) = rest.get(..OPTION_HEADER_LEN) else {
            return;
        };
        let Ok((option, len)) = neg.handle_option_header(&be(header)) else {
            return;
        };
        let end = OPTION_HEADER_LEN + len as usize;
        let Some(body) = rest.get(OPTION_HEADER_LEN..end) else {
            return;
        };
        rest = &rest[end..];
        match neg.handle_option(option, body, &exports) {
            Step::Continue(_) => {}
            Step::Serve(_, export) => break export,
            Step::Close(_) => return,
        }
    };
    while let Some(header) = rest.get(..REQUEST_LEN) {
        let Some(req) = Request::parse(&be(header)) else {
            return;
        };
        rest = &rest[REQUEST_LEN..];
        let outcome = check(&req, &export, read_only, 1 << 20);
        let _ = match &outcome {
            Ok(action) => ok_reply(neg.structured(), req.cookie, Some((req.offset, action.data_len()))),
            Err(refusal) => error_reply(neg.structured(), req.cookie, refusal.errno, &refusal.message),
        };
        rest = &rest[(req.payload() as usize).min(rest.len())..];
    }
}

/// `N` bytes of `b` as an array; callers slice exactly `N`.
fn be<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[cfg(test)]
mod tests;
