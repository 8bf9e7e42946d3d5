//! What one balancer message costs: `cargo run --release --example pick_cost`.
//!
//! DESIGN.md puts a `BalancerActor` on every worker and asks that the bench show it costing
//! no more than a shared atomic would. This measures, on ONE thread inside an actix System
//! (as a worker is), the time per request of:
//!
//! - `actor`: `send(NextServer::default()).await` to a `BalancerActor` started on the same
//!   thread, then dropping the `Lease` (a `do_send` of the request's end), exactly what the proxy does per request;
//! - `atomic`: `AtomicUsize::fetch_add` and an index into an `Arc<Vec<Arc<Upstream>>>`, with
//!   the `Arc<Upstream>` cloned and dropped (pingora's round robin);
//! - `strategy`: the same round-robin strategy the actor runs, called directly on a
//!   worker-local `RefCell` (the actor's logic without its mailbox), for the split;
//! - `atomic, contended`: the atomic while another thread hammers the same counter, the
//!   worst case of a counter shared by two workers (not the realistic one: real workers
//!   touch it once per request, not in a loop).
//!
//! Each is timed over `--iterations` rounds, `--rounds` times interleaved; the median round
//! is reported. The last line is machine-readable for `bench/run`.

use std::{
    cell::RefCell,
    hint::black_box,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::Actor;
use clap::Parser;
use roundabout::{
    balancer::{BalancerActor, NextServer},
    config::{HealthCheckSection, ServerConfig, Strategy as StrategyKind},
    health::{HealthActor, Register},
    metrics::Metrics,
    strategy::{self, Slot},
    upstream::Upstream,
};

#[derive(Parser)]
#[command(about = "ns per balancer actor round trip vs a shared atomic")]
struct Args {
    /// Requests per timed round.
    #[arg(long, default_value_t = 1_000_000)]
    iterations: u32,
    /// Timed rounds of each kind (interleaved); the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip the contended-atomic measurement (it keeps a second core busy).
    #[arg(long)]
    no_contended: bool,
}

/// Three servers nobody listens on: the health actor's one probe (at start) fails, and the
/// thresholds and interval below keep them in rotation for the whole run.
fn servers() -> Vec<ServerConfig> {
    (1..=3)
        .map(|i| ServerConfig {
            url: format!("http://127.0.0.1:{}", 9 + i)
                .parse()
                .expect("a valid URL"),
            weight: 1,
        })
        .collect()
}

fn ns_per(elapsed: Duration, n: u32) -> f64 {
    elapsed.as_nanos() as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let n = args.iterations.max(1);
    let rounds = args.rounds.max(1);
    let configs = servers();

    let system = actix::System::new();
    let (actor, atomic, direct) = system.block_on(async move {
        actix_rt::spawn(async move {
            let settings = HealthCheckSection {
                interval: Duration::from_secs(3600),
                unhealthy_threshold: u32::MAX,
                ..HealthCheckSection::default()
            };
            let metrics = Arc::new(Metrics::new());
            let tls = roundabout::tls::client_config(None).expect("no CA file to read");
            let health = HealthActor::new(&configs, settings, tls, metrics.clone()).start();
            let registry = health.clone();
            let balancer = BalancerActor::start(
                strategy::from_config(StrategyKind::RoundRobin),
                metrics,
                move |balancer| {
                    registry.send(Register {
                        balancer,
                        limiter: None,
                    })
                },
            );

            // The balancer holds its mailbox until the health actor has answered its Register.
            let first = balancer
                .send(NextServer::default())
                .await
                .expect("balancer running")
                .expect("three servers registered");
            // Dropping the lease sends the request's end, as the proxy's does.
            drop(first);

            // The atomic baseline: the same servers, shared the way pingora shares them.
            let list: Arc<Vec<Arc<Upstream>>> =
                Arc::new(configs.iter().map(|c| Arc::new(Upstream::new(c))).collect());
            let cursor = AtomicUsize::new(0);

            // The strategy alone, on worker-local state, no mailbox.
            let slots = RefCell::new(
                list.iter()
                    .map(|u| Slot {
                        upstream: u.clone(),
                        healthy: true,
                        draining: false,
                        in_flight: 0,
                    })
                    .collect::<Vec<_>>(),
            );
            let mut rr = strategy::from_config(StrategyKind::RoundRobin);

            let (mut actor, mut atomic, mut direct) = (Vec::new(), Vec::new(), Vec::new());
            // Round 0 is a warm-up and is not kept.
            for round in 0..=rounds {
                let t = Instant::now();
                for _ in 0..n {
                    let lease = balancer
                        .send(NextServer::default())
                        .await
                        .expect("balancer running")
                        .expect("a server");
                    drop(black_box(lease));
                }
                let a = ns_per(t.elapsed(), n);

                let t = Instant::now();
                for _ in 0..n {
                    let list = black_box(&list);
                    let i = cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                    drop(black_box(list[i].clone()));
                }
                let b = ns_per(t.elapsed(), n);

                let t = Instant::now();
                for _ in 0..n {
                    let mut s = slots.borrow_mut();
                    let usable = |_: usize| true;
                    if let Some(i) = rr.pick(black_box(&s), &usable) {
                        s[i].in_flight += 1;
                        let up = black_box(s[i].upstream.clone());
                        // The end of the request, as RequestEnded does it.
                        if let Some(j) = s.iter().position(|x| Arc::ptr_eq(&x.upstream, &up)) {
                            s[j].in_flight -= 1;
                        }
                    }
                }
                let c = ns_per(t.elapsed(), n);

                if round > 0 {
                    actor.push(a);
                    atomic.push(b);
                    direct.push(c);
                }
                // Let the actor drain the RequestEnded messages of the round.
                actix_rt::task::yield_now().await;
            }
            (median(actor), median(atomic), median(direct))
        })
        .await
        .expect("the measuring task ends")
    });

    let contended = (!args.no_contended).then(|| {
        let list: Arc<Vec<Arc<Upstream>>> = Arc::new(
            servers()
                .iter()
                .map(|c| Arc::new(Upstream::new(c)))
                .collect(),
        );
        let cursor = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (list, cursor, stop) = (list.clone(), cursor.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                    drop(black_box(list[i].clone()));
                }
            })
        };
        let mut runs = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..n {
                let list = black_box(&list);
                let i = cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                drop(black_box(list[i].clone()));
            }
            runs.push(ns_per(t.elapsed(), n));
        }
        stop.store(true, Ordering::Relaxed);
        other.join().expect("the contending thread ends");
        median(runs)
    });

    println!("pick_cost: {n} requests per round, median of {rounds} rounds, one thread");
    println!("  BalancerActor send(NextServer).await + Lease drop (do_send):  {actor:8.1} ns");
    println!("  AtomicUsize fetch_add + Arc<Vec<..>> index (pingora RR):      {atomic:8.1} ns");
    println!("  the actor's RoundRobin strategy called directly (RefCell):    {direct:8.1} ns");
    if let Some(c) = contended {
        println!("  the atomic while a 2nd thread hammers the same counter:       {c:8.1} ns");
    }
    println!(
        "  actor - atomic: {:.1} ns per request (of which mailbox and wake-ups: {:.1} ns)",
        actor - atomic,
        actor - direct
    );
    println!(
        "PICK_COST actor_ns={actor:.1} atomic_ns={atomic:.1} direct_ns={direct:.1} contended_ns={} diff_ns={:.1}",
        contended.map_or_else(|| "NA".to_string(), |c| format!("{c:.1}")),
        actor - atomic
    );
}
