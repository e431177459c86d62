//! chanio I/O-unit module: NVMe namespaces served over push-push channels.
//!
//! ```text
//!  hosts ──channels──▶ target (controllers, queues: NVMe command execution)
//!                          │
//!                     backend::Registry  ◀── attach / detach (callbacks)
//!                          │
//!                 BlockBackend: ram │ file (io_uring)
//! ```
//!
//! - [`nvme`] (the `chanio-nvme` crate, shared with the host module): NVMe
//!   wire formats (SQE, CQE, SGL, status codes, Identify, log pages, Fabrics
//!   Connect), and [`transport`], chanio's binding of NVMe capsules to
//!   messaging channels;
//! - [`backend`]: the common block layer, its backends and the namespace
//!   registry.
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod fuzz;
pub mod identity;
pub mod replica;
pub mod service;
pub mod target;

pub use messaging;
pub use nvme::{self, transport};
