use std::{fmt, future::Future, mem, pin::Pin, task::Context};

use tokio::time::{Instant, Sleep};
use tracing::trace;

#[derive(Debug)]
pub(super) enum TimerState {
    Disabled,
    Inactive,
    Active { timer: Pin<Box<Sleep>> },
}

impl TimerState {
    pub(super) fn new(enabled: bool) -> Self {
        if enabled {
            Self::Inactive
        } else {
            Self::Disabled
        }
    }

    pub(super) fn is_enabled(&self) -> bool {
        matches!(self, Self::Active { .. } | Self::Inactive)
    }

    pub(super) fn set(&mut self, timer: Sleep, line: u32) {
        if matches!(self, Self::Disabled) {
            trace!("setting disabled timer from line {}", line);
        }

        *self = Self::Active {
            timer: Box::pin(timer),
        };
    }

    pub(super) fn set_and_init(&mut self, cx: &mut Context<'_>, timer: Sleep, line: u32) {
        self.set(timer, line);
        self.init(cx);
    }

    /// Arms the timer for `deadline`, moving the `Sleep` kept in `spare` by
    /// [`clear_keeping`](Self::clear_keeping) if there is one, and polls it once.
    /// (roundabout patch, VENDORED.md: the keep-alive timer is armed after every answer.)
    pub(super) fn set_at(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Instant,
        spare: &mut Option<Pin<Box<Sleep>>>,
        line: u32,
    ) {
        if matches!(self, Self::Disabled) {
            trace!("setting disabled timer from line {}", line);
        }
        let timer = match spare.take() {
            Some(mut timer) => {
                // A deadline later than the one it is registered at is only written down;
                // the timer wheel moves it when the old one comes.
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        *self = Self::Active { timer };
        self.init(cx);
    }

    /// [`clear`](Self::clear), keeping an active timer's `Sleep` in `spare` for the next
    /// [`set_at`](Self::set_at): one allocation, registration, deregistration and free less
    /// per request. It stays registered at its old deadline; should that pass first, the
    /// task is woken once for nothing.
    pub(super) fn clear_keeping(&mut self, spare: &mut Option<Pin<Box<Sleep>>>, line: u32) {
        match mem::replace(self, Self::Inactive) {
            Self::Active { timer } => *spare = Some(timer),
            other => {
                *self = other;
                self.clear(line);
            }
        }
    }

    pub(super) fn clear(&mut self, line: u32) {
        if matches!(self, Self::Disabled) {
            trace!("trying to clear a disabled timer from line {}", line);
        }

        if matches!(self, Self::Inactive) {
            trace!("trying to clear an inactive timer from line {}", line);
        }

        *self = Self::Inactive;
    }

    pub(super) fn init(&mut self, cx: &mut Context<'_>) {
        if let TimerState::Active { timer } = self {
            let _ = timer.as_mut().poll(cx);
        }
    }
}

impl fmt::Display for TimerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimerState::Disabled => f.write_str("timer is disabled"),
            TimerState::Inactive => f.write_str("timer is inactive"),
            TimerState::Active { timer } => {
                let deadline = timer.deadline();
                let now = Instant::now();

                if deadline < now {
                    f.write_str("timer is active and has reached deadline")
                } else {
                    write!(
                        f,
                        "timer is active and due to expire in {} milliseconds",
                        ((deadline - now).as_secs_f32() * 1000.0)
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{task::Poll, time::Duration};

    use futures_util::task::noop_waker_ref;

    use super::*;

    /// roundabout patch "The keep-alive timer's `Sleep` kept between requests" (VENDORED.md).
    #[actix_rt::test]
    async fn a_cleared_timer_s_sleep_is_moved_by_the_next_set() {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut spare = None;
        let mut timer = TimerState::new(true);
        let later = Instant::now() + Duration::from_secs(60);
        timer.set_at(&mut cx, later, &mut spare, line!());
        let first = match &timer {
            TimerState::Active { timer } => &**timer as *const Sleep,
            _ => panic!("not armed"),
        };
        timer.clear_keeping(&mut spare, line!());
        assert!(matches!(timer, TimerState::Inactive));
        assert!(spare.is_some());

        // Armed again for a deadline that has passed: the same allocation, and it fires.
        let past = Instant::now() - Duration::from_millis(1);
        timer.set_at(&mut cx, past, &mut spare, line!());
        assert!(spare.is_none());
        match &mut timer {
            TimerState::Active { timer: sleep } => {
                assert_eq!(&**sleep as *const Sleep, first, "moved, not made again");
                assert_eq!(sleep.deadline(), past);
                assert_eq!(sleep.as_mut().poll(&mut cx), Poll::Ready(()));
            }
            _ => panic!("not armed"),
        }

        // A timer that is not armed has nothing to keep: cleared as `clear` clears it.
        let mut off = TimerState::new(false);
        off.clear_keeping(&mut spare, line!());
        assert!(!matches!(off, TimerState::Active { .. }) && spare.is_none());
    }
}
