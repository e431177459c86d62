//! Admin commands: Identify, Get Log Page, Set and Get Features, Keep Alive
//! and Asynchronous Event Requests. Their data is pushed into the host's
//! buffer, as a read's is.

use super::*;

impl Queue {
    /// Pushes `want` bytes (fewer if the command's keyed descriptor names a
    /// smaller host buffer) that `fill` writes, into that host buffer.
    /// Where the fabric allows, `fill` writes the host's buffer itself
    /// ([`messaging::Endpoint::push_direct_fill`]), else a staging buffer.
    pub(super) fn push_to_host(
        &mut self,
        sqe: &Sqe,
        want: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), Status>,
    ) -> Result<Outcome, QueueError> {
        let target = match io::host_target(sqe) {
            Ok(t) => t,
            Err(status) => return Ok(Outcome::status(status)),
        };
        let len = target.remote.len;
        // The command succeeds with this push: when the host allows, the
        // push itself says so and no response capsule follows.
        let by_data = transport::completes_by_data(sqe);
        let buf = self.staging_buf(len as usize)?;
        // Fewer bytes than wanted only where the host's buffer is smaller;
        // a staging buffer too small would cut the data short unnoticed.
        let n = want.min(len as usize);
        if n > buf.capacity() {
            return Ok(Outcome::status(Status::INTERNAL_ERROR));
        }
        let push = DirectPush::to(target).completing(by_data);
        match self.ep.push_direct_fill(buf, push, n, fill) {
            Ok(ticket) => ticket.detach(),
            Err(FillError::Fill(status)) => return Ok(Outcome::status(status)),
            Err(FillError::Push(e)) => return Err(QueueError::Push(e)),
        }
        Ok(if by_data {
            Outcome::Settled
        } else {
            Outcome::status(Status::SUCCESS)
        })
    }

    pub(super) fn admin(&mut self, sqe: &Sqe, inline: &[u8]) -> Result<Outcome, QueueError> {
        let Some(op) = AdminOpcode::from_u8(sqe.opcode) else {
            return Ok(Outcome::status(Status::INVALID_OPCODE.with_dnr()));
        };
        match op {
            AdminOpcode::Identify => self.identify(sqe),
            AdminOpcode::GetLogPage => self.get_log_page(sqe),
            AdminOpcode::SetFeatures => Ok(self.set_features(sqe)),
            AdminOpcode::GetFeatures => Ok(self.get_features(sqe)),
            AdminOpcode::KeepAlive => Ok(Outcome::status(Status::SUCCESS)),
            AdminOpcode::AsyncEventRequest => Ok(match self.ctrl.hold_aer(sqe.command_id) {
                Some((status, dw0)) => Outcome::Done(status, dw0),
                None => Outcome::Settled,
            }),
            AdminOpcode::Fabrics => {
                let _ = inline;
                Ok(Outcome::status(Status::COMMAND_SEQUENCE_ERROR.with_dnr()))
            }
            _ => Ok(Outcome::status(Status::INVALID_OPCODE.with_dnr())),
        }
    }

    fn identify(&mut self, sqe: &Sqe) -> Result<Outcome, QueueError> {
        let data = match sqe.identify_cns() {
            Ok(Cns::Controller) => self.identify_controller().encode(),
            Ok(Cns::Namespace) if !self.visible(sqe.nsid.0) => {
                return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()))
            }
            Ok(Cns::Namespace) => match self.shared.registry.get(sqe.nsid.0) {
                Some(ns) => {
                    let geo = ns.geometry();
                    match IdentifyNamespace::new(geo.blocks, geo.block_size) {
                        Ok(mut id) => {
                            id.nguid = self.shared.namespace_ids(sqe.nsid.0).nguid;
                            id.encode()
                        }
                        Err(_) => return Ok(Outcome::status(Status::INTERNAL_ERROR)),
                    }
                }
                None => return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr())),
            },
            Ok(Cns::NamespaceDescriptors) if !self.visible(sqe.nsid.0) => {
                return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()))
            }
            Ok(Cns::NamespaceDescriptors) => match self.shared.registry.get(sqe.nsid.0) {
                Some(_) => self.shared.namespace_ids(sqe.nsid.0).encode(),
                None => return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr())),
            },
            Ok(Cns::ActiveNamespaceList) => {
                let active = self.shared.visible_nsids(&self.ctrl.hostnqn).into_iter().map(Nsid);
                NamespaceList::active_after(active, sqe.nsid).encode()
            }
            _ => return Ok(Outcome::status(Status::INVALID_FIELD.with_dnr())),
        };
        self.push_to_host(sqe, data.len(), |dest| copy_out(&data, dest))
    }

    fn identify_controller(&self) -> IdentifyController {
        use crate::nvme::AsciiField;
        IdentifyController {
            vid: 0,
            ssvid: 0,
            sn: AsciiField::new(&self.shared.serial).unwrap_or_default(),
            mn: AsciiField::new("chanio I/O unit").unwrap_or_default(),
            fr: AsciiField::new(env!("CARGO_PKG_VERSION")).unwrap_or_default(),
            mdts: transport::MDTS,
            cntlid: self.ctrl.cntlid,
            ver: IdentifyController::version(2, 0, 0),
            oaes: IdentifyController::OAES_NAMESPACE_ATTRIBUTE,
            cntrltype: IdentifyController::CNTRLTYPE_IO,
            acl: 3,
            aerl: (crate::target::MAX_AERS - 1) as u8,
            lpa: IdentifyController::LPA_EXTENDED_DATA,
            elpe: (crate::target::ERROR_LOG_LEN - 1) as u8,
            kas: 1,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: self.shared.cfg.max_queue_depth,
            nn: crate::backend::registry::MAX_NAMESPACES,
            oncs: IdentifyController::ONCS_DATASET_MANAGEMENT | IdentifyController::ONCS_WRITE_ZEROES,
            vwc: IdentifyController::VWC_PRESENT,
            sgls: IdentifyController::SGLS_SUPPORTED | IdentifyController::SGLS_KEYED | IdentifyController::SGLS_OFFSET,
            subnqn: Some(self.shared.nqn.clone()),
            ioccsz: ((crate::nvme::SQE_LEN + transport::INLINE_DATA_MAX) / 16) as u32,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            ..IdentifyController::default()
        }
    }

    fn get_log_page(&mut self, sqe: &Sqe) -> Result<Outcome, QueueError> {
        let lp = match GetLogPage::from_sqe(sqe) {
            Ok(lp) => lp,
            Err(e) => return Ok(Outcome::status(e.status())),
        };
        let data = match lp.log_page_id() {
            Some(LogPageId::ErrorInformation) => ErrorLogEntry::encode_list(&self.ctrl.error_log()),
            // Controller-wide only (LPA bit 0 clear): any NSID reads it.
            Some(LogPageId::SmartHealth) => self.shared.stats.smart_log(self.ctrl.error_count()).encode(),
            Some(LogPageId::ChangedNamespaceList) => {
                let nsids = self.ctrl.take_changed().into_iter().map(Nsid).collect();
                match ChangedNamespaceList::new(nsids) {
                    Ok(list) => list.encode(),
                    Err(_) => return Ok(Outcome::status(Status::INTERNAL_ERROR)),
                }
            }
            Some(LogPageId::ReplicationStatus) => {
                let source = self.shared.replication_status.read().clone();
                match source {
                    Some(text) => crate::nvme::ReplicationStatus { text: text() }.encode(),
                    None => return Ok(Outcome::status(Status::INVALID_LOG_PAGE.with_dnr())),
                }
            }
            _ => return Ok(Outcome::status(Status::INVALID_LOG_PAGE.with_dnr())),
        };
        let offset = lp.offset.min(data.len() as u64) as usize;
        let want = lp.byte_len().min(transport::MAX_TRANSFER as u64) as usize;
        let mut page = data[offset..].to_vec();
        page.resize(want, 0);
        self.push_to_host(sqe, page.len(), |dest| copy_out(&page, dest))
    }

    fn set_features(&mut self, sqe: &Sqe) -> Outcome {
        match sqe.feature_id() {
            Ok(FeatureId::NumberOfQueues) => match NumberOfQueues::from_dword(sqe.cdw11) {
                Ok(req) => {
                    let granted = req
                        .submission()
                        .min(req.completion())
                        .min(self.shared.cfg.max_io_queues)
                        .max(1);
                    self.ctrl.io_queues.store(granted, Ordering::Release);
                    match NumberOfQueues::new(granted, granted) {
                        Ok(n) => Outcome::Done(Status::SUCCESS, n.to_dword()),
                        Err(_) => Outcome::status(Status::INTERNAL_ERROR),
                    }
                }
                Err(e) => Outcome::status(e.status()),
            },
            Ok(FeatureId::KeepAliveTimer) => {
                let kato = KeepAliveTimer::from_dword(sqe.cdw11);
                if !transport::KATO_MS.contains(&kato.timeout_ms) {
                    return Outcome::status(Status::INVALID_FIELD.with_dnr());
                }
                *self.ctrl.kato.lock() = Duration::from_millis(kato.timeout_ms.into());
                Outcome::status(Status::SUCCESS)
            }
            _ => Outcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn get_features(&mut self, sqe: &Sqe) -> Outcome {
        match sqe.feature_id() {
            Ok(FeatureId::NumberOfQueues) => {
                let n = self.ctrl.io_queues.load(Ordering::Acquire);
                match NumberOfQueues::new(n, n) {
                    Ok(q) => Outcome::Done(Status::SUCCESS, q.to_dword()),
                    Err(_) => Outcome::status(Status::INTERNAL_ERROR),
                }
            }
            Ok(FeatureId::KeepAliveTimer) => {
                let ms = self.ctrl.kato.lock().as_millis().min(u32::MAX as u128) as u32;
                Outcome::Done(Status::SUCCESS, KeepAliveTimer { timeout_ms: ms }.to_dword())
            }
            _ => Outcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }
}

/// Copies the first `dest.len()` bytes of `data` into `dest`
/// (`push_to_host` never asks for more than `data` holds).
pub(super) fn copy_out(data: &[u8], dest: &mut [u8]) -> Result<(), Status> {
    let src = data.get(..dest.len()).ok_or(Status::INTERNAL_ERROR)?;
    dest.copy_from_slice(src);
    Ok(())
}
