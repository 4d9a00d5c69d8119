//! Rate limits per client address, and who the client is.
//!
//! - A general limit on every route but the operational ones (`/healthz`, `/readyz`,
//!   `/metrics`, which load balancers and scrapers call), and a stricter one on
//!   `/v1/auth/*` on top. Both are GCRA limiters from `governor`, keyed by address (an IPv6
//!   client by its /64, which one host usually owns whole). A throttled request gets 429
//!   `rate_limited` with `Retry-After`.
//! - The client's address is the peer's, unless the peer is a configured trusted proxy: then
//!   it is the right-most address in `X-Forwarded-For` that is not itself a trusted proxy
//!   (the left-most entries are whatever the client chose to send).
//!
//! This is poem middleware around `governor` rather than `tower_governor` through poem's tower
//! compatibility layer: the key (the forwarded-for rule above) and the 429 body (our JSON error
//! with its code) are ours either way, and the tower layer would add a body conversion on every
//! request. The limits are per process; with several replicas, each enforces its own.
//!
//! Per-account login failures (growing delays, then a lockout) are in the database, so they
//! hold across replicas: see `auth`.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use poem::Request;
use poem::http::StatusCode;
use poem::web::RemoteAddr;

use waveline_shared::network::{Network, canonical};

use crate::error::ApiError;

/// The limiter's key: an IPv4 address, or the /64 of an IPv6 one.
pub(crate) fn key_of(address: IpAddr) -> IpAddr {
    match canonical(address) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

/// The client's address as [`Throttle::client_ip`] resolved it, in the request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The limits, from the settings.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Requests per minute per client on every route (0: no limit).
    pub per_minute: u32,
    /// Requests per minute per client on `/v1/auth/*`, on top (0: no limit).
    pub auth_per_minute: u32,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Network>,
}

/// The rate limiters of one process.
pub struct Throttle {
    general: Option<DefaultKeyedRateLimiter<IpAddr>>,
    auth: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted: Vec<Network>,
    calls: AtomicU64,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("trusted", &self.trusted).finish_non_exhaustive()
    }
}

fn limiter(per_minute: u32) -> Option<DefaultKeyedRateLimiter<IpAddr>> {
    NonZeroU32::new(per_minute).map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_minute(n)))
}

/// How often (in requests) idle keys are dropped from the limiters.
const SWEEP_EVERY: u64 = 8192;

impl Throttle {
    pub fn new(config: &ThrottleConfig) -> Throttle {
        Throttle {
            general: limiter(config.per_minute),
            auth: limiter(config.auth_per_minute),
            trusted: config.trusted_proxies.clone(),
            calls: AtomicU64::new(0),
        }
    }

    fn trusted(&self, address: IpAddr) -> bool {
        self.trusted.iter().any(|network| network.contains(address))
    }

    /// Who is calling: the peer, or what a trusted proxy says the client is.
    pub fn client_ip(&self, req: &Request) -> Option<IpAddr> {
        let peer = match req.remote_addr() {
            RemoteAddr(poem::Addr::SocketAddr(addr)) => addr.ip(),
            _ => return None,
        };
        let forwarded = req.headers().get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok());
        Some(self.resolve(peer, forwarded))
    }

    /// The client behind `peer`, given the `X-Forwarded-For` values of the request.
    fn resolve<'a>(&self, peer: IpAddr, forwarded: impl Iterator<Item = &'a str>) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusted(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded.flat_map(|value| value.split(',')).map(str::trim).collect();
        // From the right: skip our own proxies; the first other hop is the client. A hop that
        // does not parse ends the walk at the peer: everything left of it may be the client's
        // own invention, and skipping it would let a client pick its address.
        for hop in hops.into_iter().rev() {
            match hop.parse::<IpAddr>().map(canonical) {
                Ok(hop) if self.trusted(hop) => continue,
                Ok(hop) => return hop,
                Err(_) => return peer,
            }
        }
        peer
    }

    fn check(limiter: &Option<DefaultKeyedRateLimiter<IpAddr>>, key: &IpAddr) -> Result<(), Duration> {
        match limiter {
            Some(limiter) => {
                limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
            }
            None => Ok(()),
        }
    }

    /// Notes who is calling on `req` ([`ClientAddr`]) and refuses the request with 429 when
    /// its client is over a limit.
    pub fn admit(&self, req: &mut Request) -> Result<(), ApiError> {
        let client = self.client_ip(req);
        if let Some(client) = client {
            req.set_data(ClientAddr(client));
            let path = req.uri().path();
            let operational = matches!(path, "/healthz" | "/readyz" | "/metrics");
            if !operational {
                let key = key_of(client);
                let verdict = Self::check(&self.general, &key)
                    .and_then(|()| if path.starts_with("/v1/auth/") { Self::check(&self.auth, &key) } else { Ok(()) });
                if let Err(wait) = verdict {
                    metrics::counter!("waveline_http_throttled_total").increment(1);
                    tracing::info!(client = %client, path, "rate limited");
                    return Err(too_many(wait, "rate_limited", "too many requests from this address"));
                }
            }
            if self.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                for limiter in [&self.general, &self.auth].into_iter().flatten() {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        }
        Ok(())
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub fn too_many(wait: Duration, code: &'static str, what: &str) -> ApiError {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, format!("{what}; retry in {seconds} s"))
        .with_header("retry-after", seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_their_64() {
        assert_eq!(
            key_of("2001:db8:1:2:3:4:5:6".parse().expect("ip")),
            "2001:db8:1:2::".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(key_of("::ffff:192.0.2.1".parse().expect("ip")), "192.0.2.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let throttle = Throttle::new(&ThrottleConfig {
            per_minute: 0,
            auth_per_minute: 0,
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
        });
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        let client = |peer: &str, forwarded: &[&str]| throttle.resolve(ip(peer), forwarded.iter().copied());
        // An untrusted peer's header is ignored.
        assert_eq!(client("203.0.113.5", &["1.2.3.4"]), ip("203.0.113.5"));
        // Through a trusted proxy: the right-most untrusted hop, not what the client put first.
        assert_eq!(client("10.0.0.2", &["6.6.6.6, 198.51.100.7"]), ip("198.51.100.7"));
        assert_eq!(client("10.0.0.2", &["6.6.6.6", "198.51.100.7, 10.0.0.9"]), ip("198.51.100.7"));
        // A trusted peer that forwards nothing usable is the client itself.
        assert_eq!(client("10.0.0.2", &["garbage"]), ip("10.0.0.2"));
        // An unparseable hop is not skipped to reach an address the client wrote before it.
        assert_eq!(client("10.0.0.2", &["6.6.6.6, garbage"]), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.2", &["6.6.6.6", "unknown, 10.0.0.9"]), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.2", &["6.6.6.6, "]), ip("10.0.0.2"));
        assert_eq!(client("::ffff:10.0.0.2", &[]), ip("10.0.0.2"));
    }

    #[test]
    fn retry_after_rounds_up() {
        let err = too_many(Duration::from_millis(1500), "rate_limited", "slow down");
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.header.as_ref().map(|(_, value)| value.as_str()), Some("2"));
        let err = too_many(Duration::ZERO, "rate_limited", "slow down");
        assert_eq!(err.header.as_ref().map(|(_, value)| value.as_str()), Some("1"));
    }
}
