//! Servers known by name (SPEC, "Servers by name"): a server URL with a host name stands for
//! every address the name resolves to (A and AAAA records), each a server of its own.
//!
//! [`Names`] resolves through hickory-resolver, the pool's `resolvers` or the system's
//! (`/etc/resolv.conf`), with no cache of its own: `resolve_interval` is the cache, and each
//! round asks the servers again. At start every name is resolved before anything serves
//! ([`resolve_at_start`], on a thread of its own: the only place something here waits); a
//! name that does not resolve then is a start-up error. Afterwards the HealthActor asks
//! again every `resolve_interval`, off the request path.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    system_conf::read_system_conf,
    TokioResolver,
};

use crate::config::PoolConfig;

/// How long one lookup may take, all its tries together.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A resolver for one pool's names.
#[derive(Clone)]
pub struct Names {
    resolver: TokioResolver,
}

impl Names {
    /// A resolver asking `resolvers` (`[]`: the system's name servers).
    pub fn new(resolvers: &[SocketAddr]) -> Result<Names, String> {
        let (config, mut opts) = if resolvers.is_empty() {
            read_system_conf()
                .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
        } else {
            let servers = resolvers
                .iter()
                .map(|addr| {
                    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                    udp.port = addr.port();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (
                ResolverConfig::from_parts(None, vec![], servers),
                ResolverOpts::default(),
            )
        };
        // Asked again every resolve_interval: no cache between rounds, every address kind.
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot make a resolver: {e}"))?;
        Ok(Names { resolver })
    }

    /// Every address of `host`, with `port`, in a stable order (sorted, once each); an error
    /// when the lookup fails, times out or finds no address.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(host))
            .await
            .map_err(|_| format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<SocketAddr> = found
            .iter()
            .map(|ip: IpAddr| SocketAddr::new(ip, port))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(addrs)
    }
}

/// A server entry given by name: its pool, its URL as configured, the name and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedServer {
    pub pool: std::sync::Arc<str>,
    pub url: String,
}

/// The addresses of every server given by name, by pool and URL.
pub type Resolved = HashMap<NamedServer, Vec<SocketAddr>>;

/// Resolves every server given by name in `pools`, before anything serves; the first that
/// does not resolve is the error, naming it. Runs the lookups on a thread of its own (with
/// its own runtime), as the caller may be inside one.
pub fn resolve_at_start(pools: &[PoolConfig]) -> Result<Resolved, String> {
    let wanted: Vec<(NamedServer, String, u16, Vec<SocketAddr>)> = pools
        .iter()
        .flat_map(|p| {
            p.servers.iter().filter_map(move |s| {
                let host = s.host_name()?;
                let named = NamedServer {
                    pool: p.name.clone(),
                    url: s.url.to_string(),
                };
                Some((named, host.to_string(), s.port(), p.resolvers.clone()))
            })
        })
        .collect();
    if wanted.is_empty() {
        return Ok(Resolved::new());
    }
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the resolver's runtime: {e}"))?;
        runtime.block_on(async move {
            let mut out = Resolved::new();
            let mut resolvers: HashMap<Vec<SocketAddr>, Names> = HashMap::new();
            for (named, host, port, servers) in wanted {
                let names = match resolvers.get(&servers) {
                    Some(n) => n.clone(),
                    None => {
                        let n = Names::new(&servers)?;
                        resolvers.insert(servers, n.clone());
                        n
                    }
                };
                let addrs = names.lookup(&host, port).await.map_err(|e| {
                    format!(
                        "{} (pool {}): {host} does not resolve: {e}",
                        named.url, named.pool
                    )
                })?;
                out.insert(named, addrs);
            }
            Ok(out)
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the resolver's thread failed".into()))
}

/// Looks up every server given by name in `next` again, for a reload (on the caller's
/// runtime: the lookups are awaited, nothing blocks). A name that was already in `current`
/// and fails keeps the addresses it has (it is left out of the answer); a name new in the
/// file must resolve, or the reload is refused with the reason.
pub async fn resolve_for_reload(
    current: &[PoolConfig],
    next: &[PoolConfig],
) -> Result<Resolved, String> {
    let known: std::collections::HashSet<(std::sync::Arc<str>, String)> = current
        .iter()
        .flat_map(|p| {
            p.servers
                .iter()
                .map(move |s| (p.name.clone(), s.url.to_string()))
        })
        .collect();
    let mut out = Resolved::new();
    let mut resolvers: HashMap<Vec<SocketAddr>, Names> = HashMap::new();
    for pool in next {
        for server in &pool.servers {
            let Some(host) = server.host_name() else {
                continue;
            };
            let names = match resolvers.get(&pool.resolvers) {
                Some(n) => n.clone(),
                None => {
                    let n = Names::new(&pool.resolvers)?;
                    resolvers.insert(pool.resolvers.clone(), n.clone());
                    n
                }
            };
            let named = NamedServer {
                pool: pool.name.clone(),
                url: server.url.to_string(),
            };
            match names.lookup(host, server.port()).await {
                Ok(addrs) => {
                    out.insert(named, addrs);
                }
                Err(e) if !known.contains(&(named.pool.clone(), named.url.clone())) => {
                    return Err(format!(
                        "{} (pool {}): {host} does not resolve: {e}",
                        named.url, named.pool
                    ));
                }
                Err(_) => {}
            }
        }
    }
    Ok(out)
}
