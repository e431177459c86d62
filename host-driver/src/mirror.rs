//! Client-side replication: the host writes to several I/O units itself
//! and reads from any of them (the seed's variant, where the network I/O
//! device at the client replicates).
//!
//! A [`Mirror`] holds one [`Host`] per leg. A write, Write Zeroes,
//! deallocate or flush goes to every healthy leg at once and completes
//! when all of them have it; a leg that fails leaves the mirror (it is
//! never read again) and the call succeeds on the others, so writes go on
//! degraded; the call fails only when no leg is left. Reads go to the
//! healthy legs in turn, and to the next one when a leg fails.
//!
//! The mirror's membership lives in the client: a leg that failed is not
//! resynchronised, and a new `Mirror` over the same legs cannot know which
//! one missed writes. Where that matters, replicate at the I/O units
//! instead (their membership lives in etcd).

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::{exec, Host, HostError, HostOptions, Nsid};

/// One leg's state, as [`Mirror::legs`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegState {
    /// The leg's target URI.
    pub uri: String,
    /// Why it left the mirror; `None` while it is healthy.
    pub failed: Option<String>,
}

struct Leg {
    uri: String,
    host: Host,
    /// `Host::connections` when the leg joined: a leg that reconnected
    /// reached another incarnation of its I/O unit, which may not hold
    /// what this mirror wrote.
    connections: u64,
    failed: Mutex<Option<String>>,
}

/// Writes to every leg, reads from any (see the module docs).
pub struct Mirror {
    legs: Vec<Leg>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("legs", &self.legs()).finish()
    }
}

impl Mirror {
    /// Connects to every URI in `uris` with `opts` (a leg whose connection
    /// drops fails its commands after `opts.reconnect_deadline`, then
    /// leaves the mirror).
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] for fewer than two legs; the first
    /// leg's connect error, naming it.
    pub fn connect(uris: &[&str], opts: HostOptions) -> Result<Mirror, HostError> {
        if uris.len() < 2 {
            return Err(HostError::InvalidArgument("a mirror needs two legs or more".into()));
        }
        let mut legs = Vec::with_capacity(uris.len());
        for uri in uris {
            let host = Host::connect(uri, opts.clone())?;
            legs.push(Leg {
                uri: (*uri).to_owned(),
                connections: host.connections(),
                host,
                failed: Mutex::new(None),
            });
        }
        Ok(Mirror {
            legs,
            next: AtomicUsize::new(0),
        })
    }

    /// Each leg and whether it is still in the mirror.
    pub fn legs(&self) -> Vec<LegState> {
        self.legs
            .iter()
            .map(|l| LegState {
                uri: l.uri.clone(),
                failed: l.failed.lock().clone(),
            })
            .collect()
    }

    fn healthy(&self) -> Vec<&Leg> {
        self.legs.iter().filter(|l| l.failed.lock().is_none()).collect()
    }

    fn fail(&self, leg: &Leg, why: String) {
        let mut failed = leg.failed.lock();
        if failed.is_none() {
            tracing::warn!(leg = %leg.uri, "mirror leg failed, going on without it: {why}");
            *failed = Some(why);
        }
    }

    /// Runs `op` on every healthy leg at once; legs that fail leave the
    /// mirror. Succeeds while one leg took it.
    fn all<'a, F, Fut>(&'a self, what: &str, op: F) -> Result<(), HostError>
    where
        F: Fn(&'a Host) -> Fut,
        Fut: std::future::Future<Output = Result<(), HostError>>,
    {
        let legs = self.healthy();
        if legs.is_empty() {
            return Err(HostError::InvalidArgument(format!(
                "{what}: every leg of the mirror has failed"
            )));
        }
        let results = exec::block_on(exec::join_all(legs.iter().map(|l| op(&l.host)).collect()));
        let mut last = None;
        let mut took = 0;
        for (leg, r) in legs.into_iter().zip(results) {
            let r = r.and_then(|()| {
                if leg.host.connections() == leg.connections {
                    Ok(())
                } else {
                    Err(HostError::Protocol(
                        "the leg reconnected: its I/O unit may have lost earlier writes".into(),
                    ))
                }
            });
            match r {
                Ok(()) => took += 1,
                Err(e) => {
                    self.fail(leg, format!("{what}: {e}"));
                    last = Some(e);
                }
            }
        }
        match (took, last) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes `data` (whole blocks) at `slba` on every healthy leg.
    ///
    /// # Errors
    /// As [`Host::write`], when no leg took it.
    pub fn write(&self, nsid: Nsid, slba: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        self.all("write", |h| h.write_async(nsid, slba, data, fua))
    }

    /// Flushes every healthy leg.
    ///
    /// # Errors
    /// As [`Host::flush`], when no leg took it.
    pub fn flush(&self, nsid: Nsid) -> Result<(), HostError> {
        self.all("flush", |h| h.flush_async(nsid))
    }

    /// Write Zeroes on every healthy leg.
    ///
    /// # Errors
    /// As [`Host::write_zeroes`], when no leg took it.
    pub fn write_zeroes(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        self.all("write zeroes", |h| h.write_zeroes_async(nsid, slba, blocks))
    }

    /// Deallocates on every healthy leg.
    ///
    /// # Errors
    /// As [`Host::trim`], when no leg took it.
    pub fn trim(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        self.all("deallocate", |h| h.trim_async(nsid, slba, blocks))
    }

    /// Reads `blocks` at `slba` from one healthy leg (in turn), trying the
    /// next when one fails.
    ///
    /// # Errors
    /// As [`Host::read`], when every leg failed.
    pub fn read(&self, nsid: Nsid, slba: u64, blocks: u32) -> Result<Vec<u8>, HostError> {
        let mut last = None;
        for _ in 0..self.legs.len() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.legs.len();
            let leg = &self.legs[i];
            if leg.failed.lock().is_some() {
                continue;
            }
            match leg.host.read(nsid, slba, blocks) {
                Ok(data) if leg.host.connections() == leg.connections => return Ok(data),
                Ok(_) => self.fail(leg, "read: the leg reconnected".into()),
                // An error of the request itself is the same on every leg.
                Err(e) if e.status().is_some_and(|s| s.dnr()) => return Err(e),
                Err(e) => {
                    self.fail(leg, format!("read: {e}"));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| HostError::InvalidArgument("read: every leg of the mirror has failed".into())))
    }

    /// Closes every leg.
    pub fn close(&self) {
        for leg in &self.legs {
            leg.host.close();
        }
    }
}
