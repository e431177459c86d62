//! What this side sends: messages with their credits and releases, pushes,
//! and the control messages that return credits.

use super::*;

impl Connection {
    pub(super) fn check_open(&self) -> Result<(), SendError> {
        match &self.state {
            State::Open => Ok(()),
            State::Setup => Err(SendError::NotConnected),
            State::Closed(r) => Err(SendError::Closed(r.clone())),
        }
    }

    pub(super) fn has_send_room(&self, wrs: usize) -> bool {
        self.inflight.len() + wrs <= self.cfg.send_depth as usize && self.send_pool.available() >= 1
    }

    fn credit_threshold(&self) -> u32 {
        u32::from(self.cfg.recv_depth / 2).max(2)
    }

    fn release_threshold(&self) -> usize {
        (self.cfg.slot_count as usize / 4).max(1)
    }

    /// Sends one message (data, control or indication). The caller checked
    /// the credit and the send room.
    pub(super) fn send_message(&mut self, kind: Kind, token: Option<u64>, payload: &[&[u8]]) -> Result<(), SendError> {
        let buf = self.compose(kind, payload, 0)?;
        let key = self.inflight.insert(Inflight {
            token,
            one_sided: false,
        });
        self.work.push_back(Work::Send(SendWr {
            id: WrId(key as u64),
            op: SendOp::Send { buf, imm: None },
        }));
        Ok(())
    }

    /// A Data message of `payload` then `tail` (registered), the tail
    /// gathered by the fabric. The caller checked the credit, the send
    /// room and the length.
    pub(super) fn send_gathered(&mut self, token: u64, payload: &[&[u8]], tail: Buf) -> Result<(), PushError> {
        let head = match self.compose(Kind::Data, payload, tail.len()) {
            Ok(head) => head,
            Err(error) => return Err(PushError { error, buf: tail }),
        };
        let gather = match Gather::new(head, tail) {
            Ok(g) => g,
            Err((_, tail)) => {
                // Not reached: a send buffer holds a full message.
                self.close_with(CloseReason::LocalError(
                    "a gathered message outgrew its send buffer".into(),
                ));
                return Err(PushError {
                    error: SendError::TooLarge {
                        len: 0,
                        max: self.max_send,
                    },
                    buf: tail,
                });
            }
        };
        let key = self.inflight.insert(Inflight {
            token: Some(token),
            one_sided: false,
        });
        self.work.push_back(Work::Send(SendWr {
            id: WrId(key as u64),
            op: SendOp::SendGather(gather),
        }));
        Ok(())
    }

