//! The RAM backend: a namespace held in memory, split into independently
//! locked stripes so that concurrent I/O to different places does not
//! contend.
//!
//! The memory is one sealed memfd, mapped shared (so that storage windows
//! can hand it to a host process over shm), which the kernel is asked to
//! back with transparent huge pages: random 4 KiB I/O across a large
//! namespace would otherwise miss the TLB on nearly every request (on a VM
//! each miss is a two-dimensional page walk). Whether it does depends on
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled` (`advise` lets it).

use std::sync::Arc;

use messaging::mr::ExternalMemory;
use messaging::provider::shm::SealedMemory;
use parking_lot::Mutex;

use super::{check_range, BlockError, BlockIo, Discard, ErrorKind, Geometry, WriteZeroes};

const STRIPE: u64 = 1 << 20;

/// A memory-backed namespace.
pub struct RamBackend {
    geometry: Geometry,
    /// Shared with the storage windows that expose it.
    arena: Arc<Arena>,
    /// One lock per [`STRIPE`] bytes of `arena`.
    stripes: Vec<Mutex<()>>,
}

impl RamBackend {
    /// `size` bytes (a multiple of `block_size`, 512 or 4096), zeroed.
    ///
    /// # Errors
    /// `Open` for a bad size or block size, or when the memory cannot be
    /// mapped.
    pub fn new(size: u64, block_size: u32) -> Result<RamBackend, BlockError> {
        if block_size != 512 && block_size != 4096 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("block size {block_size}: use 512 or 4096"),
            ));
        }
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("RAM size {size} is not a positive multiple of {block_size}"),
            ));
        }
        if size > 1 << 40 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("RAM size {size} is unreasonably large"),
            ));
        }
        let len = usize::try_from(size).map_err(|_| {
            BlockError::new(
                ErrorKind::Open,
                format!("RAM size {size} does not fit this machine's address space"),
            )
        })?;
        let arena = Arena::new("chanio-ram", len)
            .map(Arc::new)
            .map_err(|e| BlockError::new(ErrorKind::Open, format!("cannot map {size} bytes of RAM: {e}")))?;
        // A hint: where transparent huge pages for shared memory are off
        // (`shmem_enabled`, "never" by default) or this fails, the
        // namespace works on small pages.
        // SAFETY: advises on exactly the arena's mapping, which it leaves
        // mapped and its contents unchanged.
        unsafe { libc::madvise(arena.as_ptr().as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        let stripes = (0..size.div_ceil(STRIPE)).map(|_| Mutex::new(())).collect();
        Ok(RamBackend {
            geometry: Geometry {
                block_size,
                blocks: size / u64::from(block_size),
            },
            arena,
            stripes,
        })
    }

    /// Runs `f` on each stripe piece of `[offset, offset + len)`:
    /// `(stripe bytes, position within the request)`. The caller checked
    /// the range.
    fn each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(&mut [u8], usize)) {
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let stripe = (at / STRIPE) as usize;
            let stripe_end = ((stripe as u64 + 1) * STRIPE).min(self.arena.len() as u64);
            let n = (stripe_end - at).min(len - pos) as usize;
            let _guard = self.stripes[stripe].lock();
            // SAFETY: `[at, at + n)` lies inside the arena (the caller
            // checked the range against the geometry, which is the arena's
            // size) and inside one stripe; the stripe's lock, held until
            // `f` returns, is the only way to reach those bytes, so this
            // is the one live reference to them. The arena lives as long
            // as `self`, which outlives the borrow.
            let piece = unsafe { std::slice::from_raw_parts_mut(self.arena.as_ptr().as_ptr().add(at as usize), n) };
            f(piece, pos as usize);
            pos += n as u64;
        }
    }
}

/// Copies `src` into `dst` (same length) with non-temporal stores where
/// the CPU has them: written blocks go to memory without first reading
/// each cache line in (a random 4 KiB write into a large namespace
/// otherwise waits for 64 line fills) and without evicting hot data.
fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        const LINE: usize = 64;
        // Plain copies for the unaligned head and the tail.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / LINE * LINE;
        dst[..head].copy_from_slice(&src[..head]);
        let (d, s) = (&mut dst[head..head + body], &src[head..head + body]);
        for (d, s) in d.chunks_exact_mut(LINE).zip(s.chunks_exact(LINE)) {
            let (dp, sp) = (d.as_mut_ptr().cast::<__m128i>(), s.as_ptr().cast::<__m128i>());
            // SAFETY: SSE2 is part of x86_64. Each chunk is 64 bytes, so
            // the four 16-byte loads and stores stay inside `s` and `d`;
            // `d` starts 16-byte aligned (`head` aligned it and every
            // chunk is a multiple of 16), as `_mm_stream_si128` requires;
            // `_mm_loadu_si128` takes any alignment.
            unsafe {
                for i in 0..4 {
                    _mm_stream_si128(dp.add(i), _mm_loadu_si128(sp.add(i)));
                }
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        // Non-temporal stores are weakly ordered: fence them before the
        // stripe lock is released, so the next holder reads the new bytes.
        // SAFETY: SSE is part of x86_64; a fence has no memory operands.
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// The namespace's memory: a sealed memfd, mapped shared, zero-filled by
/// the kernel on first touch ([`SealedMemory`]). Storage windows register
/// it in place: a host's RDMA reaches it without the stripe locks, as DMA
/// would (`docs/protocol.md` §9.6 says what a command and a window access
/// to the same blocks at once give); over shm a host of the daemon's own
/// user maps the memfd and copies itself. The backend reaches the bytes
/// only for the length of one copy, under a stripe lock.
type Arena = SealedMemory;

impl std::fmt::Debug for RamBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBackend").field("geometry", &self.geometry).finish()
    }
}

impl BlockIo for RamBackend {
    fn describe(&self) -> String {
        format!("ram:{}", self.geometry.bytes())
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(self.geometry, offset, buf.len() as u64)?;
        self.each_piece(offset, buf.len() as u64, |piece, at| {
            buf[at..at + piece.len()].copy_from_slice(piece)
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BlockError> {
        check_range(self.geometry, offset, data.len() as u64)?;
        self.each_piece(offset, data.len() as u64, |piece, at| {
            copy_streaming(piece, &data[at..at + piece.len()])
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn may_block(&self) -> bool {
        false
    }

    fn window_memory(&self) -> Option<Arc<dyn ExternalMemory>> {
        Some(self.arena.clone())
    }

    fn commit(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        // Memory is this namespace's storage: what a window write placed is
        // as durable as a command's write once it landed.
        check_range(self.geometry, offset, len)
    }
}

impl WriteZeroes for RamBackend {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry, offset, len)?;
        self.each_piece(offset, len, |piece, _| piece.fill(0));
        Ok(())
    }
}

impl Discard for RamBackend {
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        for bs in [512, 4096] {
            let ram = RamBackend::new(3 * STRIPE + 4096, bs).unwrap();
            super::super::conformance::run(&ram);
            // A request spanning stripes.
            let data = vec![0xa5u8; 3 * 4096];
            ram.write(STRIPE - 4096, &data, false).unwrap();
            let mut back = vec![0u8; data.len()];
            ram.read(STRIPE - 4096, &mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn streaming_copy_matches_a_plain_copy_at_any_alignment() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
        for dst_at in [0, 1, 15, 16, 17, 63, 64, 100] {
            for len in [0, 1, 15, 16, 63, 64, 65, 127, 128, 4096, 4097, 8000] {
                let mut dst = vec![0xeeu8; 8300];
                copy_streaming(&mut dst[dst_at..dst_at + len], &src[5..5 + len]);
                assert_eq!(&dst[dst_at..dst_at + len], &src[5..5 + len], "at {dst_at}, {len} bytes");
                assert!(
                    dst[..dst_at].iter().all(|&b| b == 0xee),
                    "bytes before {dst_at} touched"
                );
                assert!(
                    dst[dst_at + len..].iter().all(|&b| b == 0xee),
                    "bytes after {len} touched"
                );
            }
        }
    }

    #[test]
    fn a_new_namespace_reads_as_zeros() {
        let ram = RamBackend::new(STRIPE + 4096, 4096).unwrap();
        let mut back = vec![0xffu8; 8192];
        ram.read(STRIPE - 4096, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(RamBackend::new(0, 512).is_err());
        assert!(RamBackend::new(1000, 512).is_err());
        assert!(RamBackend::new(4096, 1024).is_err());
    }
}
