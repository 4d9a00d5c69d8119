//! The HTTP server loop: our own accept loop in front of hyper, rather than `poem::Server`.
//!
//! Three things made us write the forty lines ourselves:
//! - **`TCP_NODELAY`.** Range responses are small and latency-bound: with Nagle's algorithm on,
//!   the tail of a response can wait for the client's delayed ACK (up to 40 ms on Linux).
//!   poem's listeners leave the option alone.
//! - **Vectored writes.** poem boxes every connection into a type whose `AsyncWrite` does not
//!   forward `is_write_vectored`, so hyper falls back to copying every response body into its
//!   header buffer before writing: a 64 KiB memcpy per range request, a tenth of the CPU time
//!   of range serving when we profiled it. On the bare `TcpStream`, hyper queues the body and
//!   hands header and body to one `writev`.
//! - **Slow and dead clients.** hyper's HTTP/1 header-read timeout (30 s) needs a timer, which
//!   poem does not give it: without one, a client sending a header a byte a minute holds its
//!   connection forever (slowloris). HTTP/2 has no per-request head timeout in hyper, so every
//!   connection, of either protocol, must bring its first request within the same 30 s or is
//!   closed; HTTP/2 connections are pinged every 20 s and closed when a ping goes unanswered
//!   for 20 s, and hold at most 200 concurrent streams with 64 KiB of headers each. Bodies
//!   have their own read timeouts (see [`crate::body`]).
//! - **A connection cap.** At most `max_connections` connections are served at once; past that
//!   the loop stops accepting until one closes, and new clients wait in the kernel's backlog
//!   rather than each costing the process a task and buffers. So that one client cannot fill
//!   it, a client address (an IPv6 one by its /64) holds at most `max_connections_per_client`
//!   (trusted proxies excepted: they carry many clients), and a connection with nothing in
//!   flight is closed after `idle_timeout` (60 s; hyper has no idle timeout for HTTP/2, and a
//!   client's HTTP/2 stack answers pings by itself).
//!
//! Everything else is as poem does it: each request becomes a `poem::Request` (upgrades
//! included) for the same endpoint, and on shutdown the listener closes, open connections
//! finish their requests (keep-alive connections are told to close), and whatever is still
//! open after the grace period is dropped.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use waveline_shared::network::Network;

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
const H2_MAX_STREAMS: u32 = 200;
const H2_MAX_HEADER_BYTES: u32 = 64 * 1024;

/// How often this process's accept loops stopped at the connection cap (also counted in
/// `waveline_http_connection_cap_reached_total`).
static CAP_WAITS: AtomicU64 = AtomicU64::new(0);

/// What one process serves at once, and how long a connection may sit before its first request.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: u32,
    /// Connections one client address (an IPv6 one by its /64) may hold; trusted proxies are
    /// exempt.
    pub max_connections_per_client: u32,
    pub trusted_proxies: Vec<Network>,
    pub first_request_within: Duration,
    /// How long a connection with nothing in flight stays open after a request.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 10_000,
            max_connections_per_client: 256,
            trusted_proxies: Vec::new(),
            first_request_within: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// How long an idle keep-alive connection (HTTP/1.1 or HTTP/2) stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one connection is doing: requests in flight (bodies still being sent included), and
/// since when it has been idle.
#[derive(Debug)]
struct Activity {
    opened: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds from `opened` to the last time the connection went idle.
    idle_since_ms: AtomicU64,
    served: std::sync::atomic::AtomicBool,
    /// Woken when a request starts or ends, so the idle clock restarts.
    changed: tokio::sync::Notify,
}

