//! One worker's limiter: the [`Limiter`] (its clients over budget, its copy of the
//! breaker's circuits, the store it counts in) and the `RateLimitActor` around it.
//!
//! A check that can be answered at once (a client blocked locally, an open circuit, the
//! in-process store) is answered by the handler itself, synchronously, from the worker's
//! `Limiter`: it lives on the worker's thread (an `Rc<RefCell<..>>`), so this is the same
//! no-lock, no-hop state the actor would read, without the message (DESIGN.md: worth more
//! than 2% of a request's instructions). A check that has to wait for Redis goes to the
//! actor, which owns the worker's Redis connection and awaits the answer in its own future;
//! the actor also takes reloads and forgets ended blocks.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::IpAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;

use super::{Budget, ClientKey, Decision, Hit, Store, StoreError, Stores, Verdict, View};
use crate::{
    config::{OnStoreError, RateLimit},
    metrics::Metrics,
};

/// One worker's limiter state, shared by its handlers and its [`RateLimitActor`]; never
/// leaves the worker's thread.
pub struct Limiter {
    /// Where this worker counts (its own Redis connection, or the process's in-process store).
    store: Arc<dyn Store>,
    /// The store answers at once (the in-process one): every check is the handler's own.
    local: bool,
    stores: Stores,
    limit: u64,
    window: Duration,
    on_store_error: OnStoreError,
    ipv6_prefix: u8,
    metrics: Arc<Metrics>,
    /// Clients known to be over budget, and when their window ends: refused locally.
    blocked: HashMap<ClientKey, Instant>,
    /// The breaker's open circuits, as this worker last copied them.
    view: View,
}

/// Where a check stands after the part of it that needs no wait.
enum Step {
    /// Answered.
    Done(Verdict),
    /// The store must be asked, and its answer waited for.
    Ask(ClientKey),
}

impl Limiter {
    /// `store` is the worker's, from [`Stores::for_worker`] on the worker's thread.
    fn new(
        config: &RateLimit,
        store: Arc<dyn Store>,
        stores: Stores,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            local: store.answers_at_once(),
            store,
            stores,
            limit: config.requests,
            window: config.window,
            on_store_error: config.on_store_error,
            ipv6_prefix: config.ipv6_prefix,
            metrics,
            blocked: HashMap::new(),
            view: View::default(),
        }
    }

    /// Everything of a check short of asking the store: a client blocked locally, or an
    /// open circuit (`on_store_error` answers).
    fn step(&mut self, ip: IpAddr, budget: Option<&Budget>) -> Step {
        let key = ClientKey::new(ip, self.ipv6_prefix, budget.map_or(0, |b| b.id));
        let (limit, _) = self.terms(budget);
        let now = Instant::now();
        if let Some(&until) = self.blocked.get(&key) {
            if until > now {
                let d = Decision::from_count(limit + 1, limit, until - now);
                return Step::Done(Verdict::Counted(d));
            }
            self.blocked.remove(&key);
        }
        self.stores.breaker.refresh(&mut self.view);
        let scope = budget.map(|b| &*b.name);
        // The slot (a cluster key formatted and hashed) only when a circuit is open.
        if !self.view.is_clear() && self.view.covers(self.store.slot(key, scope)) {
            // The store (or the cluster node that holds this key) failed and its probe has
            // not seen it back: not asked, no wait.
            return Step::Done(self.without_store(key, budget, now));
        }
        Step::Ask(key)
    }

    /// Asks the store to count `key`'s hit in `budget`.
    fn hit(&self, key: ClientKey, budget: Option<&Budget>) -> Hit {
        let (limit, window) = self.terms(budget);
        let scope = budget.map(|b| &*b.name);
        self.store.hit(key, scope, limit, window, Instant::now())
    }

    /// Turns the store's answer into a verdict; a failure opens the breaker's circuit for
    /// the key's slot (a cluster's) or for the store.
    fn settle(
        &mut self,
        key: ClientKey,
        budget: Option<&Budget>,
        result: Result<Decision, StoreError>,
    ) -> Verdict {
        match result {
            Ok(d) => self.counted(key, d),
            Err(e) => {
                self.metrics.store_error();
                let scope = budget.map(|b| b.name.clone());
                let slot = self.store.slot(key, scope.as_deref());
                self.stores
                    .breaker
                    .trip(key, scope, slot, &e, self.on_store_error);
                self.without_store(key, budget, Instant::now())
            }
        }
    }

    /// The limit and window `budget` counts by: its own, or the default ones.
    fn terms(&self, budget: Option<&Budget>) -> (u64, Duration) {
        budget.map_or((self.limit, self.window), |b| (b.requests, b.window))
    }

    /// A counted answer; a client found over budget is remembered.
    fn counted(&mut self, key: ClientKey, d: Decision) -> Verdict {
        if !d.allowed {
            // Until the window ends, not the rounded-up second after it.
            self.blocked.insert(key, Instant::now() + d.resets_in);
        }
        Verdict::Counted(d)
    }

    /// What `on_store_error` answers while the store is not asked.
    fn without_store(&mut self, key: ClientKey, budget: Option<&Budget>, now: Instant) -> Verdict {
        match self.on_store_error {
            OnStoreError::Local => {
                self.metrics.fallback();
                let (limit, window) = self.terms(budget);
                let d = self.stores.fallback.count(key, limit, window, now);
                self.counted(key, d)
            }
            OnStoreError::Allow => Verdict::Uncounted,
            OnStoreError::Deny => Verdict::Unavailable,
        }
    }
}

