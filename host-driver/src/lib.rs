//! chanio host module: read and write NVMe namespaces on a remote I/O unit.
//!
//! A [`Host`] is one NVMe controller on an I/O unit, reached over chanio's
//! push-push [`messaging`] layer with the NVMe transport binding of
//! [`nvme::transport`] (a small NVMe-over-Fabrics look-alike). It owns
//! an admin queue and one or more I/O queues; each queue is one messaging
//! channel whose first message is a Fabrics Connect.
//!
//! # Quick start
//! ```no_run
//! use host::{Host, HostOptions, Nsid};
//!
//! let host = Host::connect("tcp://127.0.0.1:4520", HostOptions::default())?;
//! for ns in host.namespaces()? {
//!     println!("nsid {}: {} blocks of {} bytes", ns.nsid.0, ns.blocks, ns.block_size);
//! }
//! host.write(Nsid(1), 0, &[0xab; 4096], false)?;
//! let data = host.read(Nsid(1), 0, 8)?; // 8 blocks of 512 bytes
//! assert_eq!(data.len(), 4096);
//! # Ok::<(), host::HostError>(())
//! ```
//!
//! # The model
//! - **Commands** are built and checked before anything is sent ([`HostError::InvalidArgument`]
//!   names the problem); requests larger than one command may move
//!   ([`nvme::transport::MAX_TRANSFER`], 65536 blocks) are split and the
//!   parts run concurrently.
//! - **Writes** of up to 4 KiB travel inside the command capsule; larger
//!   ones are pushed right after it, in slot-sized chunks, under a per-queue
//!   submit lock so that no other command interleaves.
//! - **Reads** (and Identify, Get Log Page) name a registered buffer that
//!   the host exposed on the queue; the I/O unit pushes the data straight
//!   into it, then sends the completion. [`Host::read_into`] with an
//!   [`IoBuf`] from [`Host::alloc`] lands data in place with no copy.
//! - **Errors** come back as [`HostError`]; an NVMe status reads as words,
//!   e.g. `Read failed: LBA Out of Range (SCT 0h, SC 80h)`.
//!
//! # Threading
//! `Host` is `Clone + Send + Sync`: share it between threads, or clone it.
//! Blocking calls run the async implementation with a small `block_on` on
//! the calling thread; the `*_async` forms need no particular runtime (they
//! only use wakers). Behind a host run:
//! - one receiver thread per queue, matching completions and read data to
//!   commands in flight by command ID (a slab per queue);
//! - a timer thread, which wakes futures at their deadlines (so async calls
//!   time out too);
//! - a keep-alive thread (a Keep Alive every half [`HostOptions::keep_alive`]);
//! - an event thread, which keeps an Asynchronous Event Request posted and
//!   turns namespace changes into [`HostEvent`]s ([`Host::events`]);
//! - a supervisor, which reconnects after a connection loss.
//!
//! Commands are spread over the I/O queues round robin.
//!
//! # Failures
//! Every command has a deadline ([`HostOptions::command_timeout`]); when it
//! passes the call fails with [`HostError::Timeout`]. The command's ID, and
//! its read buffer, stay reserved until the I/O unit answers or the channel
//! closes, so memory the I/O unit may still write to is never reused.
//! When a channel fails (or a Keep Alive times out) the host closes all its
//! queues and reconnects with backoff; commands in flight are re-issued on
//! the new controller, or fail with [`HostError::ConnectionLost`] once
//! [`HostOptions::reconnect_deadline`] has passed since the loss. A killed
//! I/O unit therefore never makes a call hang.
//!
//! # Cleanup
//! [`Host::close`], or dropping the last clone, closes every queue, fails
//! calls in progress with [`HostError::Closed`] and joins the background
//! threads (a reconnect attempt in progress finishes on its own, within the
//! connect timeout). Registered buffers return to their pools when dropped.
#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
mod buf;
mod command;
pub mod describe;
mod error;
mod exec;
mod host;
pub mod mirror;
#[cfg(feature = "nbd")]
pub mod nbd;
mod options;
mod queue;

pub use buf::IoBuf;

/// Runs one of this library's futures to completion on the calling thread,
/// as the blocking calls do: the thread reaps the completion its future
/// waits for itself instead of sleeping until another thread hands it
/// over. For callers that mix blocking and async calls without a runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    exec::block_on(fut)
}

/// Runs `futs` together and returns their outputs in order: with
/// [`block_on`], several of this library's calls (to one I/O unit or many)
/// in flight at once from one thread.
pub async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    exec::join_all(futs).await
}
pub use error::HostError;
pub use host::{Host, HostEvent, NamespaceInfo, Window, ADMIN_QUEUE_DEPTH};
pub use mirror::{LegState, Mirror};
pub use nvme::{IdentifyController, IdentifyNamespace, Nsid, Status};
pub use options::{default_hostnqn, HostOptions, TargetUri, Transport, MAX_IO_QUEUES};

pub use messaging;
pub use nvme;
