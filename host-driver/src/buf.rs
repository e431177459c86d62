//! Registered buffers: [`IoBuf`] for applications, and the host's cache of
//! read destinations.

use std::fmt;
use std::ops::{Deref, DerefMut};

use messaging::mr::{Access, Buf, BufPool, MrError, ProtectionDomain};
use parking_lot::Mutex;

use crate::HostError;

/// Access rights of every buffer the I/O unit pushes into.
pub(crate) fn dest_access() -> Access {
    Access::LOCAL_WRITE | Access::REMOTE_WRITE
}

/// A buffer registered with the host's fabric, from [`Host::alloc`]: reads
/// into it with [`Host::read_into`] land in place, and writes from it with
/// [`Host::write_from`] go out from it, with no copy.
///
/// It derefs to its first [`IoBuf::len`] bytes. While a transfer is in
/// flight the host holds its memory. If a read fails or times out, the I/O
/// unit may still write to the old memory, so the `IoBuf` is given fresh
/// memory instead and its contents are then unspecified (zeroes); the same
/// happens when a write from it times out (or its future is dropped) while
/// the fabric still sends from it.
///
/// [`Host::alloc`]: crate::Host::alloc
/// [`Host::read_into`]: crate::Host::read_into
/// [`Host::write_from`]: crate::Host::write_from
pub struct IoBuf {
    domain: ProtectionDomain,
    capacity: usize,
    len: usize,
    buf: Option<Buf>,
    /// The registration `buf` came from: a buffer lent to a write returns
    /// there when the fabric is done with it, contents intact.
    pool: Option<BufPool>,
}

impl IoBuf {
    pub(crate) fn new(domain: &ProtectionDomain, len: usize) -> Result<IoBuf, HostError> {
        if len == 0 {
            return Err(HostError::InvalidArgument("a buffer of 0 bytes".into()));
        }
        let mut b = IoBuf {
            domain: domain.clone(),
            capacity: len,
            len,
            buf: None,
            pool: None,
        };
        b.refresh()?;
        Ok(b)
    }

    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the registration.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the data length (reads fill exactly `len` bytes).
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] beyond the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<(), HostError> {
        if len > self.capacity {
            return Err(HostError::InvalidArgument(format!(
                "length {len} exceeds the buffer's capacity of {}",
                self.capacity
            )));
        }
        self.len = len;
        if let Some(b) = &mut self.buf {
            b.set_len(len);
        }
        Ok(())
    }

    /// Copies `data`, exactly [`IoBuf::len`] bytes, in.
    ///
    /// # Errors
    /// [`HostError::Protocol`] when the length differs; registration errors
    /// when the buffer needs fresh memory and none can be registered.
    pub(crate) fn copy_in(&mut self, data: &[u8]) -> Result<(), HostError> {
        if data.len() != self.len {
            return Err(HostError::Protocol(format!(
                "{} bytes of data for a buffer of {}",
                data.len(),
                self.len
            )));
        }
        let mine = match &mut self.buf {
            Some(b) => b,
            None => {
                self.refresh()?;
                self.buf
                    .as_mut()
                    .ok_or_else(|| HostError::InvalidArgument("the buffer has no memory".into()))?
            }
        };
        mine[..data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Lends the registered memory out for a transfer. The returned
    /// [`Lent`] puts memory back however the transfer ends, a dropped
    /// future included, so the `IoBuf` is never left without memory.
    pub(crate) fn lend(&mut self) -> Result<(Buf, Lent<'_>), HostError> {
        let raw = self.take()?;
        Ok((raw, Lent { owner: self }))
    }

    /// Takes the registered memory out for a transfer.
    fn take(&mut self) -> Result<Buf, HostError> {
        match self.buf.take() {
            Some(b) => Ok(b),
            None => {
                self.refresh()?;
                self.buf
                    .take()
                    .ok_or_else(|| HostError::InvalidArgument("the buffer has no memory".into()))
            }
        }
    }

    /// Puts memory back after a transfer: the same registration when the
    /// data landed in place, else a copy into fresh memory.
    pub(crate) fn restore(&mut self, mut buf: Buf) -> Result<(), HostError> {
        if buf.capacity() == self.capacity && buf.access().contains(dest_access()) {
            buf.set_len(self.len);
            self.buf = Some(buf);
            return Ok(());
        }
        self.refresh()?;
        let n = buf.len().min(self.len);
        if let Some(mine) = &mut self.buf {
            mine[..n].copy_from_slice(&buf[..n]);
        }
        Ok(())
    }

    /// Fresh memory, after the old one was lost to a failed transfer.
    pub(crate) fn refresh(&mut self) -> Result<(), HostError> {
        let pool = self.domain.register(self.capacity, 1, dest_access())?;
        let mut buf = pool
            .checkout()
            .ok_or_else(|| HostError::InvalidArgument("a new registration has no free chunk".into()))?;
        buf.set_len(self.len);
        self.buf = Some(buf);
        self.pool = Some(pool);
        Ok(())
    }

    /// Lends the registered memory to a write, which sends from it. The
    /// returned [`LentOut`] takes it back from its registration once the
    /// fabric let go of it (contents intact), or gives fresh memory.
    pub(crate) fn lend_out(&mut self) -> Result<(Buf, LentOut<'_>), HostError> {
        let raw = self.take()?;
        Ok((raw, LentOut { owner: self }))
    }

    /// The lent memory, if it is back in its registration.
    fn reclaim(&mut self) -> bool {
        let Some(mut buf) = self.pool.as_ref().and_then(BufPool::checkout) else {
            return false;
        };
        buf.set_len(self.len);
        self.buf = Some(buf);
        true
    }
}

/// An [`IoBuf`] whose memory a write sends from, from [`IoBuf::lend_out`].
/// Dropped without [`LentOut::reclaim`], it takes the memory back if the
/// fabric is done with it, else gives the `IoBuf` fresh memory.
#[must_use = "dropping it may give the IoBuf fresh memory"]
pub(crate) struct LentOut<'a> {
    owner: &'a mut IoBuf,
}

