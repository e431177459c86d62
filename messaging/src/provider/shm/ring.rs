//! Single-producer single-consumer rings in shared memory.
//!
//! A ring is a 4096-byte header page followed by [`RING_ENTRIES`] entries of
//! 64 bytes. The header holds the producer's `tail` (offset 0), the
//! consumer's `head` (offset 64) and the consumer's `sleeping` flag (offset
//! 128), each on its own cache line. Counters run freely; an entry lives at
//! `counter % RING_ENTRIES`. The producer writes entries, then stores `tail`
//! with release ordering; the consumer loads `tail` with acquire ordering,
//! copies entries out, then stores `head` with release ordering. Both sides
//! distrust what the other wrote: the producer keeps its own `tail`, and a
//! `tail` more than a ring ahead of `head` is a protocol violation.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::sys::Mapping;

/// Entries per ring (a power of two).
pub(crate) const RING_ENTRIES: u64 = 4096;
/// Bytes per entry.
pub(crate) const ENTRY_BYTES: usize = 64;
const HEADER_BYTES: usize = 4096;
/// Bytes of one ring.
pub(crate) const RING_BYTES: usize = HEADER_BYTES + RING_ENTRIES as usize * ENTRY_BYTES;

/// One ring entry, as eight little-endian words (see `docs/protocol.md` §7b).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) opcode: u8,
    pub(crate) status: u8,
    pub(crate) len: u32,
    pub(crate) psn: u64,
    pub(crate) serial: u64,
    pub(crate) offset: u64,
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
    pub(crate) imm: u32,
}

impl Entry {
    fn to_words(self) -> [u64; 8] {
        [
            u64::from(self.opcode) | u64::from(self.status) << 8 | u64::from(self.len) << 32,
            self.psn,
            self.serial,
            self.offset,
            self.addr,
            u64::from(self.rkey) | u64::from(self.imm) << 32,
            0,
            0,
        ]
    }

    fn from_words(w: [u64; 8]) -> Entry {
        Entry {
            opcode: w[0] as u8,
            status: (w[0] >> 8) as u8,
            len: (w[0] >> 32) as u32,
            psn: w[1],
            serial: w[2],
            offset: w[3],
            addr: w[4],
            rkey: w[5] as u32,
            imm: (w[5] >> 32) as u32,
        }
    }
}

/// One side's view of one ring inside a shared mapping.
#[derive(Debug)]
pub(crate) struct Ring {
    map: Arc<Mapping>,
    base: usize,
    /// Producer: the authoritative tail. Consumer: the authoritative head.
    mine: u64,
}

/// The peer moved a counter to an impossible place.
#[derive(Debug)]
pub(crate) struct Corrupt;

impl Ring {
    /// The ring at byte `base` of `map`.
    ///
    /// # Panics
    /// If the ring does not fit (a local invariant: callers size the mapping).
    pub(crate) fn new(map: Arc<Mapping>, base: usize) -> Ring {
        assert!(
            base & 4095 == 0 && base + RING_BYTES <= map.len(),
            "ring outside its mapping"
        );
        Ring { map, base, mine: 0 }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the header offsets (0, 64, 128), inside
        // the mapping (checked in `new`) and 8-aligned (page-aligned base);
        // the memory is shared with the peer only through atomics.
        unsafe { &*self.map.ptr().as_ptr().add(self.base + offset).cast::<AtomicU64>() }
    }

    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as in `word`; offset 128 is 4-aligned.
        unsafe { &*self.map.ptr().as_ptr().add(self.base + 128).cast::<AtomicU32>() }
    }

    fn slot(&self, counter: u64) -> *mut u64 {
        let index = (counter % RING_ENTRIES) as usize;
        // SAFETY: index < RING_ENTRIES, so the slot lies inside the ring.
        unsafe {
            self.map
                .ptr()
                .as_ptr()
                .add(self.base + HEADER_BYTES + index * ENTRY_BYTES)
                .cast()
        }
    }

    // Producer side.

    /// Writes entries and publishes them; `Err` if the ring lacks room (the
    /// RC depth limits make that impossible with a correct peer).
    pub(crate) fn push(&mut self, entries: &[Entry]) -> Result<(), Corrupt> {
        let head = self.word(64).load(Ordering::Acquire);
        let used = self.mine.wrapping_sub(head);
        if used > RING_ENTRIES || RING_ENTRIES - used < entries.len() as u64 {
            return Err(Corrupt);
        }
        for entry in entries {
            let words = entry.to_words();
            let slot = self.slot(self.mine);
            for (i, w) in words.iter().enumerate() {
                // SAFETY: the slot is inside the ring and 8-aligned; the
                // consumer does not read it until `tail` moves past it.
                unsafe { std::ptr::write_volatile(slot.add(i), w.to_le()) };
            }
            self.mine = self.mine.wrapping_add(1);
        }
        self.word(0).store(self.mine, Ordering::Release);
        Ok(())
    }

    /// Whether the consumer said it is about to sleep (call after `push`).
    pub(crate) fn consumer_sleeping(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping().load(Ordering::SeqCst) != 0
    }

    // Consumer side.

    /// Copies out up to `max` published entries and frees their slots.
    pub(crate) fn pop(&mut self, out: &mut Vec<Entry>, max: usize) -> Result<usize, Corrupt> {
        let tail = self.word(0).load(Ordering::Acquire);
        let ready = tail.wrapping_sub(self.mine);
        if ready > RING_ENTRIES {
            return Err(Corrupt);
        }
        let n = (ready as usize).min(max);
        for _ in 0..n {
            let slot = self.slot(self.mine);
            let mut words = [0u64; 8];
            for (i, w) in words.iter_mut().enumerate() {
                // SAFETY: the slot is inside the ring, 8-aligned, and was
                // published by the producer's release store of `tail`.
                *w = u64::from_le(unsafe { std::ptr::read_volatile(slot.add(i)) });
            }
            out.push(Entry::from_words(words));
            self.mine = self.mine.wrapping_add(1);
        }
        if n > 0 {
            self.word(64).store(self.mine, Ordering::Release);
        }
        Ok(n)
    }

    /// Says the consumer is going to sleep; returns whether entries arrived
    /// meanwhile (then it must not sleep, and the flag is cleared again).
    pub(crate) fn prepare_sleep(&self) -> bool {
        self.sleeping().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.word(0).load(Ordering::SeqCst) != self.mine {
            self.sleeping().store(0, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Clears the sleeping flag after a wake-up.
    pub(crate) fn woke(&self) {
        self.sleeping().store(0, Ordering::SeqCst);
    }
}
