use std::collections::HashMap;
use std::sync::atomic::AtomicU32;

use super::*;

#[test]
fn a_child_reaches_only_its_own_registrations() {
    let fabric = ProtectionDomain::new();
    let (a, b) = (fabric.child().unwrap(), fabric.child().unwrap());
    let rights = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
    let in_a = a.register(4096, 1, rights).unwrap();
    let in_fabric = fabric.register(4096, 1, rights).unwrap();
    for pool in [&in_a, &in_fabric] {
        let r = pool.remote();
        assert!(matches!(
            b.remote_target(r.rkey, r.addr, 1, Access::REMOTE_WRITE),
            Err(RemoteAccessError::BadKey(_))
        ));
    }
    let r = in_a.remote();
    assert!(a.remote_target(r.rkey, r.addr, 1, Access::REMOTE_WRITE).is_ok());
    assert!(fabric.remote_target(r.rkey, r.addr, 1, Access::REMOTE_WRITE).is_err());
    // Local use: a child owns its parent's buffers, not its sibling's.
    let (buf_a, buf_fabric) = (in_a.checkout().unwrap(), in_fabric.checkout().unwrap());
    assert!(a.owns(&buf_a) && a.owns(&buf_fabric) && !b.owns(&buf_a));
    assert!(a.holds(&buf_a) && !a.holds(&buf_fabric));
    assert!(a.is_within(&fabric) && a.is_within(&a) && !a.is_within(&b) && !fabric.is_within(&a));
}

#[test]
fn keys_are_not_sequential() {
    let pd = ProtectionDomain::new();
    let pools: Vec<BufPool> = (0..64)
        .map(|_| pd.register(64, 1, Access::LOCAL_WRITE).unwrap())
        .collect();
    let keys: Vec<u32> = pools.iter().map(|p| p.rkey().0).collect();
    let neighbours = keys.windows(2).filter(|w| w[1].wrapping_sub(w[0]) < 1 << 16).count();
    // Random keys fall within 2^16 of the one before with odds of 2^-16.
    assert!(neighbours <= 1, "keys in sequence: {keys:x?}");
    let mut unique = keys.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), keys.len());
}

#[test]
fn checkout_and_return() {
    let pd = ProtectionDomain::new();
    let pool = pd.register(64, 2, Access::LOCAL_WRITE).unwrap();
    assert_eq!(pool.available(), 2);
    let mut a = pool.checkout().unwrap();
    assert_eq!(pool.available(), 1);
    let b = pool.checkout().unwrap();
    assert_eq!(pool.available(), 0);
    assert!(pool.checkout().is_none());
    assert_ne!(a.index(), b.index());
    a.fill(b"hello").unwrap();
    assert_eq!(&a[..], b"hello");
    assert_eq!(a.fill(&[0; 65]), Err(64));
    drop(a);
    assert_eq!(pool.available(), 1);
    drop(b);
    assert_eq!(pool.available(), 2);
}

#[test]
fn remote_checks_key_bounds_access() {
    let pd = ProtectionDomain::new();
    let pool = pd.register(64, 2, Access::LOCAL_WRITE | Access::REMOTE_WRITE).unwrap();
    let r = pool.remote();
    assert_eq!(r.len, 128);
    let mut t = pd.remote_target(r.rkey, r.addr + 64, 64, Access::REMOTE_WRITE).unwrap();
    t.as_mut_slice().copy_from_slice(&[7; 64]);
    let mut bufs: Vec<_> = std::iter::from_fn(|| pool.checkout()).collect();
    bufs.sort_by_key(|b| b.index());
    bufs[1].set_len(64);
    assert_eq!(&bufs[1][..], &[7; 64]);
    assert!(matches!(
        pd.remote_target(RKey(r.rkey.0 ^ 0x8000_0000), r.addr, 1, Access::REMOTE_WRITE),
        Err(RemoteAccessError::BadKey(_))
    ));
    assert!(matches!(
        pd.remote_target(r.rkey, r.addr + 1, 128, Access::REMOTE_WRITE),
        Err(RemoteAccessError::OutOfBounds { .. })
    ));
    assert!(matches!(
        pd.remote_target(r.rkey, r.addr, 8, Access::REMOTE_READ),
        Err(RemoteAccessError::NoPermission(_))
    ));
}

