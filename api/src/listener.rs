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
//!   rather than each costing the process a task and buffers.
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
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

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
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: u32,
    pub first_request_within: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits { max_connections: 10_000, first_request_within: HEADER_READ_TIMEOUT }
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
        Listener { listener, limits, open: Arc::new(Semaphore::new(limits.max_connections as usize)) }
    }

    /// Sets the limits (the defaults are [`ConnectionLimits::default`]).
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Listener {
        self.open = Arc::new(Semaphore::new(limits.max_connections.max(1) as usize));
        self.limits = limits;
        self
    }

    /// How many more connections would be served now.
    pub fn available(&self) -> usize {
        self.open.available_permits()
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
        let first_request_within = self.limits.first_request_within;
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
            set_nodelay(&stream);
            let (endpoint, local, remote) = (endpoint.clone(), local.clone(), RemoteAddr(peer.into()));
            let first_request = Arc::new(Notify::new());
            let service = hyper::service::service_fn({
                let first_request = first_request.clone();
                move |req: hyper::Request<Incoming>| {
                    first_request.notify_one();
                    let (endpoint, local, remote) = (endpoint.clone(), local.clone(), remote.clone());
                    async move {
                        let req = poem::Request::from((req, local, remote, Scheme::HTTP));
                        let response: hyper::Response<BoxBody<Bytes, io::Error>> =
                            endpoint.get_response(req).await.into();
                        Ok::<_, Infallible>(response)
                    }
                }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _permit = permit;
                let mut connection = std::pin::pin!(connection);
                // A connection that brings no request in time is dropped, whatever its protocol.
                let result = tokio::select! {
                    result = connection.as_mut() => Some(result),
                    () = first_request.notified() => None,
                    () = tokio::time::sleep(first_request_within) => {
                        metrics::counter!("waveline_http_connections_timed_out_total").increment(1);
                        return;
                    }
                };
                let result = match result {
                    Some(result) => result,
                    None => connection.await,
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
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("join");
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
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("join");
    }
}
