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
//! - **Slow clients.** hyper's HTTP/1 header-read timeout (30 s) needs a timer, which poem does
//!   not give it: without one, a client sending a header a byte a minute holds its connection
//!   forever (slowloris).
//!
//! Everything else is as poem does it: each request becomes a `poem::Request` (upgrades
//! included) for the same endpoint, and on shutdown the listener closes, open connections
//! finish their requests (keep-alive connections are told to close), and whatever is still
//! open after the grace period is dropped.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
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
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound listener, ready to [`serve`](Listener::serve).
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
        Ok(Listener { listener: TcpListener::bind(addr).await? })
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
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        let graceful = GracefulShutdown::new();
        loop {
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
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (endpoint, local, remote) = (endpoint.clone(), local.clone(), remote.clone());
                async move {
                    let req = poem::Request::from((req, local, remote, Scheme::HTTP));
                    let response: hyper::Response<BoxBody<Bytes, io::Error>> = endpoint.get_response(req).await.into();
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
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
        let listener = super::Listener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
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
}
