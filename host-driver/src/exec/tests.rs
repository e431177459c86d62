use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::*;

#[test]
fn sweepers_are_called_every_period_until_dropped() {
    struct Count(AtomicUsize);
    impl Sweep for Count {
        fn sweep(&self, _now: Option<Instant>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let timer = Timer::start().unwrap();
    let count = Arc::new(Count(AtomicUsize::new(0)));
    assert!(timer.watch(Arc::downgrade(&count) as Weak<dyn Sweep>));
    // Nothing else registered: the thread wakes on its own, every
    // TIMER_PERIOD, and sweeps each time.
    let t0 = Instant::now();
    while count.0.load(Ordering::SeqCst) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no periodic sweep");
        std::thread::sleep(Duration::from_millis(10));
    }
    let weak = Arc::downgrade(&count);
    drop(count);
    std::thread::sleep(TIMER_PERIOD * 3);
    assert!(weak.upgrade().is_none(), "the timer keeps no sweeper alive");
    assert!(
        timer.shared.state.lock().sweepers.is_empty(),
        "a dropped sweeper is forgotten"
    );
    // Stopping sweeps once more (everything is due then), and a
    // stopped timer refuses new sweepers.
    let last = Arc::new(Count(AtomicUsize::new(0)));
    assert!(timer.watch(Arc::downgrade(&last) as Weak<dyn Sweep>));
    let before = last.0.load(Ordering::SeqCst);
    timer.stop();
    assert!(last.0.load(Ordering::SeqCst) > before, "stop sweeps");
    assert!(!timer.watch(Arc::downgrade(&last) as Weak<dyn Sweep>));
}

#[test]
fn sleeps_and_deadlines() {
    let timer = Timer::start().unwrap();
    let t0 = Instant::now();
    block_on(timer.sleep_until(t0 + Duration::from_millis(30)));
    assert!(t0.elapsed() >= Duration::from_millis(30));
    let never = std::future::pending::<()>();
    let t1 = Instant::now();
    assert_eq!(
        block_on(deadline(&timer, Some(t1 + Duration::from_millis(20)), never)),
        None
    );
    assert!(t1.elapsed() >= Duration::from_millis(20));
    assert_eq!(block_on(deadline(&timer, None, async { 7 })), Some(7));
    // A deadline already passed ends the wait (the first poll only
    // registers it; the timer wakes the future at once).
    let never = std::future::pending::<()>();
    let t2 = Instant::now();
    assert_eq!(block_on(deadline(&timer, Some(t2), never)), None);
    assert!(t2.elapsed() < Duration::from_secs(5));
    // Waits registered before the timer stops end when it stops.
    std::thread::scope(|s| {
        let far = Instant::now() + Duration::from_secs(60);
        let timer = &timer;
        let sleep = s.spawn(move || block_on(timer.sleep_until(far)));
        let wait = s.spawn(move || block_on(deadline(timer, Some(far), std::future::pending::<()>())));
        while timer.pending() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stopped = Instant::now();
        timer.stop();
        sleep.join().unwrap();
        assert_eq!(wait.join().unwrap(), None);
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "waits woken by stop went on to their deadline"
        );
    });
    // A stopped timer ends waits at once instead of never.
    block_on(timer.sleep_until(Instant::now() + Duration::from_secs(60)));
    let never = std::future::pending::<()>();
    assert_eq!(
        block_on(deadline(&timer, Some(Instant::now() + Duration::from_secs(60)), never)),
        None
    );
}

#[test]
fn lock_excludes_and_join_orders() {
    let lock = AsyncLock::default();
    let counter = Mutex::new((0u32, 0u32));
    let timer = Timer::start().unwrap();
    let work = |i: u32| {
        let (lock, counter, timer) = (&lock, &counter, &timer);
        async move {
            let _g = lock.lock().await;
            {
                let mut c = counter.lock();
                c.0 += 1;
                c.1 = c.1.max(c.0);
            }
            timer.sleep_until(Instant::now() + Duration::from_millis(2)).await;
            counter.lock().0 -= 1;
            i * 10
        }
    };
    let out = block_on(join_all((0..5).map(work).collect()));
    assert_eq!(out, vec![0, 10, 20, 30, 40]);
    assert_eq!(counter.lock().1, 1, "never two holders at once");
    timer.stop();
}

