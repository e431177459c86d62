//! chanio: split-model channel messaging.
//!
//! This facade crate re-exports the workspace crates so that the demos in
//! `examples/` and the end-to-end tests in `tests/` can reach all of them:
//!
//! - [`messaging`]: the push-push protocol and its fabric providers;
//! - [`nvme`]: NVMe wire types and their binding to channels, shared by
//!   both modules;
//! - [`host`]: the host module (applications link it);
//! - [`iounit`]: the I/O-unit module (the storage node's daemon).
#![warn(missing_docs)]

pub use host;
pub use iounit;
pub use messaging;
pub use nvme;
