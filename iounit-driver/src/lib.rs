//! chanio I/O-unit module.
//!
//! The storage-node side of the split-model driver: it will serve NVMe
//! namespaces over the [`messaging`] layer. This crate is a placeholder until
//! the "I/O unit daemon and host library" issue lands; it only re-exports the
//! messaging layer it will be built on.
#![warn(missing_docs)]

pub mod nvme;

pub use messaging;