    /// A send buffer holding the header (credits, releases, sequence), and
    /// `payload`; `extra` more payload bytes follow it on the wire. Spends
    /// a credit.
    fn compose(&mut self, kind: Kind, payload: &[&[u8]], extra: usize) -> Result<Buf, SendError> {
        let mut buf = self.send_pool.checkout().ok_or(SendError::Full)?;
        let releases = self.released.len().min(MAX_RELEASES);
        let seq = if matches!(kind, Kind::Control | Kind::Grant) {
            0
        } else {
            let s = self.tx_seq;
            self.tx_seq = self.tx_seq.wrapping_add(1);
            s
        };
        let len = payload.iter().map(|p| p.len()).sum::<usize>();
        let header = Header {
            kind,
            credits: u16::try_from(self.owed).unwrap_or(u16::MAX),
            releases: releases as u16,
            seq,
            len: (len + extra) as u32,
        };
        self.owed -= u32::from(header.credits);
        let total = header.payload_offset() + len;
        {
            let space = buf.spare_capacity();
            header.encode(space);
            for (i, r) in self.released.drain(..releases).enumerate() {
                let at = HEADER_LEN + 2 * i;
                space[at..at + 2].copy_from_slice(&r.to_le_bytes());
            }
            let mut at = header.payload_offset();
            for part in payload {
                space[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        buf.set_len(total);
        self.credits -= 1;
        Ok(buf)
    }

    pub(super) fn post_push(&mut self, token: u64, src: Buf, remote: RemoteAddr, target: Target, placed: Option<u64>) {
        let len = src.len() as u32;
        let work = |wr: SendWr| match placed {
            Some(placement) => Work::SendPlaced(wr, placement),
            None => Work::Send(wr),
        };
        if self.separate {
            let key = self.inflight.insert(Inflight {
                token: None,
                one_sided: false,
            });
            self.work.push_back(work(SendWr {
                id: WrId(key as u64),
                op: SendOp::Write {
                    buf: src,
                    remote,
                    imm: None,
                },
            }));
            let indication = wire::encode_indication(target, len);
            // Room and credit were checked by the caller, so this cannot fail.
            let sent = self.send_message(Kind::Indication, Some(token), &[&indication]);
            debug_assert!(sent.is_ok());
        } else {
            let seq = self.tx_seq;
            self.tx_seq = self.tx_seq.wrapping_add(1);
            self.credits -= 1;
            let key = self.inflight.insert(Inflight {
                token: Some(token),
                one_sided: false,
            });
            self.work.push_back(work(SendWr {
                id: WrId(key as u64),
                op: SendOp::Write {
                    buf: src,
                    remote,
                    imm: Some(wire::encode_imm(target, seq)),
                },
            }));
        }
    }

    /// Sends control messages while credits or slot releases are owed past
    /// their thresholds. Only a control that returns credits may spend the
    /// last credit: it hands the peer at least `credit_threshold` (>= 2)
    /// credits, so the peer can always answer, and two sides can never both
    /// sit at zero credits while owing each other (see docs/protocol.md).
    ///
    /// A grant goes out first, as a control message does (its header
    /// returns the credits of the receives it added).
    pub(super) fn maybe_control(&mut self) {
        loop {
            let credit_due = self.owed >= self.credit_threshold();
            let release_due = self.released.len() >= self.release_threshold();
            let reserve = if credit_due { 1 } else { 2 };
            let due = credit_due || release_due || self.grant_due;
            if !(self.is_open() && due && self.credits >= reserve && self.has_send_room(1)) {
                return;
            }
            let sent = if self.grant_due {
                let grant = self.grant().encode();
                self.send_message(Kind::Grant, None, &[&grant])
            } else {
                self.send_message(Kind::Control, None, &[])
            };
            if sent.is_err() {
                return;
            }
            if self.grant_due {
                self.grant_due = false;
                self.grant_slots = false;
            }
        }
    }

    /// What this side grants now: its receive depth and its slots.
    fn grant(&self) -> Grant {
        match self.slot_pool.as_ref().filter(|_| self.grant_slots) {
            Some(pool) => Grant {
                recv_depth: self.cfg.recv_depth,
                slot_count: self.cfg.slot_count,
                slot_size: self.cfg.slot_size,
                slot_rkey: pool.rkey(),
                slot_addr: pool.remote().addr,
            },
            None => Grant {
                recv_depth: self.cfg.recv_depth,
                slot_count: 0,
                slot_size: 0,
                slot_rkey: crate::mr::RKey(0),
                slot_addr: 0,
            },
        }
    }

    pub(super) fn repost(&mut self, mut buf: Buf) {
        buf.set_len(0);
        self.work.push_back(Work::Recv(RecvWr {
            id: WrId(RECV_TAG | u64::from(buf.index())),
            buf,
        }));
        self.recvs_posted += 1;
        self.owed += 1;
    }

    /// A send-queue request completed; `buf` is its buffer, handed back
    /// (kept for a one-sided request's owner, else dropped to its pool).
    pub(super) fn complete_send(&mut self, id: WrId, status: WcStatus, buf: Option<Buf>) {
        let Some(entry) = usize::try_from(id.0).ok().and_then(|k| self.inflight.try_remove(k)) else {
            tracing::warn!(id = id.0, "completion for an unknown send request");
            return;
        };
        let result = if status.is_success() { Ok(()) } else { Err(status) };
        match (entry.token, entry.one_sided, buf) {
            (Some(token), true, Some(buf)) => self.events.push_back(Event::OneSided { token, result, buf }),
            (Some(token), _, _) => self.events.push_back(Event::Sent { token, result }),
            (None, _, _) => {}
        }
        if !status.is_success() {
            self.close_with(if status == WcStatus::Flushed {
                CloseReason::Disconnected
            } else {
                CloseReason::Fabric(status)
            });
        }
    }
}