/// A request in flight; dropping it (with the response body) marks the end.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: std::time::Instant::now(),
            in_flight: Default::default(),
            idle_since_ms: AtomicU64::new(0),
            served: Default::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.served.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
        Busy(self.clone())
    }

    fn served(&self) -> bool {
        self.served.load(Ordering::SeqCst)
    }

    /// How long it has been idle (`None` while a request is in flight).
    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| {
            let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
            self.opened.elapsed().saturating_sub(since)
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// Open connections per client.
#[derive(Debug)]
struct PerClient {
    max: u32,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

/// A client's place; dropping it frees the place.
#[derive(Debug)]
struct Place(Arc<PerClient>, std::net::IpAddr);

impl PerClient {
    fn new(max: u32) -> PerClient {
        PerClient { max: max.max(1), open: Default::default() }
    }

    fn take(self: &Arc<Self>, client: std::net::IpAddr) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Place(self.clone(), client))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// A bound listener, ready to [`serve`](Listener::serve).
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    limits: ConnectionLimits,
    /// Connections being served now.
    open: Arc<Semaphore>,
}

impl Listener {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
        Ok(Listener::from_tcp(TcpListener::bind(addr).await?))
    }

    /// Serves an already bound socket.
    pub fn from_tcp(listener: TcpListener) -> Listener {
        let limits = ConnectionLimits::default();
        let open = Arc::new(Semaphore::new(limits.max_connections as usize));
        Listener { listener, limits, open }
    }

    /// Sets the limits (the defaults are [`ConnectionLimits::default`]).
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Listener {
        self.open = Arc::new(Semaphore::new(limits.max_connections.max(1) as usize));
        self.limits = limits;
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `endpoint` until `shutdown` is cancelled, then lets open connections finish for
    /// at most `grace`.
    pub async fn serve<E>(self, endpoint: E, shutdown: CancellationToken, grace: Duration) -> io::Result<()>
    where
        E: Endpoint + 'static,
    {
        let endpoint = Arc::new(endpoint.map_to_response());
        let local = LocalAddr(self.listener.local_addr()?.into());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.limits.first_request_within);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_KEEP_ALIVE))
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_BYTES);
        let graceful = GracefulShutdown::new();
        let per_client = Arc::new(PerClient::new(self.limits.max_connections_per_client));
        loop {
            // A place for one more connection first: at the cap, stop accepting.
            let permit = match self.open.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    CAP_WAITS.fetch_add(1, Ordering::SeqCst);
                    metrics::counter!("waveline_http_connection_cap_reached_total").increment(1);
                    tracing::warn!(max = self.limits.max_connections, "at the connection cap; new clients wait");
                    tokio::select! {
                        permit = self.open.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                        () = shutdown.cancelled() => break,
                    }
                }
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // One client (an IPv6 one by its /64) holds at most its share of the connections;
            // past it, a new one is closed at once. Trusted proxies carry many clients each.
            let client = crate::throttle::key_of(peer.ip());
            let trusted = self.limits.trusted_proxies.iter().any(|network| network.contains(peer.ip()));
            let Some(place) = (if trusted { Some(None) } else { per_client.take(client).map(Some) }) else {
                metrics::counter!("waveline_http_connections_refused_total", "reason" => "per_client").increment(1);
                drop(stream);
                continue;
            };
            set_nodelay(&stream);
            let (endpoint, local, remote) = (endpoint.clone(), local.clone(), RemoteAddr(peer.into()));
            let activity = Arc::new(Activity::new());
            let service = hyper::service::service_fn({
                let activity = activity.clone();
                move |req: hyper::Request<Incoming>| {
                    let busy = activity.begin();
                    let (endpoint, local, remote) = (endpoint.clone(), local.clone(), remote.clone());
                    async move {
                        let req = poem::Request::from((req, local, remote, Scheme::HTTP));
                        let response: hyper::Response<BoxBody<Bytes, io::Error>> =
                            endpoint.get_response(req).await.into();
                        // The request counts as in flight until its body is sent (or dropped).
                        let response = response.map(|body| {
                            body.map_err(move |err| {
                                let _busy = &busy;
                                err
                            })
                            .boxed()
                        });
                        Ok::<_, Infallible>(response)
                    }
                }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let connection = graceful.watch(connection);
            let (first_request_within, idle_timeout) = (self.limits.first_request_within, self.limits.idle_timeout);
            tokio::spawn(async move {
                let (_permit, _place) = (permit, place);
                let mut connection = std::pin::pin!(connection);
                // A connection with nothing in flight is closed once it has been idle too long:
                // `first_request_within` before its first request, `idle_timeout` after one.
                let result = loop {
                    let idle_for = activity.idle_for();
                    let allowed = if activity.served() { idle_timeout } else { first_request_within };
                    let check = match idle_for {
                        Some(idle) if idle >= allowed => {
                            metrics::counter!("waveline_http_connections_timed_out_total").increment(1);
                            return;
                        }
                        Some(idle) => allowed - idle,
                        None => allowed,
                    };
                    tokio::select! {
                        result = connection.as_mut() => break result,
                        () = tokio::time::sleep(check) => {}
                        () = activity.changed.notified() => {}
                    }
                };
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!(grace_s = grace.as_secs(), "connections still open after the grace period are dropped");
            }
        }
        Ok(())
    }
}

