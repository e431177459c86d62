//! A queue's first command: Fabrics Connect binds it to a controller, new
//! (admin queue) or existing (I/O queue), once the host and the queue's
//! parameters pass the target's checks and limits.

use super::*;

/// Counts this thread among the workers for as long as it serves a
/// connected queue. A channel still waiting for its Connect holds none, so
/// connections that never send one cannot keep hosts out.
pub(super) struct WorkerSlot<'a>(&'a Shared);

impl<'a> WorkerSlot<'a> {
    /// A slot, or `None` when all `workers` are taken.
    fn try_take(shared: &'a Shared) -> Option<WorkerSlot<'a>> {
        if shared.active_queues.fetch_add(1, Ordering::AcqRel) >= shared.cfg.workers {
            shared.active_queues.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(WorkerSlot(shared))
    }
}

impl Drop for WorkerSlot<'_> {
    fn drop(&mut self) {
        self.0.active_queues.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A refused Connect: the status the host gets (with Do Not Retry) and the
/// reason the log gets.
type Refusal = (Status, String);

/// A queue the Connect admitted.
struct Admitted<'a> {
    worker: WorkerSlot<'a>,
    ctrl: Arc<Controller>,
    qid: u16,
    size: u32,
}

/// Waits for the Connect capsule and binds the queue to a controller.
pub(super) fn connect<'a>(
    shared: &'a Arc<Shared>,
    ep: &Endpoint,
) -> Option<(WorkerSlot<'a>, Arc<Controller>, u16, u16)> {
    let peer = ep.peer_addr().to_string();
    let d = match ep.recv_timeout(CONNECT_TIMEOUT) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%peer, "no Connect command: {e}");
            return None;
        }
    };
    let (sqe, data) = match transport::decode_capsule(&d) {
        Ok(c) if d.kind() == ReceivedKind::Message => c,
        Ok(_) => {
            tracing::warn!(%peer, "first transfer is not a command capsule");
            return None;
        }
        Err(e) => {
            tracing::warn!(%peer, "malformed Connect capsule: {e}");
            return None;
        }
    };
    let reply = |status: Status, dw0: u32| {
        let mut cqe = Cqe::new(sqe.command_id, status);
        cqe.dw0 = dw0;
        let _ = ep
            .send(&transport::encode_response(&cqe))
            .map(|t| t.wait_timeout(CONNECT_TIMEOUT));
    };
    match admit(shared, ep, &sqe, data) {
        Ok(Admitted {
            worker,
            ctrl,
            qid,
            size,
        }) => {
            tracing::info!(%peer, host = %ctrl.hostnqn, cntlid = ctrl.cntlid, qid, size, "queue connected");
            reply(Status::SUCCESS, ConnectResponse::new(ctrl.cntlid).to_dw0());
            Some((worker, ctrl, qid, size as u16))
        }
        Err((status, why)) => {
            tracing::warn!(%peer, "refusing Connect: {why}");
            reply(status.with_dnr(), 0);
            None
        }
    }
}

/// Checks a Connect command against the target's limits and its
/// configuration, and binds the queue to its controller.
fn admit<'a>(shared: &'a Arc<Shared>, ep: &Endpoint, sqe: &Sqe, data: &[u8]) -> Result<Admitted<'a>, Refusal> {
    let Some(worker) = WorkerSlot::try_take(shared) else {
        return Err((
            Status::CONNECT_CONTROLLER_BUSY,
            format!("all {} worker threads serve other queues", shared.cfg.workers),
        ));
    };
    if sqe.opcode != AdminOpcode::Fabrics as u8
        || !matches!(sqe.fabrics_command_type(), Ok(FabricsCommandType::Connect))
    {
        return Err((
            Status::COMMAND_SEQUENCE_ERROR,
            format!("first command has opcode {:#04x}, not Connect", sqe.opcode),
        ));
    }
    let connect = Connect::from_sqe(sqe).map_err(|e| (Status::CONNECT_INVALID_PARAMETERS, e.to_string()))?;
    let cdata =
        ConnectData::decode(data).map_err(|e| (Status::CONNECT_INVALID_PARAMETERS, format!("connect data: {e}")))?;
    if cdata.subnqn != shared.nqn {
        return Err((
            Status::CONNECT_INVALID_HOST,
            format!("subsystem {} is not {}", cdata.subnqn, shared.nqn),
        ));
    }
    if !shared.host_allowed(cdata.hostnqn.as_str()) {
        return Err((
            Status::CONNECT_INVALID_HOST,
            format!("host {} is not allowed", cdata.hostnqn),
        ));
    }
    let size = connect.queue_size();
    if size < 2 || size > u32::from(shared.cfg.max_queue_depth) {
        return Err((
            Status::CONNECT_INVALID_PARAMETERS,
            format!("queue size {size} outside 2..={}", shared.cfg.max_queue_depth),
        ));
    }
    let ctrl = if connect.qid == 0 {
        admin_controller(shared, &connect, &cdata)?
    } else {
        io_controller(shared, &connect, &cdata)?
    };
    ctrl.add_queue(ep, connect.qid == 0);
    ctrl.touch();
    Ok(Admitted {
        worker,
        ctrl,
        qid: connect.qid,
        size,
    })
}

/// The new controller an admin queue's Connect creates.
fn admin_controller(shared: &Shared, connect: &Connect, cdata: &ConnectData) -> Result<Arc<Controller>, Refusal> {
    if !transport::KATO_MS.contains(&connect.kato) {
        return Err((
            Status::CONNECT_INVALID_PARAMETERS,
            format!(
                "keep-alive timeout {} ms outside {}..={} ms (0, disabled, is not accepted)",
                connect.kato,
                transport::KATO_MS.start(),
                transport::KATO_MS.end()
            ),
        ));
    }
    shared
        .new_controller(cdata.hostnqn.as_str(), Duration::from_millis(connect.kato.into()))
        .map_err(|held| {
            (
                Status::CONNECT_CONTROLLER_BUSY,
                format!(
                    "host {} already holds {held} controllers, the most one host may (max_controllers_per_host)",
                    cdata.hostnqn
                ),
            )
        })
}

/// The existing controller an I/O queue's Connect names, if it is the
/// host's and granted that queue.
fn io_controller(shared: &Shared, connect: &Connect, cdata: &ConnectData) -> Result<Arc<Controller>, Refusal> {
    let Some(ctrl) = shared.controller(cdata.cntlid) else {
        return Err((
            Status::CONNECT_INVALID_PARAMETERS,
            format!("no controller {}", cdata.cntlid),
        ));
    };
    if ctrl.hostnqn != cdata.hostnqn.as_str() {
        return Err((Status::CONNECT_INVALID_HOST, "I/O queue from another host".into()));
    }
    let granted = ctrl.io_queues.load(Ordering::Acquire);
    if connect.qid > granted {
        return Err((
            Status::CONNECT_INVALID_PARAMETERS,
            format!("queue {} beyond the {granted} granted", connect.qid),
        ));
    }
    Ok(ctrl)
}