#[test]
fn deregisters_when_last_handle_drops() {
    let pd = ProtectionDomain::new();
    let pool = pd.register(16, 1, Access::LOCAL_WRITE | Access::REMOTE_READ).unwrap();
    let key = pool.rkey();
    let buf = pool.checkout().unwrap();
    drop(pool);
    assert_eq!(pd.registrations(), 1);
    drop(buf);
    assert_eq!(pd.registrations(), 0);
    assert!(pd.remote_target(key, 0, 0, Access::NONE).is_err());
}

/// A registrar that hands out fixed keys and records what it was asked.
#[derive(Default)]
struct FakeDevice {
    live: Mutex<HashMap<u64, (usize, usize)>>,
    next: AtomicU32,
    refuse: bool,
    /// Fail every deregistration, keeping the region in `stuck`.
    refuse_dereg: bool,
    stuck: Mutex<Vec<(usize, usize)>>,
    /// Give regions without remote rights the remote key 0, as rxe does.
    rxe_keys: bool,
}

// SAFETY: it never touches the memory, so it trivially reaches nothing
// outside the registration and nothing after a successful `deregister`;
// a failed one is reported as `Err`.
unsafe impl Registrar for FakeDevice {
    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Registration, MrError> {
        if self.refuse {
            return Err(MrError::Device {
                bytes: len,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        self.live.lock().insert(n, (addr as usize, len));
        let remote = access.contains(Access::REMOTE_READ) || access.contains(Access::REMOTE_WRITE);
        Ok(Registration {
            lkey: LKey(0x1000 + n as u32),
            rkey: RKey(if self.rxe_keys && !remote { 0 } else { 0x2000 + n as u32 }),
            handle: n,
        })
    }

    unsafe fn deregister(&self, handle: u64) -> Result<(), MrError> {
        let region = self.live.lock().remove(&handle).expect("deregistered once");
        if self.refuse_dereg {
            self.stuck.lock().push(region);
            return Err(MrError::Deregister {
                bytes: region.1,
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        Ok(())
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[test]
fn registrar_keys_are_reported_and_undone_on_drop() {
    let device = Arc::new(FakeDevice::default());
    let pd = ProtectionDomain::with_registrar(device.clone());
    let pool = pd.register(4096, 2, Access::ALL).unwrap();
    assert_eq!((pool.lkey(), pool.rkey()), (LKey(0x1000), RKey(0x2000)));
    let buf = pool.checkout().unwrap();
    assert_eq!(buf.lkey(), LKey(0x1000));
    assert_eq!(buf.remote().rkey, RKey(0x2000));
    assert_eq!(device.live.lock().get(&0), Some(&(pool.remote().addr as usize, 8192)));
    drop(pool);
    assert_eq!(device.live.lock().len(), 1, "a live Buf keeps the registration");
    drop(buf);
    assert!(device.live.lock().is_empty());
    assert_eq!(pd.registrations(), 0);
}

#[test]
fn local_only_regions_sharing_a_remote_key_are_all_owned() {
    let device = Arc::new(FakeDevice {
        rxe_keys: true,
        ..FakeDevice::default()
    });
    let pd = ProtectionDomain::with_registrar(device);
    let other = ProtectionDomain::new();
    let first = pd.register(64, 1, Access::LOCAL_WRITE).unwrap();
    let second = pd.register(64, 1, Access::LOCAL_WRITE).unwrap();
    let remote = pd.register(64, 1, Access::ALL).unwrap();
    let stranger = other.register(64, 1, Access::LOCAL_WRITE).unwrap();
    assert_eq!((first.rkey(), second.rkey()), (RKey(0), RKey(0)));
    assert_eq!(pd.registrations(), 3);
    for pool in [&first, &second, &remote] {
        assert!(pd.owns(&pool.checkout().unwrap()));
    }
    assert!(!pd.owns(&stranger.checkout().unwrap()));
    // The remote key 0 of the local-only regions names none of them.
    assert!(pd.remote_target(RKey(0), first.remote().addr, 1, Access::NONE).is_err());
    drop(first);
    assert_eq!(pd.registrations(), 2, "dropping one leaves the other");
    assert!(pd.owns(&second.checkout().unwrap()));
}

#[test]
fn failed_deregistration_leaks_the_memory() {
    let device = Arc::new(FakeDevice {
        refuse_dereg: true,
        ..FakeDevice::default()
    });
    let pd = ProtectionDomain::with_registrar(device.clone());
    let pool = pd.register(4096, 1, Access::ALL).unwrap();
    let addr = pool.remote().addr as usize;
    drop(pool);
    assert!(device.live.lock().is_empty(), "deregistration was attempted");
    assert_eq!(*device.stuck.lock(), vec![(addr, 4096)]);
    assert_eq!(pd.registrations(), 0, "the key no longer resolves");
    // What a device that still holds the mapping may do: write to the
    // memory. It was leaked, not freed, so this is sound (a use after
    // free otherwise, which Miri or a sanitizer would report).
    // SAFETY: the region leaked its allocation of 4096 bytes at `addr`.
    unsafe { std::ptr::write_bytes(addr as *mut u8, 0xa5, 4096) };
}

#[test]
fn registrar_refusal_fails_register() {
    let device = Arc::new(FakeDevice {
        refuse: true,
        ..FakeDevice::default()
    });
    let pd = ProtectionDomain::with_registrar(device);
    assert!(matches!(
        pd.register(64, 1, Access::LOCAL_WRITE),
        Err(MrError::Device { bytes: 64, .. })
    ));
    assert_eq!(pd.registrations(), 0);
}

#[test]
fn remote_buf_round_trip() {
    let r = RemoteBuf {
        addr: 0x1234_5678_9abc,
        len: 4096,
        rkey: RKey(77),
    };
    assert_eq!(RemoteBuf::decode(&r.encode()), Some(r));
    assert_eq!(RemoteBuf::decode(&[0; 15]), None);
}

#[test]
fn split_pieces_are_disjoint_and_the_chunk_returns_with_the_last() {
    let pd = ProtectionDomain::new();
    let pool = pd.register(1000, 2, Access::LOCAL_WRITE).unwrap();
    let mut buf = pool.checkout().unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    buf.fill(&data).unwrap();
    let base = buf.addr();
    let mut first = buf.split_to(300);
    let second = buf.split_to(300);
    assert_eq!((first.len(), first.capacity(), first.addr()), (300, 300, base));
    assert_eq!((second.len(), second.addr()), (300, base + 300));
    assert_eq!((buf.len(), buf.capacity(), buf.addr()), (400, 400, base + 600));
    assert_eq!(
        (&first[..], &second[..], &buf[..]),
        (&data[..300], &data[300..600], &data[600..])
    );
    assert_eq!(buf.remote().len, 400);
    // A piece's spare capacity is its own: filling it leaves the others be.
    first.fill(&[0xee; 300]).unwrap();
    assert!(first.fill(&[0; 301]).is_err(), "a piece does not grow into the next");
    assert_eq!(&second[..], &data[300..600]);
    assert_eq!(pool.available(), 1);
    drop(first);
    drop(buf);
    assert_eq!(pool.available(), 1, "one piece still out: the chunk stays out");
    drop(second);
    assert_eq!(pool.available(), 2, "the last piece gave the chunk back");
    // Handed out again whole.
    let again = pool.checkout().unwrap();
    let other = pool.checkout().unwrap();
    assert_eq!(again.capacity() + other.capacity(), 2000);
}

/// Test memory owned outside the domain; counts its owners' drops.
struct Owned {
    bytes: Box<[std::cell::UnsafeCell<u8>]>,
    dropped: Arc<AtomicU32>,
}

// SAFETY: the bytes are `UnsafeCell`s, written only through raw pointers.
unsafe impl Sync for Owned {}

// SAFETY: one boxed allocation that lives as long as the value; the
// bytes are cells, so concurrent writes through the pointer are allowed.
unsafe impl ExternalMemory for Owned {
    fn as_ptr(&self) -> NonNull<u8> {
        NonNull::new(self.bytes.as_ptr() as *mut u8).unwrap()
    }
    fn len(&self) -> usize {
        self.bytes.len()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

fn owned(len: usize) -> (Arc<Owned>, Arc<AtomicU32>) {
    let dropped = Arc::new(AtomicU32::new(0));
    let bytes = (0..len).map(|i| std::cell::UnsafeCell::new(i as u8)).collect();
    (
        Arc::new(Owned {
            bytes,
            dropped: dropped.clone(),
        }),
        dropped,
    )
}

#[test]
fn external_memory_is_reached_in_place_within_its_range_and_rights() {
    let pd = ProtectionDomain::new().child().unwrap();
    let (mem, dropped) = owned(8192);
    let base = mem.as_ptr().as_ptr() as u64;
    let x = pd
        .register_external(mem.clone(), 4096, 1024, Access::REMOTE_READ)
        .unwrap();
    assert_eq!(
        (x.addr(), x.len(), x.access()),
        (base + 4096, 1024, Access::REMOTE_READ)
    );
    // The owner's bytes, in place: what it holds at 4096.. is what a peer reads.
    let t = pd
        .remote_target(x.rkey(), x.addr() + 10, 4, Access::REMOTE_READ)
        .unwrap();
    assert_eq!(t.as_slice(), &[10, 11, 12, 13]);
    drop(t);
    for (addr, len, need) in [
        (x.addr() - 1, 1, Access::REMOTE_READ),
        (x.addr() + 1020, 8, Access::REMOTE_READ),
        (x.addr(), 1, Access::REMOTE_WRITE),
    ] {
        assert!(
            pd.remote_target(x.rkey(), addr, len, need).is_err(),
            "{addr:#x}+{len} {need:?}"
        );
    }
    // Another domain does not know the key.
    let other = ProtectionDomain::new();
    assert!(other.remote_target(x.rkey(), x.addr(), 1, Access::REMOTE_READ).is_err());

    // A writable exposure writes the owner's memory.
    let w = pd
        .register_external(mem.clone(), 0, 4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
        .unwrap();
    pd.remote_target(w.rkey(), w.addr() + 1, 2, Access::REMOTE_WRITE)
        .unwrap()
        .as_mut_slice()
        .copy_from_slice(&[0xaa, 0xbb]);
    // SAFETY: test-only read of bytes nothing writes concurrently.
    let seen = unsafe { std::slice::from_raw_parts(mem.as_ptr().as_ptr(), 4) }.to_vec();
    assert_eq!(seen, [0, 0xaa, 0xbb, 3]);

    // Dropping revokes at once, even while a transfer holds the region;
    // the owner goes when the last holder does.
    let in_flight = pd.remote_target(x.rkey(), x.addr(), 1, Access::REMOTE_READ).unwrap();
    let key = x.rkey();
    drop(x);
    assert!(matches!(
        pd.remote_target(key, base + 4096, 1, Access::REMOTE_READ),
        Err(RemoteAccessError::BadKey(_))
    ));
    drop((in_flight, w, mem));
    assert_eq!(dropped.load(Ordering::Relaxed), 1);
    assert_eq!(pd.registrations(), 0);
}

#[test]
fn external_ranges_outside_the_memory_or_empty_are_refused() {
    let pd = ProtectionDomain::new();
    let (mem, _) = owned(4096);
    for (offset, len) in [(0, 0), (0, 4097), (4096, 1), (usize::MAX, 2)] {
        assert!(matches!(
            pd.register_external(mem.clone(), offset, len, Access::REMOTE_READ),
            Err(MrError::InvalidSize { .. })
        ));
    }
    assert!(matches!(
        pd.register_external(mem, 0, 1, Access::REMOTE_WRITE),
        Err(MrError::InvalidAccess)
    ));
}
