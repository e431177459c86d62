use super::*;

#[test]
fn negative_errnos_from_old_rxe_are_normalised() {
    assert_eq!(os_error(-libc::EINVAL).raw_os_error(), Some(libc::EINVAL));
    assert_eq!(os_error(libc::ENOMEM).raw_os_error(), Some(libc::ENOMEM));
}

#[test]
fn wait_readable_reports_ready_fds_and_fails_on_a_closed_one() {
    let wake = WakeFd::new().unwrap();
    let quiet = wait_readable([wake.fd(), -1], Some(Duration::from_millis(1))).unwrap();
    assert_eq!(quiet, [false, false]);
    wake.wake();
    assert_eq!(wait_readable([wake.fd(), -1], None).unwrap(), [true, false]);
    wake.drain();
    // A descriptor number far above any open one: POLLNVAL, an error
    // the caller must not retry at once, rather than "readable".
    assert!(wait_readable([wake.fd(), 1 << 20], None).is_err());
}
