//! Single-producer single-consumer rings in shared memory.
//!
//! A ring is a 4096-byte header page followed by [`RING_ENTRIES`] slots of
//! 64 bytes. The header holds the consumer's `head` (offset 64) and the
//! consumer's `sleeping` flag (offset 128), each on its own cache line.
//! Counters run freely; an entry lives at `counter % RING_ENTRIES`. The
//! producer writes an entry's other words, then its word 0 with release
//! ordering; word 0 carries the entry's *lap* (which pass over the ring
//! wrote it), so the consumer, loading word 0 of its next slot with acquire
//! ordering, knows whether the entry is published and reads one cache line
//! per entry, nothing else. It copies entries out, executes them, then
//! stores `head` with release ordering, freeing their slots. Both sides
//! distrust what the other wrote: the producer keeps its own counter and
//! refuses a `head` more than a ring behind it, and the consumer checks
//! every entry it takes.
//!
//! An entry flagged inline carries its data in the ring itself (a small
//! Send, as with verbs' `IBV_SEND_INLINE`): the first [`FIRST_INLINE`]
//! bytes in its own words 3–7, the rest in up to three continuation slots
//! that follow it (words 1–7 each, word 0 marking the slot a continuation
//! of this lap), so the consumer copies them from the ring, where it read
//! the entry, instead of fetching them from the initiator's buffer.

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

/// Entry flag: the data follows inline (words 3–7 and continuation slots).
pub(crate) const FLAG_INLINE: u8 = 1;
/// Flag of a continuation slot: words 1–7 hold inline data of the entry
/// before it.
const FLAG_CONT: u8 = 2;
/// Entry flag of a Write whose data the initiator placed itself (a region
/// the consumer granted): only the notification travels.
pub(crate) const FLAG_PLACED: u8 = 4;
/// Header word the producer sets while it copies into the consumer's
/// memory (a placement).
const PLACING: usize = 192;
/// Header word the consumer sets once it is closing: no placement may
/// start after the producer sees it.
const CLOSING: usize = 256;
/// Inline bytes in the entry itself (words 3–7).
pub(crate) const FIRST_INLINE: usize = 40;
/// Inline bytes per continuation slot (words 1–7).
const CONT_INLINE: usize = 56;
/// Largest inline payload: the entry's 40 bytes and three continuation slots.
pub(crate) const MAX_INLINE: usize = FIRST_INLINE + 3 * CONT_INLINE;

/// The lap byte of ring counter `counter` (bits 24–31 of an entry's word
/// 0): which pass over the ring wrote the entry, 1 to 255 and round again,
/// so that a zeroed slot never looks published and a slot still holding
/// the previous pass's entry or continuation carries another lap.
fn lap(counter: u64) -> u64 {
    (counter / RING_ENTRIES) % 255 + 1
}

/// Ring slots an entry takes: one, plus the continuations of its inline data.
pub(crate) fn slots(e: &Entry) -> u64 {
    if e.inline {
        1 + (e.len as usize).saturating_sub(FIRST_INLINE).div_ceil(CONT_INLINE) as u64
    } else {
        1
    }
}

