use std::{
    fmt,
    future::Future,
    mem,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};
use tracing::trace;

#[derive(Debug)]
pub(super) enum TimerState {
    Disabled,
    Inactive,
    Active { timer: Pin<Box<Sleep>> },
}

/// The keep-alive timer's `Sleep` while a request is in flight, and its deadlines
/// (roundabout patch, VENDORED.md). Fields of the dispatcher, lent together: as a struct
/// of their own they would make every connection's dispatcher 8 bytes larger than its
/// size class.
#[derive(Debug)]
pub(super) struct KeptSleep<'a> {
    pub(super) sleep: &'a mut Option<Pin<Box<Sleep>>>,
    /// The deadline the `Sleep` is registered at, polled since it was set to it.
    pub(super) armed: &'a mut Instant,
    /// When the connection is due to close, in milliseconds after `armed`.
    pub(super) later_ms: &'a mut u32,
}

impl KeptSleep<'_> {
    /// `deadline` in milliseconds after `armed` (rounded up: tokio's timers go by the
    /// millisecond), when the `Sleep` can stay as it is: `armed` has not come yet, and
    /// `deadline` is no earlier.
    fn later_ms(&self, deadline: Instant) -> Option<u32> {
        if deadline < *self.armed || Instant::now() >= *self.armed {
            return None;
        }
        let later = deadline - *self.armed;
        let ms = later.as_secs() * 1_000 + u64::from(later.subsec_nanos().div_ceil(1_000_000));
        u32::try_from(ms).ok()
    }

    fn wanted(&self) -> Instant {
        *self.armed + Duration::from_millis(u64::from(*self.later_ms))
    }
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

    /// Arms the timer for `deadline`, moving the `Sleep` kept in `kept` by
    /// [`clear_keeping`](Self::clear_keeping) if there is one.
    /// (roundabout patch, VENDORED.md: the keep-alive timer is armed after every answer.)
    ///
    /// A kept `Sleep` still registered at a deadline that has not come, no later than
    /// `deadline`, is armed as it is: only `kept.later_ms` is written, and
    /// [`poll_kept`](Self::poll_kept) moves the `Sleep` on when it fires. Under load the
    /// `Sleep` is cold memory by the time its connection's next answer goes out; it is not
    /// touched.
    pub(super) fn set_at(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Instant,
        kept: KeptSleep<'_>,
        line: u32,
    ) {
        if matches!(self, Self::Disabled) {
            trace!("setting disabled timer from line {}", line);
        }
        let timer = match kept.sleep.take() {
            Some(timer) => match kept.later_ms(deadline) {
                Some(ms) => {
                    *kept.later_ms = ms;
                    *self = Self::Active { timer };
                    return;
                }
                None => {
                    let mut timer = timer;
                    timer.as_mut().reset(deadline);
                    timer
                }
            },
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        *kept.armed = deadline;
        *kept.later_ms = 0;
        *self = Self::Active { timer };
        self.init(cx);
    }

    /// Polls a timer armed by [`set_at`](Self::set_at): `Ready` once its wanted deadline
    /// has passed. Its `Sleep` is polled only once `kept.armed` has come (it holds the
    /// task's waker from the poll that armed it), and set again to the wanted deadline when
    /// that is later.
    pub(super) fn poll_kept(&mut self, cx: &mut Context<'_>, kept: KeptSleep<'_>) -> Poll<()> {
        let Self::Active { timer } = self else {
            return Poll::Pending;
        };
        let now = Instant::now();
        if now < *kept.armed || timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let wanted = kept.wanted();
        if now < wanted {
            timer.as_mut().reset(wanted);
            *kept.armed = wanted;
            *kept.later_ms = 0;
            return timer.as_mut().poll(cx);
        }
        Poll::Ready(())
    }

    /// [`clear`](Self::clear), keeping an active timer's `Sleep` in `kept` for the next
    /// [`set_at`](Self::set_at): one allocation, registration, deregistration and free less
    /// per request. It stays registered at its old deadline; should that pass first, the
    /// task is woken once for nothing.
    pub(super) fn clear_keeping(&mut self, kept: &mut Option<Pin<Box<Sleep>>>, line: u32) {
        match mem::replace(self, Self::Inactive) {
            Self::Active { timer } => *kept = Some(timer),
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

    /// A dispatcher's fields for [`KeptSleep`].
    struct Kept {
        sleep: Option<Pin<Box<Sleep>>>,
        armed: Instant,
        later_ms: u32,
    }

    impl Kept {
        fn new() -> Self {
            Self {
                sleep: None,
                armed: Instant::now(),
                later_ms: 0,
            }
        }

        fn lend(&mut self) -> KeptSleep<'_> {
            KeptSleep {
                sleep: &mut self.sleep,
                armed: &mut self.armed,
                later_ms: &mut self.later_ms,
            }
        }
    }

    fn deadline(timer: &TimerState) -> Instant {
        match timer {
            TimerState::Active { timer } => timer.deadline(),
            _ => panic!("not armed"),
        }
    }

    /// roundabout patch "The keep-alive timer's `Sleep` kept between requests" (VENDORED.md).
    #[actix_rt::test]
    async fn a_cleared_timer_s_sleep_is_moved_by_the_next_set() {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut kept = Kept::new();
        let mut timer = TimerState::new(true);
        let later = Instant::now() + Duration::from_secs(60);
        timer.set_at(&mut cx, later, kept.lend(), line!());
        let first = match &timer {
            TimerState::Active { timer } => &**timer as *const Sleep,
            _ => panic!("not armed"),
        };
        timer.clear_keeping(&mut kept.sleep, line!());
        assert!(matches!(timer, TimerState::Inactive));
        assert!(kept.sleep.is_some());

        // Armed again for a deadline earlier than the one it is registered at (one that
        // has passed): the same allocation, set again, and it fires.
        let past = Instant::now() - Duration::from_millis(1);
        timer.set_at(&mut cx, past, kept.lend(), line!());
        assert!(kept.sleep.is_none());
        match &timer {
            TimerState::Active { timer: sleep } => {
                assert_eq!(&**sleep as *const Sleep, first, "moved, not made again");
            }
            _ => panic!("not armed"),
        }
        assert_eq!(deadline(&timer), past);
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Ready(()));

        // A timer that is not armed has nothing to keep: cleared as `clear` clears it.
        let mut off = TimerState::new(false);
        let mut spare = None;
        off.clear_keeping(&mut spare, line!());
        assert!(!matches!(off, TimerState::Active { .. }) && spare.is_none());
    }

    /// roundabout patch "The keep-alive timer armed without touching its `Sleep`"
    /// (VENDORED.md): a later deadline is written down, not given to the `Sleep`, which
    /// fires at its old one, is set to the new one then, and fires again at that.
    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_waits_for_the_old_one_then_holds() {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut kept = Kept::new();
        let mut timer = TimerState::new(true);
        let start = Instant::now();
        let first = start + Duration::from_secs(5);
        timer.set_at(&mut cx, first, kept.lend(), line!());
        timer.clear_keeping(&mut kept.sleep, line!());

        // The next answer, a second later: the `Sleep` keeps its first deadline.
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = start + Duration::from_micros(6_000_300);
        timer.set_at(&mut cx, second, kept.lend(), line!());
        assert_eq!(deadline(&timer), first);
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Pending);

        // The first deadline comes: not due yet, the `Sleep` moves on to the second (to the
        // millisecond, rounded up).
        tokio::time::advance(Duration::from_millis(4_500)).await;
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Pending);
        let moved = deadline(&timer);
        assert!(moved >= second && moved - second < Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Pending);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Ready(()));

        // A request outlasts the `Sleep`'s deadline: the next arming sets it again.
        timer.clear_keeping(&mut kept.sleep, line!());
        let third = Instant::now() + Duration::from_secs(5);
        timer.set_at(&mut cx, third, kept.lend(), line!());
        assert_eq!(deadline(&timer), third);
        assert_eq!(timer.poll_kept(&mut cx, kept.lend()), Poll::Pending);
    }
}
