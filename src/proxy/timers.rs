//! The deadlines of one worker's exchanges (the wait for a server's answer head): tokio
//! `Sleep`s kept between requests. A new `Sleep` per request was registered in tokio's timer
//! wheel on its first wait and taken out again when dropped, each under the time driver's
//! lock (~0.6k instructions a request); a kept one, set again to a later deadline, is only
//! written down (the wheel moves it when its old deadline comes), as actix-http's
//! keep-alive timer does (vendor/actix-http, `TimerState::set_at`).
//!
//! A kept `Sleep` whose deadline passes while it waits here wakes the last task that waited
//! on it once, for nothing; its next use registers it again.

use std::{
    cell::RefCell,
    future::Future as _,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::time::{Instant, Sleep};

/// Kept per worker at most: more than a worker has exchanges in flight under heavy load;
/// each is about a hundred bytes.
const KEPT: usize = 1024;

/// One worker's kept timers.
#[derive(Default)]
pub struct Timers {
    free: RefCell<Vec<Pin<Box<Sleep>>>>,
}

impl Timers {
    /// A timer set to `deadline`; back here when dropped.
    pub fn at(&self, deadline: Instant) -> Timer<'_> {
        let kept = self.free.borrow_mut().pop();
        let sleep = match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Timer {
            sleep: Some(sleep),
            timers: self,
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A timer lent by [`Timers`].
pub struct Timer<'a> {
    /// `Some` until dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    timers: &'a Timers,
}

impl Timer<'_> {
    pub fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline);
        }
    }

    /// `Ready` once the deadline has passed.
    pub fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        let mut free = self.timers.free.borrow_mut();
        if free.len() < KEPT {
            free.push(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[actix_rt::test]
    async fn a_kept_timer_keeps_its_new_deadline_not_its_old_one() {
        let timers = Timers::default();
        let start = Instant::now();
        {
            let mut t = timers.at(start + Duration::from_millis(20));
            assert!(std::future::poll_fn(|cx| Poll::Ready(t.poll_elapsed(cx)))
                .await
                .is_pending());
        }
        assert_eq!(timers.kept(), 1);

        // Taken again and set later: its old deadline passes and it does not fire.
        let mut t = timers.at(start + Duration::from_millis(150));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(std::future::poll_fn(|cx| Poll::Ready(t.poll_elapsed(cx)))
            .await
            .is_pending());
        std::future::poll_fn(|cx| t.poll_elapsed(cx)).await;
        assert!(start.elapsed() >= Duration::from_millis(150));

        // Set earlier than it was: fires at the earlier deadline.
        t.reset(Instant::now() + Duration::from_millis(10));
        let before = Instant::now();
        std::future::poll_fn(|cx| t.poll_elapsed(cx)).await;
        assert!(before.elapsed() < Duration::from_millis(140));
        drop(t);
        assert_eq!(timers.kept(), 1);
    }
}