impl LentOut<'_> {
    /// Takes the memory back: `Ok(true)` with its contents, `Ok(false)` when
    /// the fabric still held it and the `IoBuf` got fresh memory instead.
    pub(crate) fn reclaim(self) -> Result<bool, HostError> {
        if self.owner.buf.is_some() || self.owner.reclaim() {
            return Ok(true);
        }
        self.owner.refresh()?;
        Ok(false)
    }
}

impl Drop for LentOut<'_> {
    fn drop(&mut self) {
        if self.owner.buf.is_none() && !self.owner.reclaim() {
            if let Err(e) = self.owner.refresh() {
                tracing::warn!("no fresh memory for a buffer after a cancelled write: {e}");
            }
        }
    }
}

/// An [`IoBuf`] whose memory is out on a transfer, from [`IoBuf::lend`].
/// Dropped without [`Lent::restore`], it gives the `IoBuf` fresh memory:
/// the I/O unit may still write into the lent one.
#[must_use = "dropping it gives the IoBuf fresh memory"]
pub(crate) struct Lent<'a> {
    owner: &'a mut IoBuf,
}

impl Lent<'_> {
    /// Puts the transfer's memory back (see [`IoBuf::restore`]).
    pub(crate) fn restore(self, buf: Buf) -> Result<(), HostError> {
        self.owner.restore(buf)
    }

    /// Gives the `IoBuf` fresh memory now, reporting a failure.
    pub(crate) fn refresh(self) -> Result<(), HostError> {
        self.owner.refresh()
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if self.owner.buf.is_none() {
            if let Err(e) = self.owner.refresh() {
                // Left without memory: the next use refreshes again or fails
                // with this error, never reads another transfer's memory.
                tracing::warn!("no fresh memory for a buffer after a cancelled read: {e}");
            }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => &mut b[..],
            None => &mut [],
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Smallest read destination the cache hands out.
const MIN_CLASS: usize = 4096;
/// Size classes: 4 KiB, 8 KiB, ... 512 KiB.
const CLASSES: usize = 8;
/// Bytes per pool registration (more chunks for small classes).
const POOL_BYTES: usize = 1 << 20;

/// Read destinations by power-of-two size class. Pools are registered on
/// demand and kept; a `Buf` returns to its pool when dropped.
pub(crate) struct BufCache {
    domain: ProtectionDomain,
    classes: Mutex<Vec<Vec<BufPool>>>,
}

impl BufCache {
    pub(crate) fn new(domain: ProtectionDomain) -> BufCache {
        BufCache {
            domain,
            classes: Mutex::new((0..CLASSES).map(|_| Vec::new()).collect()),
        }
    }

    /// A destination of at least `len` bytes.
    pub(crate) fn checkout(&self, len: usize) -> Result<Buf, MrError> {
        let Some(class) = class_of(len) else {
            return first(self.domain.register(len, 1, dest_access())?);
        };
        let mut classes = self.classes.lock();
        let pools = &mut classes[class];
        for pool in pools.iter() {
            if let Some(b) = pool.checkout() {
                return Ok(b);
            }
        }
        let size = MIN_CLASS << class;
        let pool = self.domain.register(size, (POOL_BYTES / size).max(2), dest_access())?;
        let b = first(pool.clone());
        pools.push(pool);
        b
    }
}

fn first(pool: BufPool) -> Result<Buf, MrError> {
    // A new registration has every chunk free; `register` refuses count 0.
    pool.checkout().ok_or(MrError::InvalidSize {
        chunk_size: pool.chunk_size(),
        count: pool.count(),
    })
}

/// The size class holding `len` bytes, or `None` above the largest.
fn class_of(len: usize) -> Option<usize> {
    let chunks = len.max(1).div_ceil(MIN_CLASS).next_power_of_two();
    let class = chunks.trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

impl fmt::Debug for BufCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pools: Vec<usize> = self.classes.lock().iter().map(Vec::len).collect();
        f.debug_struct("BufCache").field("pools_per_class", &pools).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(512 * 1024), Some(7));
        assert_eq!(class_of(512 * 1024 + 1), None);
    }

    #[test]
    fn cache_reuses_and_grows() {
        let pd = ProtectionDomain::new();
        let cache = BufCache::new(pd.clone());
        let a = cache.checkout(100).unwrap();
        assert_eq!(a.capacity(), 4096);
        assert!(a.access().contains(dest_access()));
        let held: Vec<Buf> = (0..300).map(|_| cache.checkout(4096).unwrap()).collect();
        assert!(pd.registrations() >= 2, "a full class registers another pool");
        drop(held);
        let big = cache.checkout(1 << 20).unwrap();
        assert_eq!(big.capacity(), 1 << 20);
    }

    #[test]
    fn iobuf_restores_and_refreshes() {
        let pd = ProtectionDomain::new();
        let mut b = IoBuf::new(&pd, 8192).unwrap();
        assert_eq!(b.len(), 8192);
        b[0] = 7;
        let (raw, lent) = b.lend().unwrap();
        lent.restore(raw).unwrap();
        assert_eq!(b[0], 7, "same memory back");
        let other = {
            let mut o = BufCache::new(pd.clone()).checkout(100).unwrap();
            o.fill(&[9; 100]).unwrap();
            o
        };
        b.restore(other).unwrap();
        assert_eq!(&b[..100], &[9; 100][..], "copied into fresh memory");
        assert!(b.set_len(9000).is_err());
        b.set_len(4096).unwrap();
        assert_eq!(b.len(), 4096);
        assert!(IoBuf::new(&pd, 0).is_err());
    }

    #[test]
    fn iobuf_lent_and_dropped_keeps_memory() {
        let pd = ProtectionDomain::new();
        let mut b = IoBuf::new(&pd, 8192).unwrap();
        let (raw, lent) = b.lend().unwrap();
        // A cancelled read: the memory stays with the I/O unit.
        drop(lent);
        assert_eq!(b.len(), 8192, "fresh memory, not an empty slice");
        assert_eq!(b[..].len(), 8192);
        drop(raw);
        b.copy_in(&[3; 8192]).unwrap();
        assert_eq!(b[8191], 3);
        assert!(matches!(b.copy_in(&[3; 100]), Err(HostError::Protocol(_))));
    }
}
