//! The admin API on `admin.address`: the pools and their servers (changed at runtime), the
//! routes, health and metrics.
//!
//! The handlers own nothing: membership changes go to the
//! [`HealthActor`], which broadcasts them to every worker's
//! balancer; `GET /pools/{pool}/servers` asks each balancer for its view and sums in-flight
//! counts. `/servers` is `/pools/default/servers`.
//! With `admin.token` set, every call but `/healthz` needs `Authorization: Bearer TOKEN`,
//! compared in constant time. The status page (`status.rs`) is served beside these calls
//! and uses [`authorize`] and [`server_views`]; this module knows nothing of it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use actix::Addr;
use actix_web::{
    http::{header, StatusCode},
    web, HttpRequest, HttpResponse, ResponseError,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::{
    balancer::{ListServers, ServerView},
    config::{default_weight, parse_server_url, Config, ServerConfig, DEFAULT_POOL},
    health::{AddServer, Balancers, HealthActor, ListPools, RemoveServer},
    metrics::Metrics,
    registry::MembershipError,
    upstream::PoolId,
};

/// What the admin handlers share.
pub struct AdminState {
    pub health: Addr<HealthActor>,
    pub metrics: Arc<Metrics>,
    /// Empty: no token needed.
    pub token: String,
    /// The running configuration (a reload replaces it), for `GET /routes`.
    pub config: Arc<Mutex<Config>>,
}

/// An admin call that failed; answered as `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the balancer is shutting down")]
    Unavailable,
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if let AdminError::Unauthorized = self {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        res.json(serde_json::json!({ "error": self.to_string() }))
    }
}

impl From<MembershipError> for AdminError {
    fn from(e: MembershipError) -> Self {
        match e {
            MembershipError::Duplicate(_) => AdminError::Conflict(e.to_string()),
            MembershipError::Unknown(_) | MembershipError::UnknownPool(_) => {
                AdminError::NotFound(e.to_string())
            }
        }
    }
}

/// A server as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub url: String,
    pub weight: u32,
    /// In rotation: passing its health checks and not ejected.
    pub healthy: bool,
    pub in_flight: u32,
    pub draining: bool,
    /// Taken out for a while after failures in a row (`health_check.eject_after_5xx`).
    pub ejected: bool,
    /// For a server known by name: the URL with the name (`url` is its address's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The body of `POST /servers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewServer {
    url: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

/// A pool and its servers, as `GET /pools` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PoolInfo {
    pub strategy: &'static str,
    pub servers: Vec<ServerInfo>,
    /// Gone from the configuration: its servers drain, then it goes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// Registers the admin routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics))
        .route("/servers", web::get().to(list_default_servers))
        .route("/servers", web::post().to(add_default_server))
        .route("/servers/{server}", web::delete().to(remove_default_server))
        .route("/pools", web::get().to(list_pools))
        .route("/pools/{pool}/servers", web::get().to(list_servers))
        .route("/pools/{pool}/servers", web::post().to(add_server))
        .route(
            "/pools/{pool}/servers/{server}",
            web::delete().to(remove_server),
        )
        .route("/routes", web::get().to(list_routes))
        .default_service(web::to(|| async {
            AdminError::NotFound("no such admin call".into()).error_response()
        }));
}

/// Checks the bearer token of a call that needs one (every call but `/healthz` and the
/// status page's HTML).
pub fn authorize(req: &HttpRequest, state: &AdminState) -> Result<(), AdminError> {
    if state.token.is_empty() {
        return Ok(());
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if token_matches(given.as_bytes(), state.token.as_bytes()) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

/// The token of `Bearer TOKEN`: the scheme is case-insensitive and may be followed by more
/// than one space (RFC 9110 §11.4, §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Who made an admin call, for the log.
fn caller(req: &HttpRequest) -> String {
    req.peer_addr()
        .map_or_else(|| "an unknown caller".into(), |a| a.to_string())
}

/// Compares in time that depends on the token's length only, never on the bytes given, so
/// neither the token nor its length can be learnt from response times (`ct_eq` on slices
/// of different lengths returns at once).
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    let mut same = given.len().ct_eq(&token.len());
    for (i, t) in token.iter().enumerate() {
        same &= given.get(i).copied().unwrap_or(0).ct_eq(t);
    }
    bool::from(same)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    Ok(HttpResponse::Ok()
        // The body is OpenMetrics text (`# EOF`, `_total` samples): say so.
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.encode()))
}

/// Every server of every pool as the workers see it, once: in-flight counts summed,
/// healthy when every worker has it in rotation, draining when any worker drains it.
pub async fn server_views(health: &Addr<HealthActor>) -> Result<Vec<ServerView>, AdminError> {
    let balancers = health
        .send(Balancers)
        .await
        .map_err(|_| AdminError::Unavailable)?;
    let mut out: Vec<ServerView> = Vec::new();
    // (pool, label) → index in `out`: every worker lists every server.
    let mut seen: HashMap<(PoolId, Arc<str>), usize> = HashMap::new();
    for b in balancers {
        // A worker that has stopped no longer has a view to give.
        let Ok(views) = b.send(ListServers).await else {
            continue;
        };
        for v in views {
            let key = (v.upstream.pool, v.upstream.label.clone());
            match seen.get(&key) {
                Some(&i) => {
                    let s = &mut out[i];
                    s.in_flight += v.in_flight;
                    s.draining |= v.draining;
                    s.healthy &= v.healthy;
                    s.ejected |= v.ejected;
                }
                None => {
                    seen.insert(key, out.len());
                    out.push(v);
                }
            }
        }
    }
    Ok(out)
}