/// One ring entry, as eight little-endian words (see `docs/protocol.md` §7b).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) opcode: u8,
    pub(crate) status: u8,
    /// The data travels inline ([`FLAG_INLINE`]): the producer takes it from
    /// the data passed to [`Ring::push`]; for the consumer, `offset` is the
    /// entry's ring counter, and [`Ring::inline_data`] copies the data out.
    pub(crate) inline: bool,
    /// A Write whose data the initiator already placed ([`FLAG_PLACED`]).
    pub(crate) placed: bool,
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
        let flags = if self.inline { FLAG_INLINE } else { 0 } | if self.placed { FLAG_PLACED } else { 0 };
        let w0 =
            u64::from(self.opcode) | u64::from(self.status) << 8 | u64::from(flags) << 16 | u64::from(self.len) << 32;
        if self.inline {
            // Words 3–7 are filled with data by `push`.
            return [w0, self.psn, u64::from(self.imm), 0, 0, 0, 0, 0];
        }
        [
            w0,
            self.psn,
            self.serial,
            self.offset,
            self.addr,
            u64::from(self.rkey) | u64::from(self.imm) << 32,
            0,
            0,
        ]
    }

    fn from_words(w: [u64; 8]) -> Result<Entry, Corrupt> {
        let flags = (w[0] >> 16) as u8;
        if flags == FLAG_CONT {
            return Err(Corrupt("a continuation slot where an entry was due"));
        }
        if flags & !(FLAG_INLINE | FLAG_PLACED) != 0 {
            return Err(Corrupt("unknown entry flags"));
        }
        if flags == FLAG_INLINE | FLAG_PLACED {
            return Err(Corrupt("an entry both inline and placed"));
        }
        let mut e = Entry {
            opcode: w[0] as u8,
            status: (w[0] >> 8) as u8,
            inline: flags & FLAG_INLINE != 0,
            placed: flags & FLAG_PLACED != 0,
            len: (w[0] >> 32) as u32,
            psn: w[1],
            ..Entry::default()
        };
        if e.inline {
            if e.len as usize > MAX_INLINE {
                return Err(Corrupt("inline entry longer than the inline limit"));
            }
            e.imm = w[2] as u32;
        } else {
            e.serial = w[2];
            e.offset = w[3];
            e.addr = w[4];
            e.rkey = w[5] as u32;
            e.imm = (w[5] >> 32) as u32;
        }
        Ok(e)
    }
}

/// One side's view of one ring inside a shared mapping.
#[derive(Debug)]
pub(crate) struct Ring {
    map: Arc<Mapping>,
    base: usize,
    /// Producer: the authoritative tail. Consumer: the authoritative head.
    mine: u64,
    /// Producer: the consumer's `head` as last read. Reading it costs a
    /// cache line from the other core (the consumer writes it on every
    /// pop), so the producer reads it only when this copy says the ring
    /// may lack room.
    seen_head: u64,
}

