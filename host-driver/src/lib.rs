//! chanio host module.
//!
//! The library that applications link to read and write NVMe namespaces
//! served by a remote I/O unit over the [`messaging`] layer. This crate is a
//! placeholder until the "I/O unit daemon and host library" issue lands; it
//! only re-exports the messaging layer it will be built on.
#![warn(missing_docs)]

pub use messaging;