impl ServerInfo {
    fn of(v: &ServerView) -> Self {
        ServerInfo {
            url: v.upstream.shown_url(),
            name: v.upstream.shown_name(),
            weight: v.upstream.weight,
            healthy: v.healthy,
            in_flight: v.in_flight,
            draining: v.draining,
            ejected: v.ejected,
        }
    }
}

/// The pool named `name`, as the registry has it now; 404 for a pool it does not have.
async fn known_pool(health: &Addr<HealthActor>, name: &str) -> Result<PoolId, AdminError> {
    let pools = health
        .send(ListPools)
        .await
        .map_err(|_| AdminError::Unavailable)?;
    pools
        .iter()
        .find(|p| &*p.name == name && !p.retired)
        .map(|p| p.id)
        .ok_or_else(|| AdminError::NotFound(format!("no pool {name}")))
}

/// Every server of `pool` with its health, summed in-flight count, and draining state.
async fn servers(health: &Addr<HealthActor>, pool: PoolId) -> Result<Vec<ServerInfo>, AdminError> {
    Ok(server_views(health)
        .await?
        .iter()
        .filter(|v| v.upstream.pool == pool)
        .map(ServerInfo::of)
        .collect())
}

async fn list_default_servers(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    Ok(HttpResponse::Ok().json(servers(&state.health, PoolId::DEFAULT).await?))
}

async fn list_servers(
    req: HttpRequest,
    pool: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let pool = known_pool(&state.health, &pool).await?;
    Ok(HttpResponse::Ok().json(servers(&state.health, pool).await?))
}

async fn list_pools(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let pools = state
        .health
        .send(ListPools)
        .await
        .map_err(|_| AdminError::Unavailable)?;
    let views = server_views(&state.health).await?;
    // A JSON object in name order; `default` is a name like the others there.
    let out: BTreeMap<&str, PoolInfo> = pools
        .iter()
        .map(|p| {
            let servers = views
                .iter()
                .filter(|v| v.upstream.pool == p.id)
                .map(ServerInfo::of)
                .collect();
            let info = PoolInfo {
                strategy: p.strategy.name(),
                servers,
                draining: p.retired,
            };
            (&*p.name, info)
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

async fn list_routes(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let config = state.config.lock().unwrap_or_else(|e| e.into_inner());
    let routes: Vec<serde_json::Value> = config
        .routes
        .iter()
        .map(|r| {
            // As written, with the name and pool filled in as they apply.
            let mut v = serde_json::to_value(&r.written).unwrap_or_default();
            v["name"] = serde_json::Value::from(&*r.name);
            v["pool"] = serde_json::Value::from(&*r.pool);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(routes))
}

async fn add_default_server(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    added(req, DEFAULT_POOL.into(), body, state).await
}

async fn add_server(
    req: HttpRequest,
    pool: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    added(req, pool.into_inner(), body, state).await
}

async fn added(
    req: HttpRequest,
    pool: String,
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let new: NewServer = serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("invalid body: {e}")))?;
    let url = parse_server_url(&new.url).map_err(AdminError::BadRequest)?;
    if new.weight == 0 {
        return Err(AdminError::BadRequest("weight must be at least 1".into()));
    }
    let weight = new.weight;
    let upstream = state
        .health
        .send(AddServer {
            pool,
            server: ServerConfig { url, weight },
            by: caller(&req),
        })
        .await
        .map_err(|_| AdminError::Unavailable)??;
    Ok(HttpResponse::Created().json(ServerInfo {
        url: upstream.url.as_str().trim_end_matches('/').to_string(),
        weight,
        healthy: false,
        in_flight: 0,
        draining: false,
        ejected: false,
        name: None,
    }))
}

async fn remove_default_server(
    req: HttpRequest,
    server: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    removed(req, DEFAULT_POOL.into(), server.into_inner(), state).await
}

async fn remove_server(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    let (pool, server) = path.into_inner();
    removed(req, pool, server, state).await
}

async fn removed(
    req: HttpRequest,
    pool: String,
    server: String,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    state
        .health
        .send(RemoveServer {
            pool,
            label: server,
            by: caller(&req),
        })
        .await
        .map_err(|_| AdminError::Unavailable)??;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, token_matches};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            assert_eq!(bearer_token(header), Some("s3cret"), "{header}");
        }
        assert_eq!(bearer_token("Basic s3cret"), None);
        assert_eq!(bearer_token("Bearers3cret"), None);
    }

    #[test]
    fn the_token_matches_only_itself() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        for wrong in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"s3cres"] {
            assert!(!token_matches(wrong, b"s3cret"), "{wrong:?}");
        }
    }
}
