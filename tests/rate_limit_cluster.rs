//! The rate limiter on a real Redis Cluster (six `redis-server`s the harness starts: three
//! masters, three replicas): one budget per client shared exactly by three instances, the
//! budgets spread over every master, and a master killed under load (its replica takes
//! over; meanwhile only its clients are counted in-process, and nothing is lost).

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{cluster::RedisCluster, *};

const PREFIX: &str = "test:rl";

/// One test at a time: each starts six Redis processes and loads them, and the limiter's
/// checks are bounded at 50 ms; two at once on a small machine would measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `[rate_limit]` section on `cluster`: `requests` per `window`, 127.0.0.1 trusted.
fn limiter(cluster: &RedisCluster, requests: u64, window: &str, policy: &str) -> String {
    format!(
        "[rate_limit]\nenabled = true\nrequests = {requests}\nwindow = \"{window}\"\n\
         redis_url = {}\nkey_prefix = \"{PREFIX}\"\non_store_error = \"{policy}\"\n\
         trusted_proxies = [\"127.0.0.1\"]\n",
        cluster.redis_url_toml()
    )
}

/// GET / for client `ip`: the status, and X-RateLimit-Remaining if the answer has it.
async fn hit(client: &awc::Client, addr: SocketAddr, ip: &str) -> (u16, Option<u64>) {
    let res = client
        .get(format!("http://{addr}/"))
        .insert_header(("x-forwarded-for", ip))
        .send()
        .await
        .expect("request reaches the balancer");
    let remaining = res
        .headers()
        .get("x-ratelimit-remaining")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (res.status().as_u16(), remaining)
}

/// Waits until every worker of the balancer at `addr` counts in the cluster: requests on
/// new connections (which the acceptor spreads over the workers) for a client of the
/// test's own, until a round of them is counted (200 with the limiter's fields) and the
/// local fallback has not grown. A worker's cluster client connects in the background at
/// start; a check that came first would wait for it, past the limiter's 50 ms bound.
async fn until_counted_in_the_cluster(addr: SocketAddr, admin: Option<SocketAddr>) {
    let mut n = 0u32;
    let ready = eventually(Duration::from_secs(10), async || {
        let before = match admin {
            Some(admin) => metric(admin, "roundabout_rate_limit_fallback_total").await,
            None => 0,
        };
        for _ in 0..8 {
            n += 1;
            let ip = format!("192.0.{}.{}", 2 + n / 250, n % 250 + 1);
            let (status, remaining) = hit(&client(), addr, &ip).await;
            if status != 200 || remaining.is_none() {
                return false;
            }
        }
        match admin {
            Some(admin) => metric(admin, "roundabout_rate_limit_fallback_total").await == before,
            None => true,
        }
    })
    .await;
    assert!(ready, "the balancer on {addr} counts in the cluster");
}

#[actix_rt::test]
async fn three_instances_on_a_cluster_share_each_budget_exactly_across_every_master() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start();
    let a = Backend::start("a");
    let extra = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 2\n\n{}",
        limiter(&cluster, 10, "30s", "deny")
    );
    let instances = [
        balancer(&[a.url()], &extra),
        balancer(&[a.url()], &extra),
        balancer(&[a.url()], &extra),
    ];
    for lb in &instances {
        until_counted_in_the_cluster(lb.proxy_addr, None).await;
    }
    let warm_ups = a.hits();
    let client = client();

    // 60 concurrent clients from one IP, spread over the three instances.
    let answers = futures_util::future::join_all(
        (0..60).map(|i| hit(&client, instances[i % 3].proxy_addr, "203.0.113.7")),
    )
    .await;
    let mut admitted: Vec<u64> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, remaining)| remaining.expect("counted"))
        .collect();
    admitted.sort();
    assert_eq!(admitted, (0..10).collect::<Vec<u64>>(), "{answers:?}");
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(refused, 50, "{answers:?}");
    assert_eq!(a.hits() - warm_ups, 10);

    // Many clients, each 12 requests at once over the three instances (five clients at a
    // time): 10 admitted each.
    let ips: Vec<String> = (1..=45).map(|i| format!("198.51.100.{i}")).collect();
    let addrs: Vec<SocketAddr> = instances.iter().map(|lb| lb.proxy_addr).collect();
    let mut answers = Vec::new();
    for five in ips.chunks(5) {
        let requests: Vec<(&String, SocketAddr)> = five
            .iter()
            .flat_map(|ip| (0..12).map(|i| (ip, addrs[i % 3])).collect::<Vec<_>>())
            .collect();
        answers.extend(
            futures_util::future::join_all(requests.into_iter().map(|(ip, addr)| {
                let client = &client;
                async move { (ip.clone(), hit(client, addr, ip).await.0) }
            }))
            .await,
        );
    }
    let mut per_ip: HashMap<String, usize> = HashMap::new();
    for (ip, status) in &answers {
        assert!(*status == 200 || *status == 429, "{ip}: {status}");
        *per_ip.entry(ip.clone()).or_default() += usize::from(*status == 200);
    }
    assert!(per_ip.values().all(|&n| n == 10), "{per_ip:?}");
    assert_eq!(a.hits() - warm_ups, 10 + 45 * 10);

    // The budgets are spread over the three masters by slot, each key with its expiry.
    let masters = cluster.masters();
    let held: Vec<u64> = masters
        .iter()
        .map(|m| m.keys("test:rl:198.51.100.*"))
        .collect();
    assert_eq!(held.iter().sum::<u64>(), 45, "{held:?}");
    assert!(
        held.iter().all(|&n| n > 0),
        "every master holds budgets: {held:?}"
    );
    for ip in ips.iter().take(5) {
        let key = format!("{PREFIX}:{ip}");
        let ttl = cluster
            .master_of(&key)
            .redis
            .command(&["TTL", &key])
            .unwrap();
        let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
        assert!((1..=30).contains(&ttl), "{key}: TTL {ttl}");
    }
}

