//! chanio messaging layer.
#![warn(missing_docs)]

pub mod mr;
pub mod proto;
pub mod provider;
