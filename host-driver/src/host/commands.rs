//! The commands behind the public calls: Identify, reads and writes (split
//! into commands of the largest transfer, or lent buffers), and their checks.

use super::*;

impl Inner {
    pub(super) async fn identify_controller(&self) -> Result<IdentifyController, HostError> {
        let reply = self.run(&Op::identify(Cns::Controller, Nsid(0)), None).await?;
        Ok(IdentifyController::decode(reply_data(&reply))?)
    }

    pub(super) async fn smart_log(&self) -> Result<nvme::SmartLog, HostError> {
        let op = Op::get_log_page(nvme::LogPageId::SmartHealth, nvme::log::SMART_LOG_LEN)?;
        let reply = self.run(&op, None).await?;
        Ok(nvme::SmartLog::decode(reply_data(&reply))?)
    }

    pub(super) async fn replication_status(&self) -> Result<Option<String>, HostError> {
        let op = Op::get_log_page(nvme::LogPageId::ReplicationStatus, nvme::ReplicationStatus::PAGE_LEN)?;
        match self.run(&op, None).await {
            Ok(reply) => Ok(Some(nvme::ReplicationStatus::decode(reply_data(&reply))?.text)),
            Err(e) if e.status().is_some_and(|s| s.same_code(nvme::Status::INVALID_LOG_PAGE)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn identify_namespace(&self, nsid: Nsid) -> Result<IdentifyNamespace, HostError> {
        command::check_nsid(nsid, false)?;
        let reply = self.run(&Op::identify(Cns::Namespace, nsid), None).await?;
        let id = IdentifyNamespace::decode(reply_data(&reply))?;
        if id.nsze > 0 {
            if let Ok(info) = NamespaceInfo::from_identify(nsid, &id) {
                self.namespaces.lock().insert(nsid.0, info);
            }
        }
        Ok(id)
    }

    pub(super) async fn namespace_ids(&self, nsid: Nsid) -> Result<nvme::NamespaceIds, HostError> {
        command::check_nsid(nsid, false)?;
        let reply = self.run(&Op::identify(Cns::NamespaceDescriptors, nsid), None).await?;
        Ok(nvme::NamespaceIds::decode(reply_data(&reply))?)
    }

    pub(super) async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, HostError> {
        let mut nsids = Vec::new();
        let mut after = Nsid(0);
        loop {
            let reply = self.run(&Op::identify(Cns::ActiveNamespaceList, after), None).await?;
            let list = NamespaceList::decode(reply_data(&reply))?;
            nsids.extend_from_slice(list.nsids());
            match list.nsids().last() {
                Some(&last) if list.nsids().len() == NamespaceList::MAX_ENTRIES => after = last,
                _ => break,
            }
        }
        let mut out = Vec::with_capacity(nsids.len());
        for nsid in nsids {
            let id = self.identify_namespace(nsid).await?;
            out.push(NamespaceInfo::from_identify(nsid, &id)?);
        }
        Ok(out)
    }

    /// Block size and capacity of `nsid`, from the cache or Identify. An
    /// error identifying it is reported as the failure of `command`.
    pub(super) async fn namespace_info(&self, nsid: Nsid, command: &'static str) -> Result<NamespaceInfo, HostError> {
        command::check_nsid(nsid, false)?;
        if let Some(info) = self.namespaces.lock().get(&nsid.0) {
            return Ok(*info);
        }
        let id = match self.identify_namespace(nsid).await {
            Ok(id) => id,
            Err(HostError::Nvme { status, .. }) => return Err(HostError::Nvme { command, status }),
            Err(e) => return Err(e),
        };
        if id.nsze == 0 {
            // Inactive namespaces identify as zeroes.
            return Err(HostError::Nvme {
                command,
                status: Status::INVALID_NAMESPACE.with_dnr(),
            });
        }
        NamespaceInfo::from_identify(nsid, &id)
    }

    pub(super) async fn read(&self, nsid: Nsid, slba: u64, blocks: u32) -> Result<Vec<u8>, HostError> {
        let ns = self.namespace_info(nsid, "Read").await?;
        check_request("Read", nsid, slba, u64::from(blocks))?;
        let bs = ns.block_size as usize;
        let total = (blocks as usize)
            .checked_mul(bs)
            .ok_or_else(|| HostError::InvalidArgument(format!("{blocks} blocks do not fit in memory")))?;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        let mut out = vec![0u8; total];
        let parts: Vec<(u64, u32, u64)> = command::split_blocks(slba, u64::from(blocks), max).collect();
        for batch in parts.chunks(BATCH) {
            let futs = batch
                .iter()
                .map(|&(lba, n, done)| async move {
                    let op = Op::read(nsid, lba, n, ns.block_size)?;
                    let reply = self.run(&op, None).await?;
                    Ok::<_, HostError>((done, reply))
                })
                .collect();
            for r in exec::join_all(futs).await {
                let (done, reply) = r?;
                let data = reply_data(&reply);
                let off = done as usize * bs;
                out[off..off + data.len()].copy_from_slice(data);
            }
        }
        Ok(out)
    }

    pub(super) async fn read_into(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Read").await?;
        let blocks = command::blocks_in(buf.len(), ns.block_size)?;
        check_request("Read", nsid, slba, u64::from(blocks))?;
        if blocks > command::max_blocks(self.max_transfer(), ns.block_size) {
            let data = self.read(nsid, slba, blocks).await?;
            return buf.copy_in(&data);
        }
        let op = Op::read(nsid, slba, blocks, ns.block_size)?;
        // `lent` refills `buf` if this future is dropped mid-read.
        let (raw, lent) = buf.lend()?;
        match self.run(&op, Some(raw)).await {
            Ok(reply) => match reply.data {
                Some(data) => lent.restore(data),
                None => Err(HostError::Protocol("Read completed without its data".into())),
            },
            Err(e) => {
                lent.refresh()?;
                Err(e)
            }
        }
    }

    pub(super) async fn write_from(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf, fua: bool) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Write").await?;
        let blocks = command::blocks_in(buf.len(), ns.block_size)?;
        check_request("Write", nsid, slba, u64::from(blocks))?;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        if blocks > max {
            // Split into several commands: copied.
            return self.write(nsid, slba, buf, fua).await;
        }
        let op = Op::write_lent(nsid, slba, buf.len(), ns.block_size, fua)?;
        let (raw, lent) = buf.lend_out()?;
        let outcome = self.run_with(&op, Some(raw), true).await;
        let intact = lent.reclaim()?;
        match outcome? {
            Some(_) => Ok(()),
            // Lost with its channel, which flushed the push and so gave the
            // buffer back: re-issued from a copy once reconnected.
            None if intact => self.write(nsid, slba, buf, fua).await,
            None => Err(HostError::Protocol(
                "a write's buffer stayed with the failed channel; the write was not re-issued".into(),
            )),
        }
    }

    pub(super) async fn write(&self, nsid: Nsid, slba: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Write").await?;
        let blocks = command::blocks_in(data.len(), ns.block_size)?;
        check_request("Write", nsid, slba, u64::from(blocks))?;
        let bs = ns.block_size as usize;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        if blocks <= max {
            // One command: no batch to gather, nothing allocated.
            let op = Op::write(nsid, slba, data, ns.block_size, fua)?;
            return self.run(&op, None).await.map(drop);
        }
        let ops = command::split_blocks(slba, u64::from(blocks), max).map(|(lba, n, done)| {
            let off = done as usize * bs;
            Op::write(nsid, lba, &data[off..off + n as usize * bs], ns.block_size, fua)
        });
        self.run_all(ops).await
    }
}
