//! Runs the provider conformance suite on every provider built here.

use messaging::provider::conformance;
use messaging::provider::loopback::LoopbackFabric;
use messaging::provider::tcp::TcpFabric;

macro_rules! suite {
    ($provider:ident, $fabric:expr, $addr:expr, [$($check:ident),* $(,)?]) => {
        mod $provider {
            use super::*;

            /// The checks this provider runs, by name.
            pub const RUN: &[&str] = &[$(stringify!($check)),*];
            $(
                #[test]
                fn $check() {
                    if !conformance::selected(stringify!($provider)) {
                        return;
                    }
                    let fabric = $fabric;
                    conformance::$check(&fabric, $addr);
                }
            )*
        }
    };
}

macro_rules! all_checks {
    ($provider:ident, $fabric:expr, $addr:expr) => {
        suite!(
            $provider,
            $fabric,
            $addr,
            [
                send_recv,
                send_in_order,
                send_gather,
                write,
                write_with_imm,
                read,
                bad_key,
                other_domains_key,
                out_of_bounds,
                no_permission,
                receiver_not_ready,
                receive_too_small,
                local_protection,
                disconnect_flush,
                executed_before_disconnect,
                back_pressure,
                large_transfers_both_ways,
                hello_params,
            ]
        );
    };
}

all_checks!(loopback, LoopbackFabric::new(), "");
all_checks!(tcp, TcpFabric::new(), "127.0.0.1:0");
// "" makes the shm listener pick a name unique to this process and check.
#[cfg(target_os = "linux")]
all_checks!(shm, messaging::provider::shm::ShmFabric::new(), "");

#[test]
fn every_check_is_run_on_every_provider() {
    let suite: Vec<&str> = conformance::CHECKS.iter().map(|(name, _)| *name).collect();
    assert_eq!(loopback::RUN, &suite[..], "update all_checks! when the suite grows");
    assert_eq!(tcp::RUN, &suite[..]);
    #[cfg(target_os = "linux")]
    assert_eq!(shm::RUN, &suite[..]);
}

#[cfg(feature = "verbs")]
all_checks!(
    verbs,
    match conformance::verbs_for_tests() {
        Some(fabric) => fabric,
        None => return,
    },
    "127.0.0.1:0"
);

#[cfg(feature = "verbs")]
#[test]
fn every_check_is_run_on_verbs() {
    let suite: Vec<&str> = conformance::CHECKS.iter().map(|(name, _)| *name).collect();
    assert_eq!(verbs::RUN, &suite[..], "update all_checks! when the suite grows");
}