#[test]
fn finished_waits_leave_no_timer_entries() {
    let timer = Timer::start().unwrap();
    let far = Instant::now() + Duration::from_secs(30);
    for _ in 0..100 {
        // Pending once, so the deadline registers, then done.
        let mut polled = false;
        let once = std::future::poll_fn(|cx| {
            if polled {
                Poll::Ready(5)
            } else {
                polled = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        assert_eq!(block_on(deadline(&timer, Some(far), once)), Some(5));
    }
    assert_eq!(timer.pending(), 0, "a finished deadline is removed");
    {
        let mut sleep = std::pin::pin!(timer.sleep_until(far));
        let waker = Waker::from(Arc::new(Noop));
        assert!(sleep.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        assert_eq!(timer.pending(), 1);
    }
    assert_eq!(timer.pending(), 0, "a dropped sleep is removed");
    timer.stop();
}

#[test]
fn a_woken_entry_dropped_late_leaves_the_next_user_of_its_key_alone() {
    let timer = Timer::start().unwrap();
    let waker = Waker::from(Arc::new(Noop));
    // Due at once: the timer thread wakes it and frees its slab key.
    let early = timer.wake_at(Instant::now(), &waker).expect("timer runs");
    let t0 = Instant::now();
    while timer.pending() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the due entry was never woken");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The freed key goes to the next registration.
    let far = timer
        .wake_at(Instant::now() + Duration::from_secs(30), &waker)
        .expect("timer runs");
    assert_eq!(far.key, early.key, "the slab reuses the freed key");
    drop(early);
    assert_eq!(
        timer.pending(),
        1,
        "dropping the woken entry must not cancel its key's new user"
    );
    drop(far);
    assert_eq!(timer.pending(), 0);
    timer.stop();
}

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Futures that finish once `done[i]` is set and otherwise leave their
/// waker in `wakers[i]`; each poll of future `i` counts in `polls[i]`.
fn gated<'a>(
    wakers: &'a Mutex<Vec<Option<Waker>>>,
    done: &'a [AtomicBool],
    polls: &'a [AtomicUsize],
) -> Vec<impl Future<Output = usize> + 'a> {
    (0..done.len())
        .map(|i| {
            std::future::poll_fn(move |cx| {
                polls[i].fetch_add(1, Ordering::SeqCst);
                if done[i].load(Ordering::SeqCst) {
                    return Poll::Ready(i);
                }
                wakers.lock()[i] = Some(cx.waker().clone());
                Poll::Pending
            })
        })
        .collect()
}

#[test]
fn join_all_polls_only_the_futures_that_were_woken() {
    let polls: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
    let wakers: Mutex<Vec<Option<Waker>>> = Mutex::new(vec![None, None, None]);
    let done: Vec<AtomicBool> = (0..3).map(|_| AtomicBool::new(false)).collect();
    let mut all = std::pin::pin!(join_all(gated(&wakers, &done, &polls)));
    let parent = Waker::noop();
    let mut cx = Context::from_waker(parent);
    assert!(all.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        polls.iter().map(|p| p.load(Ordering::SeqCst)).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    // Only future 1 is woken: only it is polled again.
    done[1].store(true, Ordering::SeqCst);
    wakers.lock()[1].take().unwrap().wake();
    assert!(all.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        polls.iter().map(|p| p.load(Ordering::SeqCst)).collect::<Vec<_>>(),
        [1, 2, 1]
    );
    for i in [0, 2] {
        done[i].store(true, Ordering::SeqCst);
        wakers.lock()[i].take().unwrap().wake();
    }
    assert_eq!(all.as_mut().poll(&mut cx), Poll::Ready(vec![0, 1, 2]));
}

/// Counts the wake-ups it receives.
#[derive(Default)]
struct CountWakes(AtomicUsize);
impl Wake for CountWakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn join_all_wakes_its_parent_once_per_round() {
    let wakers: Mutex<Vec<Option<Waker>>> = Mutex::new(vec![None; 4]);
    let done: Vec<AtomicBool> = (0..4).map(|_| AtomicBool::new(false)).collect();
    let polls: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
    let mut all = std::pin::pin!(join_all(gated(&wakers, &done, &polls)));
    let parent = Arc::new(CountWakes::default());
    let parent_waker = Waker::from(parent.clone());
    let mut cx = Context::from_waker(&parent_waker);
    assert!(all.as_mut().poll(&mut cx).is_pending());
    // Three completions of one reap: one wake-up of the parent.
    for (i, d) in done.iter().enumerate().take(3) {
        d.store(true, Ordering::SeqCst);
        wakers.lock()[i].take().unwrap().wake();
    }
    assert_eq!(parent.0.load(Ordering::SeqCst), 1);
    assert!(all.as_mut().poll(&mut cx).is_pending(), "future 3 is not done");
    // A wake after that poll began wakes the parent again.
    done[3].store(true, Ordering::SeqCst);
    wakers.lock()[3].take().unwrap().wake();
    assert_eq!(parent.0.load(Ordering::SeqCst), 2);
    assert_eq!(all.as_mut().poll(&mut cx), Poll::Ready(vec![0, 1, 2, 3]));
}

#[test]
fn join_all_loses_no_wake_from_another_thread() {
    // Futures that finish after being woken ROUNDS times each, woken
    // from another thread while `block_on` polls: a lost wake-up would
    // leave `block_on` parked for good.
    const FUTS: usize = 8;
    const ROUNDS: usize = 2000;
    let wakers: Arc<Mutex<Vec<Option<Waker>>>> = Arc::new(Mutex::new(vec![None; FUTS]));
    let woken: Arc<Vec<AtomicUsize>> = Arc::new((0..FUTS).map(|_| AtomicUsize::new(0)).collect());
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = {
        let (wakers, woken) = (wakers.clone(), woken.clone());
        std::thread::spawn(move || {
            let futs: Vec<_> = (0..FUTS)
                .map(|i| {
                    let (wakers, woken) = (wakers.clone(), woken.clone());
                    std::future::poll_fn(move |cx| {
                        if woken[i].load(Ordering::SeqCst) >= ROUNDS {
                            return Poll::Ready(i);
                        }
                        wakers.lock()[i] = Some(cx.waker().clone());
                        Poll::Pending
                    })
                })
                .collect();
            let _ = tx.send(block_on(join_all(futs)));
        })
    };
    let give_up = Instant::now() + Duration::from_secs(20);
    let mut left = FUTS;
    while left > 0 {
        assert!(
            Instant::now() < give_up,
            "a woken future was never polled again (lost wake-up)"
        );
        left = 0;
        for i in 0..FUTS {
            if woken[i].load(Ordering::SeqCst) >= ROUNDS {
                continue;
            }
            left += 1;
            if let Some(w) = wakers.lock()[i].take() {
                woken[i].fetch_add(1, Ordering::SeqCst);
                w.wake();
            }
        }
        std::hint::spin_loop();
    }
    let out = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("join_all was never woken for its last completions");
    assert_eq!(out, (0..FUTS).collect::<Vec<_>>());
    runner.join().unwrap();
}

#[test]
fn a_far_deadline_does_not_wake_the_timer_thread() {
    let timer = Timer::start().unwrap();
    // Let the thread settle into its periodic sleep.
    std::thread::sleep(Duration::from_millis(20));
    let waker = Waker::noop();
    let before = timer.shared.state.lock().notifies;
    let far = timer.wake_at(Instant::now() + Duration::from_secs(60), waker).unwrap();
    assert_eq!(
        timer.shared.state.lock().notifies,
        before,
        "a 60 s deadline woke the timer thread"
    );
    // A deadline before the thread's next own wake-up does wake it, and fires.
    block_on(timer.sleep_until(Instant::now() + Duration::from_millis(5)));
    assert!(
        timer.shared.state.lock().notifies > before,
        "a near deadline did not wake the timer thread"
    );
    drop(far);
    timer.stop();
}