/// A worker's way to its limiter: the shared state for what needs no wait, the actor for
/// what waits on Redis.
#[derive(Clone)]
pub struct LimiterHandle {
    state: Rc<RefCell<Limiter>>,
    actor: Addr<RateLimitActor>,
}

impl LimiterHandle {
    /// May this client IP send one more request, in `budget` (`None`: `[rate_limit]`'s)?
    /// Answered at once when it can be (a client blocked here, an open circuit, the
    /// in-process store); else the wait for the store, boxed: a handler's future holds a
    /// pointer to it, not the wait itself, on the path that never waits.
    pub fn check(&self, ip: IpAddr, budget: Option<Budget>) -> Checked {
        let hit = {
            let mut state = self.state.borrow_mut();
            match state.step(ip, budget.as_ref()) {
                Step::Done(verdict) => return Checked::Now(verdict),
                Step::Ask(key) if state.local => match state.hit(key, budget.as_ref()) {
                    Hit::Ready(result) => {
                        return Checked::Now(state.settle(key, budget.as_ref(), result))
                    }
                    Hit::Pending(hit) => Some((key, hit)),
                },
                Step::Ask(_) => None,
            }
        };
        match hit {
            // An in-process store never waits; were one to, its answer is still this
            // worker's to settle.
            Some((key, hit)) => {
                let state = self.state.clone();
                Checked::Later(Box::pin(async move {
                    let result = hit.await;
                    Ok(state.borrow_mut().settle(key, budget.as_ref(), result))
                }))
            }
            None => {
                let asked = self.actor.send(Check { ip, budget });
                Checked::Later(Box::pin(asked))
            }
        }
    }

    /// The actor, for the registry (reloads reach it as messages).
    pub fn actor(&self) -> &Addr<RateLimitActor> {
        &self.actor
    }
}

/// A limiter's answer: now, or once the store has answered.
pub enum Checked {
    Now(Verdict),
    Later(futures_util::future::LocalBoxFuture<'static, Result<Verdict, MailboxError>>),
}

impl Checked {
    /// The verdict, waiting for the store when it must.
    pub async fn verdict(self) -> Result<Verdict, MailboxError> {
        match self {
            Checked::Now(verdict) => Ok(verdict),
            Checked::Later(answer) => answer.await,
        }
    }
}

/// The worker-local limiter: takes the checks that wait on Redis, reloads, and forgets
/// ended blocks.
pub struct RateLimitActor {
    state: Rc<RefCell<Limiter>>,
}

impl RateLimitActor {
    /// Starts the worker's limiter on the current arbiter; `store` is the worker's, from
    /// [`Stores::for_worker`] on the worker's thread.
    pub fn start(
        config: &RateLimit,
        store: Arc<dyn Store>,
        stores: Stores,
        metrics: Arc<Metrics>,
    ) -> LimiterHandle {
        let state = Rc::new(RefCell::new(Limiter::new(config, store, stores, metrics)));
        let actor = RateLimitActor {
            state: state.clone(),
        }
        .start();
        LimiterHandle { state, actor }
    }
}

impl Actor for RateLimitActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Forget blocks whose window ended, so the map stays as small as the abuse.
        let window = self.state.borrow().window;
        ctx.run_interval(window, |act, _| {
            let now = Instant::now();
            act.state
                .borrow_mut()
                .blocked
                .retain(|_, until| *until > now);
        });
    }
}

/// A check that waits on the store (Redis): sent by [`LimiterHandle::check`].
#[derive(Debug, Message)]
#[rtype(result = "Verdict")]
struct Check {
    ip: IpAddr,
    budget: Option<Budget>,
}

impl Handler<Check> for RateLimitActor {
    type Result = ActorResponse<Self, Verdict>;

    fn handle(&mut self, Check { ip, budget }: Check, _: &mut Self::Context) -> Self::Result {
        let mut state = self.state.borrow_mut();
        // Again: a block or a circuit may have come since the handler looked.
        let key = match state.step(ip, budget.as_ref()) {
            Step::Done(verdict) => return ActorResponse::reply(verdict),
            Step::Ask(key) => key,
        };
        match state.hit(key, budget.as_ref()) {
            // Answered at once: no future to box.
            Hit::Ready(result) => ActorResponse::reply(state.settle(key, budget.as_ref(), result)),
            Hit::Pending(hit) => {
                ActorResponse::r#async(hit.into_actor(self).map(move |result, act, _| {
                    act.state.borrow_mut().settle(key, budget.as_ref(), result)
                }))
            }
        }
    }
}

/// New values for the keys a running limiter can change (a config reload).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub RateLimit);

impl Handler<Reconfigure> for RateLimitActor {
    type Result = ();

    fn handle(&mut self, Reconfigure(config): Reconfigure, _: &mut Self::Context) {
        let mut state = self.state.borrow_mut();
        // Blocks were decided under the old limits, windows and keys (the routes' budgets
        // may have changed too).
        state.blocked.clear();
        state.limit = config.requests;
        state.window = config.window;
        state.ipv6_prefix = config.ipv6_prefix;
        state.on_store_error = config.on_store_error;
    }
}