/// Sets `TCP_NODELAY` (a failure costs latency, not correctness: logged only).
fn set_nodelay(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "could not set TCP_NODELAY");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>) {
        server_with(super::ConnectionLimits::default()).await
    }

    async fn server_with(
        limits: super::ConnectionLimits,
    ) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>) {
        let listener =
            super::Listener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind").with_limits(limits);
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let app = poem::endpoint::make_sync(|req: poem::Request| format!("hello {}", req.uri().path()));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { listener.serve(app, stop, Duration::from_secs(2)).await.expect("serve") }
        });
        (addr, stop, task)
    }

    #[tokio::test]
    async fn nodelay_is_set_on_accepted_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move { tokio::net::TcpStream::connect(addr).await });
        let (stream, _) = listener.accept().await.expect("accept");
        assert!(!stream.nodelay().expect("nodelay"), "the kernel default is off");
        super::set_nodelay(&stream);
        assert!(stream.nodelay().expect("nodelay"));
        drop(client.await);
    }

    #[tokio::test]
    async fn it_serves_and_stops_on_request() {
        let (addr, stop, task) = server().await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /there HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello /there"), "{answer}");
        // An idle keep-alive connection does not hold the shutdown up.
        let held = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops within the grace").expect("join");
        drop(held);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
    }

    /// Stops the server and waits for its loop to end.
    async fn shut_down(stop: tokio_util::sync::CancellationToken, task: tokio::task::JoinHandle<()>) {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("join");
    }

    /// Sends one keep-alive request on `stream` and reads the answer's head and body.
    async fn ask(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.expect("write");
        let mut buffer = vec![0; 4096];
        let mut answer = String::new();
        while !answer.ends_with(&format!("hello {path}")) {
            let read = stream.read(&mut buffer).await.expect("read");
            assert!(read > 0, "closed before answering: {answer}");
            answer.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
        answer
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let limits = super::ConnectionLimits { max_connections: 2, ..Default::default() };
        let (addr, stop, task) = server_with(limits).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(ask(&mut first, "/one").await.starts_with("HTTP/1.1 200"));
        assert!(ask(&mut second, "/two").await.starts_with("HTTP/1.1 200"));
        // The third is queued by the kernel, not served: its answer comes only once a place
        // frees, which closing the first does.
        let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let pending = tokio::spawn(async move { ask(&mut third, "/three").await });
        let waited_before = cap_waits();
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("served").expect("join");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(waited_before >= 1, "the loop never stopped at the cap");
        drop(second);
        shut_down(stop, task).await;
    }

    /// How often this process's loops stopped at the connection cap (the counter's value).
    fn cap_waits() -> u64 {
        super::CAP_WAITS.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_connection_without_a_request_is_closed_whatever_its_protocol() {
        let limits = super::ConnectionLimits { first_request_within: Duration::from_millis(300), ..Default::default() };
        let (addr, stop, task) = server_with(limits).await;
        for opening in [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &b"GET / HTTP/1.1\r\nhost"[..], &b""[..]] {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.write_all(opening).await.expect("write");
            // The server ends the connection: reads drain whatever it sent (an HTTP/2
            // SETTINGS frame, a 408), then see the end.
            let mut sink = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
            assert!(closed.is_ok(), "a connection opened with {opening:?} was still open after 10 s");
        }
        shut_down(stop, task).await;
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let limits = super::ConnectionLimits { idle_timeout: Duration::from_millis(300), ..Default::default() };
        let (addr, stop, task) = server_with(limits).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(ask(&mut stream, "/once").await.starts_with("HTTP/1.1 200"));
        // Served once and left idle: the server ends it (the read sees the end).
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "an idle keep-alive connection was still open after 10 s");
        shut_down(stop, task).await;
    }

    #[tokio::test]
    async fn one_client_cannot_take_every_connection() {
        let limits = super::ConnectionLimits { max_connections_per_client: 2, ..Default::default() };
        let (addr, stop, task) = server_with(limits).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(ask(&mut first, "/one").await.starts_with("HTTP/1.1 200"));
        assert!(ask(&mut second, "/two").await.starts_with("HTTP/1.1 200"));
        // A third from the same address is closed at once, unanswered.
        let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = third.write_all(b"GET /three HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer)).await;
        assert!(read.is_ok() && answer.is_empty(), "the third connection was served: {answer:?}");
        // Another address still gets in.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
        let mut other = socket.connect(addr).await.expect("connect");
        assert!(ask(&mut other, "/other").await.starts_with("HTTP/1.1 200"));
        // A closed connection frees its place.
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = again.write_all(b"GET /again HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
            let mut answer = Vec::new();
            let _ = again.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the closed connection's place never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((second, other));
        shut_down(stop, task).await;
    }
}
