//! The values an endpoint call takes or gives back besides buffers.

use super::*;

/// Why [`Endpoint::push_direct_fill`] pushed nothing.
#[derive(Debug, thiserror::Error)]
pub enum FillError<E> {
    /// The fill function failed, with its error.
    #[error("filling the push failed: {0}")]
    Fill(E),
    /// The push itself failed.
    #[error(transparent)]
    Push(Error),
}

/// The bytes of one message: one slice, or several parts sent in order as
/// one message. Made from `&[u8]`, `&[u8; N]`, `&Vec<u8>` and slices or
/// arrays of `&[u8]`.
#[derive(Debug, Clone, Copy)]
pub enum Parts<'a> {
    /// The whole message.
    One(&'a [u8]),
    /// The message's parts, in order.
    Many(&'a [&'a [u8]]),
}

impl<'a> Parts<'a> {
    /// The parts as slices.
    pub fn as_slices(&self) -> &[&'a [u8]] {
        match self {
            Parts::One(one) => std::slice::from_ref(one),
            Parts::Many(many) => many,
        }
    }
}

impl<'a> From<&'a [u8]> for Parts<'a> {
    fn from(one: &'a [u8]) -> Self {
        Parts::One(one)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Parts<'a> {
    fn from(one: &'a [u8; N]) -> Self {
        Parts::One(one)
    }
}

impl<'a> From<&'a Vec<u8>> for Parts<'a> {
    fn from(one: &'a Vec<u8>) -> Self {
        Parts::One(one)
    }
}

impl<'a> From<&'a [&'a [u8]]> for Parts<'a> {
    fn from(many: &'a [&'a [u8]]) -> Self {
        Parts::Many(many)
    }
}

impl<'a, const N: usize> From<&'a [&'a [u8]; N]> for Parts<'a> {
    fn from(many: &'a [&'a [u8]; N]) -> Self {
        Parts::Many(many)
    }
}
