//! `BalancerActor`: one per worker thread, owner of that worker's server list and cursor.
//!
//! It is started inside the `HttpServer::new` factory, so it runs on the same arbiter as the
//! handlers that ask it for a server: a `send().await` to it never crosses a thread (see
//! DESIGN.md for the measurements). It learns about health and membership only from the
//! [`HealthActor`], through [`ServerEvent`]s, and it keeps the
//! in-flight count of every server from [`NextServer`] and the [`Lease`]s it hands out.

use std::sync::Arc;

use actix::prelude::*;

use crate::{
    health::{HealthActor, Register},
    strategy::{Slot, Strategy},
    upstream::Upstream,
};

/// The worker-local balancer.
pub struct BalancerActor {
    slots: Vec<Slot>,
    strategy: Box<dyn Strategy>,
    health: Addr<HealthActor>,
}

impl BalancerActor {
    /// A balancer with no servers yet; it registers with `health` when it starts and gets
    /// the current list from it before it handles any request.
    pub fn new(strategy: Box<dyn Strategy>, health: Addr<HealthActor>) -> Self {
        Self {
            slots: Vec::new(),
            strategy,
            health,
        }
    }

    fn position(&self, label: &str) -> Option<usize> {
        self.slots.iter().position(|s| *s.upstream.label == *label)
    }

    fn remove_at(&mut self, i: usize) {
        self.slots.remove(i);
        self.strategy.resize(&self.slots);
    }

    fn apply(&mut self, event: ServerEvent) {
        match event {
            ServerEvent::Snapshot(servers) => {
                // Keep the in-flight counts of servers that stay, so their ends still balance.
                let mut next: Vec<Slot> = servers
                    .into_iter()
                    .map(|(upstream, healthy)| {
                        let in_flight = self
                            .position(&upstream.label)
                            .map_or(0, |i| self.slots[i].in_flight);
                        Slot {
                            upstream,
                            healthy,
                            draining: false,
                            in_flight,
                        }
                    })
                    .collect();
                for old in self.slots.drain(..) {
                    if old.in_flight > 0
                        && !next.iter().any(|s| s.upstream.label == old.upstream.label)
                    {
                        next.push(Slot {
                            draining: true,
                            ..old
                        });
                    }
                }
                self.slots = next;
                self.strategy.resize(&self.slots);
            }
            ServerEvent::Health { label, healthy } => {
                if let Some(i) = self.position(&label) {
                    self.slots[i].healthy = healthy;
                }
            }
            ServerEvent::Added { upstream, healthy } => match self.position(&upstream.label) {
                // Re-added while still draining: it simply stays.
                Some(i) => {
                    let slot = &mut self.slots[i];
                    slot.upstream = upstream;
                    slot.healthy = healthy;
                    slot.draining = false;
                }
                None => {
                    self.slots.push(Slot {
                        upstream,
                        healthy,
                        draining: false,
                        in_flight: 0,
                    });
                    self.strategy.resize(&self.slots);
                }
            },
            ServerEvent::Removed { label } => {
                if let Some(i) = self.position(&label) {
                    if self.slots[i].in_flight == 0 {
                        self.remove_at(i);
                    } else {
                        self.slots[i].draining = true;
                    }
                }
            }
        }
    }
}

impl Actor for BalancerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Until the registry answers with the current list there is nothing to balance
        // over, so hold other messages back: `wait` is used only here, at start-up.
        let register = self.health.send(Register {
            events: ctx.address().recipient(),
            list: ctx.address().recipient(),
        });
        ctx.wait(register.into_actor(self).map(|snapshot, act, _| {
            if let Ok(snapshot) = snapshot {
                act.apply(snapshot);
            }
        }));
    }
}

/// Asks for the server the next request goes to; the answer is a [`Lease`] on it.
#[derive(Debug, Default)]
pub struct NextServer {
    /// Servers this request already failed to reach; they are not chosen again.
    pub tried: Vec<Arc<Upstream>>,
}

impl Message for NextServer {
    type Result = Option<Lease>;
}

/// One request's claim on a server: while it lives, the request counts as in flight there.
///
/// Dropping it ends the count, however the request ended: answered, failed, or abandoned
/// by a client that went away, even before the handler received the reply that carries it.
#[derive(Debug)]
pub struct Lease {
    upstream: Arc<Upstream>,
    balancer: Addr<BalancerActor>,
}

impl Lease {
    /// The server leased.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.balancer
            .do_send(RequestEnded(Arc::clone(&self.upstream)));
    }
}

impl Handler<NextServer> for BalancerActor {
    type Result = Option<Lease>;

    fn handle(&mut self, msg: NextServer, ctx: &mut Self::Context) -> Self::Result {
        let slots = &self.slots;
        let usable = |i: usize| {
            let s = &slots[i];
            s.healthy && !s.draining && !msg.tried.iter().any(|t| t.label == s.upstream.label)
        };
        let i = self.strategy.pick(slots, &usable)?;
        let slot = &mut self.slots[i];
        slot.in_flight += 1;
        Some(Lease {
            upstream: slot.upstream.clone(),
            balancer: ctx.address(),
        })
    }
}

/// A request's [`Lease`] has ended; sent by its `Drop`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct RequestEnded(Arc<Upstream>);

impl Handler<RequestEnded> for BalancerActor {
    type Result = ();

    fn handle(&mut self, RequestEnded(upstream): RequestEnded, _: &mut Self::Context) {
        // By label, not by `Arc`: a server removed and added back while this request was in
        // flight keeps its slot (and count) under a new `Upstream`; labels are unique here.
        if let Some(i) = self.position(&upstream.label) {
            let slot = &mut self.slots[i];
            slot.in_flight = slot.in_flight.saturating_sub(1);
            if slot.draining && slot.in_flight == 0 {
                self.remove_at(i);
            }
        }
    }
}

/// A change in the server set, broadcast by the HealthActor to every worker's balancer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum ServerEvent {
    /// The whole list with each server's health; replaces what the balancer had.
    Snapshot(Vec<(Arc<Upstream>, bool)>),
    /// A server went in or out of rotation.
    Health { label: Arc<str>, healthy: bool },
    /// A server was added at runtime.
    Added {
        upstream: Arc<Upstream>,
        healthy: bool,
    },
    /// A server was removed at runtime: no new requests; gone once its in-flight ones end.
    Removed { label: Arc<str> },
}

impl Handler<ServerEvent> for BalancerActor {
    type Result = ();

    fn handle(&mut self, event: ServerEvent, _: &mut Self::Context) {
        self.apply(event);
    }
}

/// One server as this worker sees it, for the admin API.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub upstream: Arc<Upstream>,
    pub healthy: bool,
    pub draining: bool,
    pub in_flight: u32,
}

/// Asks for this worker's view of every server (draining ones included).
#[derive(Debug, Message)]
#[rtype(result = "Vec<ServerView>")]
pub struct ListServers;

impl Handler<ListServers> for BalancerActor {
    type Result = MessageResult<ListServers>;

    fn handle(&mut self, _: ListServers, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.slots
                .iter()
                .map(|s| ServerView {
                    upstream: s.upstream.clone(),
                    healthy: s.healthy,
                    draining: s.draining,
                    in_flight: s.in_flight,
                })
                .collect(),
        )
    }
}
