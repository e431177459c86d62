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
//! - [`nvme`]: NVMe wire formats (SQE, CQE, SGL, status codes, Identify,
//!   log pages, Fabrics Connect);
//! - [`transport`]: chanio's binding of NVMe capsules to messaging channels;
//! - [`backend`]: the common block layer, its backends and the namespace
//!   registry.
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod fuzz;
pub mod nvme;
pub mod target;
pub mod transport;

pub use messaging;