/// The peer moved a counter to an impossible place or wrote a malformed
/// entry; says which.
#[derive(Debug)]
pub(crate) struct Corrupt(pub(crate) &'static str);

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
        Ring {
            map,
            base,
            mine: 0,
            seen_head: 0,
        }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        header_word(&self.map, self.base, offset)
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

    /// Word 0 of the slot of `counter`, shared with the peer as an atomic.
    fn head_word(&self, counter: u64) -> &AtomicU64 {
        // SAFETY: the slot lies inside the ring (see `slot`) and is 8-aligned;
        // word 0 is only ever accessed atomically by both sides.
        unsafe { &*self.slot(counter).cast::<AtomicU64>() }
    }

    // Producer side.

    /// Slots in use (published and not yet consumed) at most, as the
    /// producer last saw the consumer's `head`; re-read when that says the
    /// ring is more than `above` full. `Err` if the consumer's `head` is
    /// impossible.
    pub(crate) fn used(&mut self, above: u64) -> Result<u64, Corrupt> {
        let used = self.mine.wrapping_sub(self.seen_head);
        if used <= above {
            return Ok(used);
        }
        let head = self.word(64).load(Ordering::Acquire);
        let used = self.mine.wrapping_sub(head);
        if used > RING_ENTRIES {
            return Err(Corrupt("consumer head out of range"));
        }
        self.seen_head = head;
        Ok(used)
    }

    /// Writes entries and publishes them; `Err` if the ring lacks room (the
    /// RC depth limits make that impossible with a correct peer). Inline
    /// entries take their data, in order, from `data`.
    ///
    /// Each entry's word 0 (with its lap) is stored last, with release
    /// ordering, after its other words and continuation slots: a consumer
    /// that sees the lap sees the whole entry.
    ///
    /// # Panics
    /// If `data` is shorter than the inline entries' lengths (a local bug).
    pub(crate) fn push(&mut self, entries: &[Entry], data: &[u8]) -> Result<(), Corrupt> {
        let needed: u64 = entries.iter().map(slots).sum();
        let used = self.used(RING_ENTRIES.saturating_sub(needed))?;
        if RING_ENTRIES - used < needed {
            return Err(Corrupt("ring full"));
        }
        let mut data = data;
        for entry in entries {
            let at = self.mine;
            let slot = self.slot(at);
            let words = entry.to_words();
            if entry.inline {
                let (bytes, rest) = data.split_at(entry.len as usize);
                data = rest;
                let first = bytes.len().min(FIRST_INLINE);
                // SAFETY: words 3–7 of the slot are 40 bytes inside the ring;
                // the consumer reads them only after word 0 shows this lap.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.add(3).cast::<u8>(), first) };
                for (k, chunk) in bytes[first..].chunks(CONT_INLINE).enumerate() {
                    let c = at.wrapping_add(1 + k as u64);
                    let next = self.slot(c);
                    // SAFETY: words 1–7 of a slot inside the ring, read only
                    // after the entry's word 0 is published.
                    unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), next.add(1).cast::<u8>(), chunk.len()) };
                    let cont = u64::from(FLAG_CONT) << 16 | lap(c) << 24;
                    self.head_word(c).store(cont.to_le(), Ordering::Relaxed);
                }
                for (i, w) in words.iter().enumerate().take(3).skip(1) {
                    // SAFETY: the slot is inside the ring and 8-aligned;
                    // unpublished until word 0 is stored.
                    unsafe { std::ptr::write_volatile(slot.add(i), w.to_le()) };
                }
            } else {
                for (i, w) in words.iter().enumerate().skip(1) {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_volatile(slot.add(i), w.to_le()) };
                }
            }
            self.head_word(at)
                .store((words[0] | lap(at) << 24).to_le(), Ordering::Release);
            self.mine = self.mine.wrapping_add(slots(entry));
        }
        Ok(())
    }

    /// Whether the consumer said it is about to sleep (call after `push`).
    pub(crate) fn consumer_sleeping(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping().load(Ordering::SeqCst) != 0
    }

    // Consumer side.

    /// Copies out up to `max` published entries. An entry is published
    /// when its word 0 carries the lap of the consumer's counter, so the
    /// consumer reads one cache line per entry, not the producer's `tail`
    /// first. An inline entry's `offset` is its ring counter: its data stays
    /// in the ring, for [`Ring::inline_data`], until [`Ring::release`].
    pub(crate) fn pop(&mut self, out: &mut Vec<Entry>, max: usize) -> Result<usize, Corrupt> {
        let mut n = 0;
        while n < max {
            let w0 = u64::from_le(self.head_word(self.mine).load(Ordering::Acquire));
            if (w0 >> 24) & 0xff != lap(self.mine) {
                break;
            }
            let slot = self.slot(self.mine);
            let mut words = [w0, 0, 0, 0, 0, 0, 0, 0];
            for (i, w) in words.iter_mut().enumerate().skip(1) {
                // SAFETY: the slot is inside the ring, 8-aligned, and was
                // published by the producer's release store of word 0.
                *w = u64::from_le(unsafe { std::ptr::read_volatile(slot.add(i)) });
            }
            let mut entry = Entry::from_words(words)?;
            let taken = slots(&entry);
            if entry.inline {
                entry.offset = self.mine;
                for k in 1..taken {
                    let c = self.mine.wrapping_add(k);
                    let cont = u64::from_le(self.head_word(c).load(Ordering::Relaxed));
                    if cont != u64::from(FLAG_CONT) << 16 | lap(c) << 24 {
                        return Err(Corrupt("inline entry without its continuation"));
                    }
                }
            }
            out.push(entry);
            self.mine = self.mine.wrapping_add(taken);
            n += 1;
        }
        Ok(n)
    }

    /// Copies the data of `entry`, an inline entry [`Ring::pop`] returned
    /// since the last [`Ring::release`], into `dest` (`entry.len` bytes).
    ///
    /// # Panics
    /// If `dest` is not `entry.len` bytes long (a local bug).
    pub(crate) fn inline_data(&self, entry: &Entry, dest: &mut [u8]) {
        assert_eq!(dest.len(), entry.len as usize, "inline data of another length");
        let first = dest.len().min(FIRST_INLINE);
        let (head, rest) = dest.split_at_mut(first);
        // SAFETY: words 3–7 of the entry's slot, 40 bytes inside the ring
        // (`first` is at most that); the slot was published and `pop`
        // took it, and the producer does not reuse it before `release`
        // moves `head` past it; `dest` is a distinct local borrow, and no
        // reference to the shared bytes is formed, so a peer writing them
        // anyway can only change the bytes copied.
        unsafe { std::ptr::copy_nonoverlapping(self.slot(entry.offset).add(3).cast::<u8>(), head.as_mut_ptr(), first) };
        for (k, part) in rest.chunks_mut(CONT_INLINE).enumerate() {
            let c = entry.offset.wrapping_add(1 + k as u64);
            // SAFETY: as above, for words 1–7 (56 bytes, at least `part`)
            // of a continuation slot `pop` checked.
            unsafe { std::ptr::copy_nonoverlapping(self.slot(c).add(1).cast::<u8>(), part.as_mut_ptr(), part.len()) };
        }
    }

    /// Frees the slots of every entry popped so far: the producer may write
    /// them again (call once their inline data was copied).
    pub(crate) fn release(&mut self) {
        self.word(64).store(self.mine, Ordering::Release);
    }

    /// Says the consumer is going to sleep; returns whether entries arrived
    /// meanwhile (then it must not sleep, and the flag is cleared again).
    pub(crate) fn prepare_sleep(&self) -> bool {
        self.sleeping().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if (u64::from_le(self.head_word(self.mine).load(Ordering::SeqCst)) >> 24) & 0xff == lap(self.mine) {
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

/// A header word of the ring at `base`.
fn header_word(map: &Mapping, base: usize, offset: usize) -> &AtomicU64 {
    assert!(offset < HEADER_BYTES && offset % 64 == 0, "not a header word");
    // SAFETY: `offset` is a line of the header page, inside the mapping
    // (`Ring::new` and `Gate::new` check the ring fits) and 8-aligned
    // (page-aligned base); the memory is shared with the peer only through
    // atomics, and a zeroed word is a valid `AtomicU64`.
    unsafe { &*map.ptr().as_ptr().add(base + offset).cast::<AtomicU64>() }
}

/// The placement handshake of one ring, usable without its lock: the
/// ring's producer may copy into memory the consumer granted it (see
/// `docs/protocol.md` §7b) only between [`Gate::begin_placing`] and
/// [`Gate::end_placing`]; the consumer, closing, calls [`Gate::close`] and
/// from then on no placement is running or can start. A store and a load on
/// each side, both sequentially consistent: either the producer sees
/// `closing`, or the consumer sees `placing` and waits.
#[derive(Debug)]
pub(crate) struct Gate {
    map: Arc<Mapping>,
    base: usize,
}

impl Gate {
    /// The gate of the ring at byte `base` of `map`.
    ///
    /// # Panics
    /// If the ring does not fit (a local invariant, as in [`Ring::new`]).
    pub(crate) fn new(map: Arc<Mapping>, base: usize) -> Gate {
        assert!(
            base & 4095 == 0 && base + RING_BYTES <= map.len(),
            "ring outside its mapping"
        );
        Gate { map, base }
    }

    // Producer side.

    /// Announces a placement; `false` (nothing announced) once the
    /// consumer is closing.
    pub(crate) fn begin_placing(&self) -> bool {
        header_word(&self.map, self.base, PLACING).store(1, Ordering::SeqCst);
        if header_word(&self.map, self.base, CLOSING).load(Ordering::SeqCst) != 0 {
            self.end_placing();
            return false;
        }
        true
    }

    /// The placement is over.
    pub(crate) fn end_placing(&self) {
        header_word(&self.map, self.base, PLACING).store(0, Ordering::Release);
    }

    // Consumer side.

    /// Says the consumer is closing, then waits until no placement runs
    /// (the producer finishes a copy in microseconds); `false` if one still
    /// ran at `deadline` (a producer stopped in the middle of its copy).
    pub(crate) fn close(&self, deadline: std::time::Instant) -> bool {
        header_word(&self.map, self.base, CLOSING).store(1, Ordering::SeqCst);
        while header_word(&self.map, self.base, PLACING).load(Ordering::SeqCst) != 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }
}