/// The value of `name` in the admin API's `/metrics` on `admin`.
async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (status, text) = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// What the load saw.
#[derive(Default)]
struct Load {
    sent: AtomicU64,
    /// Answers that were not a counted 200 (status, or no rate-limit fields): lost requests.
    bad: AtomicU64,
    /// Requests for clients whose keys live on the master that is killed.
    to_victim: AtomicU64,
}

#[actix_rt::test]
async fn a_master_killed_under_load_fails_over_and_only_its_clients_are_counted_locally_meanwhile()
{
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start();
    let a = Backend::start("a");
    let (port, admin_port) = (free_port(), free_port());
    let config = config_text(
        &[a.url()],
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 2\n\
             [admin]\naddress = \"127.0.0.1:{admin_port}\"\n{}",
            limiter(&cluster, 1_000_000_000, "60s", "local")
        ),
    );
    let lb = Binary::start(port, &config).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    lb.wait_log("store redis cluster redis://127.0.0.1:", 1)
        .await;
    until_counted_in_the_cluster(addr, Some(admin)).await;

    // 300 clients; the victim is the master of the first one's key.
    let ips: Arc<Vec<String>> = Arc::new(
        (0..300)
            .map(|i| format!("10.1.{}.{}", i / 200, i % 200 + 1))
            .collect(),
    );
    let victim = cluster.master_of(&format!("{PREFIX}:{}", ips[0]));
    let slots = victim.slots();
    let victims: Arc<Vec<bool>> = Arc::new(
        ips.iter()
            .map(|ip| {
                let slot = cluster.slot(&format!("{PREFIX}:{ip}"));
                slots.iter().any(|r| r.contains(&slot))
            })
            .collect(),
    );

    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..16u64)
        .map(|w| {
            let (load, stop, ips, victims) =
                (load.clone(), stop.clone(), ips.clone(), victims.clone());
            actix_rt::spawn(async move {
                let client = client();
                let mut n = w * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let i = (n % ips.len() as u64) as usize;
                    n += 1;
                    load.sent.fetch_add(1, Ordering::Relaxed);
                    if victims[i] {
                        load.to_victim.fetch_add(1, Ordering::Relaxed);
                    }
                    let (status, remaining) = hit(&client, addr, &ips[i]).await;
                    if status != 200 || remaining.is_none() {
                        load.bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    actix_rt::time::sleep(Duration::from_secs(1)).await;
    let fallback_before = metric(admin, "roundabout_rate_limit_fallback_total").await;
    let logged_before = lb.log().len();
    let before = (
        load.sent.load(Ordering::Relaxed),
        load.to_victim.load(Ordering::Relaxed),
    );
    let killed = Instant::now();
    victim.kill();
    lb.wait_log("rate limit store reachable again", 1).await;
    let gap = killed.elapsed();
    let during = (
        load.sent.load(Ordering::Relaxed) - before.0,
        load.to_victim.load(Ordering::Relaxed) - before.1,
    );
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let fallback = metric(admin, "roundabout_rate_limit_fallback_total").await - fallback_before;
    let sent = load.sent.load(Ordering::Relaxed);
    eprintln!(
        "failover under load: breaker open {:.2}s after the kill (cluster-node-timeout {:?}); \
         {fallback} of {} requests in that time took the local fallback ({} of them were \
         for the killed master's clients); {sent} requests in all, {} not answered 200 with \
         the limiter's fields",
        gap.as_secs_f64(),
        common::cluster::NODE_TIMEOUT,
        during.0,
        during.1,
        load.bad.load(Ordering::Relaxed),
    );

    assert_eq!(load.bad.load(Ordering::Relaxed), 0, "no request lost");
    assert!(
        fallback > 0,
        "the killed master's clients were counted locally meanwhile"
    );
    assert!(
        fallback <= during.1 + 16,
        "only its clients took the fallback: {fallback} > {} (+16 in flight)\n{}",
        during.1,
        lb.log()
    );
    assert!(gap < Duration::from_secs(10), "failed over in {gap:?}");

    // What was logged from the kill on.
    let log = lb.log()[logged_before..].to_string();
    let lines = |needle: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    let down = lines("rate limit store unreachable");
    assert_eq!(down.len(), 1, "the outage is logged once:\n{log}");
    let node = format!("redis cluster node 127.0.0.1:{} (slots ", victim.port());
    assert!(down[0].contains(&node), "{}", down[0]);
    let up = lines("rate limit store reachable again");
    assert_eq!(up.len(), 1, "{log}");
    assert!(up[0].contains(&node), "{}", up[0]);

    // The killed master's clients are counted in the cluster again, on its replica.
    cluster.wait_until_whole();
    let key = format!("{PREFIX}:{}", ips[0]);
    let heir = cluster.master_of(&key);
    assert_ne!(heir.port(), victim.port());
    let count = |node: &common::cluster::Node| -> u64 {
        let reply = node.redis.command(&["GET", &key]).unwrap();
        reply
            .lines()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let was = count(heir);
    let client = client();
    for _ in 0..3 {
        assert_eq!(hit(&client, addr, &ips[0]).await.0, 200);
    }
    assert_eq!(count(heir), was + 3, "counted on the new master");
}
