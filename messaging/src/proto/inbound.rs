//! What arrives: receive completions, messages, transfer indications and
//! pushes, each checked against what this side granted.

use super::*;

impl Connection {
    pub(super) fn handle_recv(&mut self, c: Completion) {
        self.recvs_posted = self.recvs_posted.saturating_sub(1);
        if !c.status.is_success() {
            self.close_with(if c.status == WcStatus::Flushed {
                CloseReason::Disconnected
            } else {
                CloseReason::Fabric(c.status)
            });
            return;
        }
        if !self.is_open() {
            return;
        }
        let outcome = match c.opcode {
            WcOpcode::Recv => self.handle_message(c.buf),
            WcOpcode::RecvRdmaWithImm => match c.imm {
                Some(imm) => {
                    let (target, seq16) = wire::decode_imm(imm);
                    self.check_seq16(seq16)
                        .and_then(|seq| self.deliver_push(target, c.byte_len, seq))
                        .map(|()| self.repost(c.buf))
                }
                None => Err("write-with-immediate completion without immediate data".into()),
            },
            other => Err(format!("receive completion with opcode {other:?}")),
        };
        if let Err(reason) = outcome {
            self.close_with(CloseReason::Violation(reason));
        }
    }

    fn handle_message(&mut self, buf: Buf) -> Result<(), String> {
        let header = Header::decode(&buf).map_err(|e| e.0)?;
        if header.kind == Kind::Grant {
            // Before the credit check: the header's credits are the
            // receives the grant added.
            let at = header.payload_offset();
            self.take_grant(&buf[at..at + header.len as usize])?;
        }
        let peer = self.peer.as_mut().expect("open implies peer");
        if self.credits + u32::from(header.credits) > u32::from(peer.params.recv_depth) {
            return Err(format!(
                "{} credits granted while holding {} of {}",
                header.credits, self.credits, peer.params.recv_depth
            ));
        }
        self.credits += u32::from(header.credits);
        for slot in header.releases(&buf) {
            match peer.slot_busy.get_mut(slot as usize) {
                Some(busy) if *busy => {
                    *busy = false;
                    peer.free_slots.push_back(slot);
                }
                _ => return Err(format!("release of slot {slot}, which was not pushed to")),
            }
        }
        match header.kind {
            Kind::Control | Kind::Grant => {
                if header.seq != 0 {
                    return Err(format!("control message with sequence number {}", header.seq));
                }
                self.repost(buf);
                Ok(())
            }
            Kind::Data => {
                self.check_seq(header.seq)?;
                self.held += 1;
                self.events.push_back(Event::Received(Received {
                    offset: header.payload_offset(),
                    len: header.len as usize,
                    buf,
                    origin: Origin::Message,
                    seq: header.seq,
                }));
                Ok(())
            }
            Kind::Indication => {
                self.check_seq(header.seq)?;
                let at = header.payload_offset();
                let (target, len) = wire::decode_indication(&buf[at..at + header.len as usize]).map_err(|e| e.0)?;
                self.deliver_push(target, len, header.seq)?;
                self.repost(buf);
                Ok(())
            }
        }
    }

    /// Takes a peer's grant: a deeper receive queue (never shallower), and
    /// slots where none were granted.
    fn take_grant(&mut self, payload: &[u8]) -> Result<(), String> {
        let grant = Grant::decode(payload).map_err(|e| e.0)?;
        let max_message = self.caps.map_or(0, |c| c.max_message);
        let peer = self.peer.as_mut().expect("open implies peer");
        if grant.recv_depth < peer.params.recv_depth {
            return Err(format!(
                "grant lowers the receive depth from {} to {}",
                peer.params.recv_depth, grant.recv_depth
            ));
        }
        if grant.slot_count > 0 {
            if peer.params.slot_count > 0 {
                return Err("push slots granted twice".into());
            }
            if grant.slot_size > max_message {
                return Err(format!(
                    "granted slot size {} above the fabric's message limit",
                    grant.slot_size
                ));
            }
            peer.params.slot_count = grant.slot_count;
            peer.params.slot_size = grant.slot_size;
            peer.params.slot_addr = grant.slot_addr;
            peer.params.slot_rkey = grant.slot_rkey;
            peer.free_slots = (0..grant.slot_count).rev().collect();
            peer.slot_busy = vec![false; grant.slot_count.into()];
        }
        peer.params.recv_depth = grant.recv_depth;
        Ok(())
    }

    fn check_seq(&mut self, seq: u32) -> Result<(), String> {
        if seq != self.rx_seq {
            return Err(format!("delivery {seq} out of order (expected {})", self.rx_seq));
        }
        self.rx_seq = self.rx_seq.wrapping_add(1);
        Ok(())
    }

    fn check_seq16(&mut self, seq16: u16) -> Result<u32, String> {
        if seq16 != self.rx_seq as u16 {
            return Err(format!("push {seq16} out of order (expected {})", self.rx_seq as u16));
        }
        let seq = self.rx_seq;
        self.rx_seq = self.rx_seq.wrapping_add(1);
        Ok(seq)
    }

    fn deliver_push(&mut self, target: Target, len: u32, seq: u32) -> Result<(), String> {
        let (mut buf, origin) = match target {
            Target::Slot(i) => match self.slots.get_mut(i as usize) {
                Some(slot @ Slot::Granted(_)) => match std::mem::replace(slot, Slot::Delivered) {
                    Slot::Granted(b) => (b, Origin::Slot(i)),
                    Slot::Delivered => unreachable!("matched Granted above"),
                },
                _ => return Err(format!("push into slot {i}, which is not granted")),
            },
            Target::Direct(index) => {
                let (tag, completes_request) = (index & MAX_TAG, index & DIRECT_FLAG != 0);
                match self.direct.remove(&tag) {
                    Some(b) => (b, Origin::Direct { tag, completes_request }),
                    None => return Err(format!("push to direct tag {tag}, which is not exposed")),
                }
            }
        };
        if len as usize > buf.capacity() {
            return Err(format!("push of {len} bytes into a {}-byte buffer", buf.capacity()));
        }
        buf.set_len(len as usize);
        if matches!(origin, Origin::Slot(_)) {
            self.held += 1;
        }
        self.events.push_back(Event::Received(Received {
            buf,
            offset: 0,
            len: len as usize,
            origin,
            seq,
        }));
        Ok(())
    }

    pub(super) fn close_with(&mut self, reason: CloseReason) {
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        match &reason {
            CloseReason::Local | CloseReason::Disconnected => tracing::debug!(%reason, "connection closed"),
            _ => tracing::warn!(%reason, "connection closed"),
        }
        let was_setup = matches!(self.state, State::Setup);
        self.state = State::Closed(reason.clone());
        // Slots and exposed buffers stay owned by the connection (not back
        // in their pools) until it is dropped: the fabric may still be
        // placing a write into them until the driver has disconnected.
        self.released.clear();
        if was_setup {
            // Nothing was posted beyond the initial receives the caller holds.
            self.recvs_posted = 0;
        }
        self.events.push_back(Event::Closed(reason));
        self.work.push_back(Work::Disconnect);
    }
}
