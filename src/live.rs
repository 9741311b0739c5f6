//! The live state one request runs under: the config plus what is derived from it (key lookup,
//! the limiters of each route and key, the TLS settings). Swapped as a whole on reload (arc-swap), so a request
//! that started under one config finishes under it. Limiters come from the long-lived
//! [`Registry`], so a reload that keeps a limit keeps its clients' state.

use std::sync::Arc;

use crate::auth::{self, KeyStore};
use crate::config::Config;
use crate::config::units::Rate;
use crate::rate_limit::{Limiter, LimiterId, Registry};

pub struct Live {
    pub config: Config,
    pub keys: KeyStore,
    pub key_ids: Vec<Arc<str>>,
    /// Per-IP limiter of each route (by `Route::index`).
    pub route_ip: Vec<Option<Arc<Limiter>>>,
    /// Per-key limiter of each route that sets `per_key`.
    pub route_key: Vec<Option<Arc<Limiter>>>,
    /// Each key's own limiter when it sets `per_key`.
    pub key_own: Vec<Option<Arc<Limiter>>>,
    /// `[limits].per_key`, shared by keys and routes that set nothing.
    pub default_key: Option<Arc<Limiter>>,
    /// Each route's request series (by `Route::index`).
    pub route_metrics: Vec<Arc<crate::metrics::RouteMetrics>>,
    /// The listeners' TLS settings (certificates re-read at reload), swapped with the config.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `limits.max_buffered_bytes`, one permit a byte: what `llm` request bodies held in memory
    /// may take together. A reload starts a new pool (bodies in flight keep their old permits).
    pub buffered: Arc<tokio::sync::Semaphore>,
}

impl Live {
    pub fn build(
        config: Config,
        tls: Option<Arc<rustls::ServerConfig>>,
        registry: &Registry,
    ) -> Live {
        let mut used = Vec::new();
        let mut get = |id: LimiterId| {
            used.push(id.clone());
            registry.get(id)
        };
        let route_ip = config
            .routes
            .iter()
            .map(|r| {
                get(LimiterId::RouteIp {
                    route: r.name.clone(),
                    rate: r.per_ip.unwrap_or(config.limits.per_ip),
                })
            })
            .collect();
        let route_key = config
            .routes
            .iter()
            .map(|r| {
                r.per_key.and_then(|rate| {
                    get(LimiterId::RouteKey {
                        route: r.name.clone(),
                        rate,
                    })
                })
            })
            .collect();
        let key_own = config
            .keys
            .iter()
            .map(|k| {
                k.per_key.and_then(|rate| {
                    get(LimiterId::KeyOwn {
                        key: k.id.clone(),
                        rate,
                    })
                })
            })
            .collect();
        let default_key = get(LimiterId::DefaultKey {
            rate: config.limits.per_key,
        });
        registry.retain(&used);
        registry.store().resize(config.limits.max_tracked_clients);
        Live {
            tls,
            buffered: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_buffered_bytes as usize,
            )),
            route_metrics: config
                .routes
                .iter()
                .map(|r| Arc::new(crate::metrics::RouteMetrics::new(&r.name)))
                .collect(),
            keys: KeyStore::new(&config.keys),
            key_ids: auth::key_ids(&config.keys),
            route_ip,
            route_key,
            key_own,
            default_key,
            config,
        }
    }

    /// The metrics label for a model: its name when some key's allow-list names it exactly or the
    /// price table lists it, else `other`, so clients cannot blow up label cardinality (SPEC §7).
    pub fn model_label(&self, model: Option<&str>) -> String {
        use crate::llm::request::ModelPattern;
        let priced = |m: &str| {
            self.config
                .usage
                .as_ref()
                .is_some_and(|u| u.prices.contains_key(m))
        };
        let named = model.is_some_and(|m| {
            priced(m)
                || self.config.keys.iter().any(|k| {
                    k.models.as_ref().is_some_and(|ps| {
                        ps.iter().any(|p| *p == ModelPattern::Exact(m.to_owned()))
                    })
                })
        });
        match model {
            Some(m) if named => m.to_owned(),
            _ => "other".to_owned(),
        }
    }

    /// The per-key limiter for key `k` on route `r`: the key's own, else the route's, else the
    /// default (SPEC §3 step 8). `None` when that limit is `off`.
    pub fn per_key_limiter(&self, k: usize, r: usize) -> Option<&Arc<Limiter>> {
        match self.config.keys[k].per_key {
            Some(Rate::Off) => None,
            Some(_) => self.key_own[k].as_ref(),
            None => self.per_subject_limiter(r),
        }
    }

    /// The per-key limiter of route `r` for an identity that is not a key (a JWT subject): the
    /// route's `per_key`, else `[limits].per_key`.
    pub fn per_subject_limiter(&self, r: usize) -> Option<&Arc<Limiter>> {
        match self.config.routes[r].per_key {
            Some(Rate::Off) => None,
            Some(_) => self.route_key[r].as_ref(),
            None => self.default_key.as_ref(),
        }
    }
}
