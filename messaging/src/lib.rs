//! chanio messaging layer: the push-push protocol over pluggable fabrics.
//!
//! A sender never waits for the receiver to pull. It either **Sends** a
//! small message into a receive buffer the peer pre-posted, or **pushes**
//! data with an RDMA Write into a slot the peer pre-registered and granted,
//! telling the peer where the data went with the immediate data of that
//! same write (or, per connection, with a separate small message). Credits
//! keep every Send matched to a posted buffer and every write aimed at a
//! granted region; see `docs/protocol.md` for the rules and wire formats.
//!
//! # Layers
//! ```text
//!  driver::Endpoint        blocking + async API, no threads of its own
//!        │
//!  proto::Connection       every protocol rule, no I/O (sans-IO core)
//!        │
//!  provider::{Fabric, QueuePair}   verbs RC semantics
//!        ├── loopback      in-process, deterministic, fault injection
//!        ├── tcp           RDMA semantics emulated over TCP
//!        └── shm           same host, separate processes, one copy (Linux)
//!  mr                      registered memory: pools, buffers, keys
//! ```
//!
//! # Quick start
//! ```
//! use messaging::{Config, Endpoint};
//! use messaging::provider::{tcp::TcpFabric, Fabric};
//!
//! let fabric = TcpFabric::new();
//! let listener = fabric.listen("127.0.0.1:0").unwrap();
//! let addr = listener.local_addr();
//! std::thread::scope(|s| {
//!     let server = s.spawn(|| {
//!         let ep = Endpoint::accept(&fabric, &*listener, Config::default(), None).unwrap();
//!         let msg = ep.recv().unwrap();
//!         assert_eq!(&msg[..], b"hello");
//!     });
//!     let ep = Endpoint::connect(&fabric, &addr, Config::default()).unwrap();
//!     ep.send(b"hello").unwrap().wait().unwrap();
//!     server.join().unwrap();
//! });
//! ```
//!
//! # Thread safety and cleanup
//! [`Endpoint`] is `Clone + Send + Sync`; see [`driver`] for the threading
//! model. Registered memory is owned by [`mr::Buf`] handles that return to
//! their pool on drop; a posted buffer belongs to the fabric until its
//! completion hands it back, so it can never be touched while in flight.
#![warn(missing_docs)]

pub mod driver;
pub mod fuzz;
pub mod intmap;
pub mod lease;
pub mod mr;
pub mod proto;
pub mod provider;
pub mod transport;
pub mod units;

#[cfg(test)]
mod doc_constants;

pub use driver::{Cork, Delivery, Endpoint, Error, FillError, Parts, Ticket};
pub use proto::{CloseReason, Config, DirectPush, DirectTarget, ReceivedKind};
pub use transport::{Fabrics, Scheme, TransportUri};
