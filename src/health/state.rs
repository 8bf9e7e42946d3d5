//! What one server's checks count: HAProxy's rise/fall ([`HealthState`]), when it last
//! changed state and its last probe's outcome, as the status page shows them. Plain data,
//! unit-tested without any actor.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;

/// Consecutive-result counting for one server, like HAProxy's `rise`/`fall`. Whether the
/// server is in rotation is the registry's; this only counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthState {
    /// Passes in a row (reset by a failure).
    pub passes: u32,
    /// Failures in a row (reset by a pass).
    pub failures: u32,
    /// Added at runtime and not yet checked: the first pass puts it in rotation.
    pub(super) probation: bool,
}

impl HealthState {
    /// A server added at runtime: out of rotation until its first passed check.
    pub fn on_probation() -> Self {
        Self {
            probation: true,
            ..Self::default()
        }
    }

    /// Counts one result for a server that is `healthy` now; returns its new state when it
    /// changes.
    pub fn observe(&mut self, healthy: bool, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if !healthy && (self.probation || self.passes >= rise) {
                self.probation = false;
                return Some(true);
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if healthy && self.failures >= fall {
                return Some(false);
            }
        }
        None
    }
}

/// One server's checks.
#[derive(Debug)]
pub(super) struct Checks {
    pub(super) state: HealthState,
    /// A probe is out; the next round skips this server rather than stacking probes.
    pub(super) probing: bool,
    /// When the server last went in or out of rotation (or joined): the status page says
    /// how long it has been in its state.
    pub(super) since: Instant,
    /// The last probe's outcome, for the status page.
    pub(super) last: Option<LastCheck>,
}

impl Checks {
    pub(super) fn new(state: HealthState) -> Self {
        Self {
            state,
            probing: false,
            since: Instant::now(),
            last: None,
        }
    }
}

/// A probe's outcome, as the status page shows it.
#[derive(Debug, Clone)]
pub struct LastCheck {
    /// When its answer (or failure) came.
    pub at: Instant,
    pub ok: bool,
    /// What the log says of it: `status 200`, `connection refused`, `timed out after 1s`.
    pub result: String,
    /// From sending the probe to its answer or failure.
    pub latency: Duration,
}

/// A status in 200..=399 passes, as in HAProxy's default `http-check expect`.
pub(super) fn is_pass(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `results` to a server that starts `healthy`; the states it goes through.
    fn run(mut s: HealthState, mut healthy: bool, results: &[bool]) -> Vec<bool> {
        results
            .iter()
            .map(|&ok| {
                if let Some(now) = s.observe(healthy, ok, 2, 3) {
                    healthy = now;
                }
                healthy
            })
            .collect()
    }

    #[test]
    fn a_server_leaves_after_fall_failures_and_returns_after_rise_passes() {
        let states = run(
            HealthState::default(),
            true,
            &[false, false, false, true, true],
        );
        assert_eq!(states, [true, true, false, false, true]);
    }

    #[test]
    fn a_pass_resets_the_failure_count() {
        let states = run(
            HealthState::default(),
            true,
            &[false, false, true, false, false],
        );
        assert_eq!(states, [true; 5]);
    }

    #[test]
    fn a_server_on_probation_joins_after_its_first_pass() {
        assert_eq!(run(HealthState::on_probation(), false, &[true]), [true]);
        assert_eq!(run(HealthState::default(), false, &[true]), [false]);
    }
}
