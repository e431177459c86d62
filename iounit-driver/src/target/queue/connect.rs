//! A queue's first command: Fabrics Connect binds it to a controller, new
//! (admin queue) or existing (I/O queue), once the host and the queue's
//! parameters pass the target's checks and limits.

use super::*;

/// Counts a queue among the workers for as long as it is served. A
/// channel still waiting for its Connect holds none, so connections that
/// never send one cannot keep hosts out.
pub(crate) struct WorkerSlot(Arc<Shared>);

impl WorkerSlot {
    /// A slot, or `None` when all `workers` are taken.
    fn try_take(shared: &Arc<Shared>) -> Option<WorkerSlot> {
        if shared.active_queues.fetch_add(1, Ordering::AcqRel) >= shared.cfg.workers {
            shared.active_queues.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(WorkerSlot(shared.clone()))
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.0.active_queues.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A refused Connect: the status the host gets (with Do Not Retry) and the
/// reason the log gets.
type Refusal = (Status, String);

/// A queue the Connect admitted; its thread answers the Connect.
pub(crate) struct Admitted {
    pub(super) worker: WorkerSlot,
    pub(super) ctrl: Arc<Controller>,
    pub(super) qid: u16,
    pub(super) size: u32,
    /// The Connect command's identifier, for its answer.
    pub(super) cid: CommandId,
}

impl Admitted {
    /// The controller this admission created (an admin queue's): it goes
    /// too if the queue is never served.
    pub(crate) fn created_controller(&self) -> Option<u16> {
        (self.qid == 0).then_some(self.ctrl.cntlid)
    }
}

/// What a channel's first capsule decided.
pub(crate) enum Admission {
    /// A Connect that binds the queue to a controller.
    Admitted(Admitted),
    /// Refused; the answer went out when a ticket is given (the channel
    /// closes once it is acknowledged).
    Refused(Option<messaging::Ticket>),
}

/// Checks a channel's first capsule, which must be a Connect, and binds
/// the queue to its controller. Never waits: a refusal's answer is only
/// posted.
pub(crate) fn admit_first(shared: &Arc<Shared>, ep: &Endpoint, d: messaging::Delivery) -> Admission {
    let peer = ep.peer_addr().to_string();
    let (sqe, data) = match transport::decode_capsule(&d) {
        Ok(c) if d.kind() == ReceivedKind::Message => c,
        Ok(_) => {
            tracing::warn!(%peer, "first transfer is not a command capsule");
            return Admission::Refused(None);
        }
        Err(e) => {
            tracing::warn!(%peer, "malformed Connect capsule: {e}");
            return Admission::Refused(None);
        }
    };
    match admit(shared, ep, &sqe, data) {
        Ok(admitted) => Admission::Admitted(admitted),
        Err((status, why)) => {
            tracing::warn!(%peer, "refusing Connect: {why}");
            let cqe = Cqe::new(sqe.command_id, status.with_dnr());
            match ep.try_send(&transport::encode_response(&cqe)) {
                Ok(ticket) => Admission::Refused(Some(ticket)),
                Err(e) => {
                    tracing::debug!(%peer, "cannot answer the refused Connect: {e}");
                    Admission::Refused(None)
                }
            }
        }
    }
}

/// Answers an admitted Connect: on the queue's own thread, the first thing
/// it sends.
pub(super) fn answer(ep: &Endpoint, admitted: &Admitted) -> Result<(), QueueError> {
    let mut cqe = Cqe::new(admitted.cid, Status::SUCCESS);
    cqe.dw0 = ConnectResponse::new(admitted.ctrl.cntlid).to_dw0();
    ep.send(&transport::encode_response(&cqe))
        .map(messaging::Ticket::detach)
        .map_err(QueueError::Complete)
}

/// Checks a Connect command against the target's limits and its
/// configuration, and binds the queue to its controller.
fn admit(shared: &Arc<Shared>, ep: &Endpoint, sqe: &Sqe, data: &[u8]) -> Result<Admitted, Refusal> {
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
    tracing::info!(peer = %ep.peer_addr(), host = %ctrl.hostnqn, cntlid = ctrl.cntlid, qid = connect.qid, size, "queue connected");
    Ok(Admitted {
        worker,
        ctrl,
        qid: connect.qid,
        size,
        cid: sqe.command_id,
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
