//! The RAM backend: a namespace held in memory, split into independently
//! locked stripes so that concurrent I/O to different places does not
//! contend.

use parking_lot::Mutex;

use super::{check_range, BlockError, BlockIo, Discard, ErrorKind, Geometry, WriteZeroes};

const STRIPE: u64 = 1 << 20;

/// A memory-backed namespace.
pub struct RamBackend {
    geometry: Geometry,
    stripes: Vec<Mutex<Box<[u8]>>>,
}

impl RamBackend {
    /// `size` bytes (a multiple of `block_size`, 512 or 4096), zeroed.
    ///
    /// # Errors
    /// `Open` for a bad size or block size.
    pub fn new(size: u64, block_size: u32) -> Result<RamBackend, BlockError> {
        if block_size != 512 && block_size != 4096 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("block size {block_size}: use 512 or 4096"),
            ));
        }
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
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
        let stripes = size.div_ceil(STRIPE);
        let stripes = (0..stripes)
            .map(|i| {
                let len = (size - i * STRIPE).min(STRIPE) as usize;
                Mutex::new(vec![0u8; len].into_boxed_slice())
            })
            .collect();
        Ok(RamBackend {
            geometry: Geometry {
                block_size,
                blocks: size / u64::from(block_size),
            },
            stripes,
        })
    }

    /// Runs `f` on each stripe piece of `[offset, offset + len)`:
    /// `(stripe bytes, position within the request)`.
    fn each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(&mut [u8], usize)) {
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let stripe = (at / STRIPE) as usize;
            let within = (at % STRIPE) as usize;
            let mut guard = self.stripes[stripe].lock();
            let n = ((guard.len() - within) as u64).min(len - pos) as usize;
            f(&mut guard[within..within + n], pos as usize);
            pos += n as u64;
        }
    }
}

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
            piece.copy_from_slice(&data[at..at + piece.len()])
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
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
    fn bad_sizes_are_refused() {
        assert!(RamBackend::new(0, 512).is_err());
        assert!(RamBackend::new(1000, 512).is_err());
        assert!(RamBackend::new(4096, 1024).is_err());
    }
}
