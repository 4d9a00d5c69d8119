//! The TCP acceptor: poem's own, plus `TCP_NODELAY` on every connection.
//!
//! Range responses are small and latency-bound: with Nagle's algorithm on, the tail of a
//! response can wait for the client's delayed ACK (up to 40 ms on Linux). poem's
//! `TcpListener` leaves the socket option alone, so this acceptor sets it.

use std::io;
use std::net::SocketAddr;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::net::{TcpListener, TcpStream};

/// Accepts connections with `TCP_NODELAY` set.
#[derive(Debug)]
pub struct NoDelayAcceptor {
    listener: TcpListener,
    local: LocalAddr,
}

impl NoDelayAcceptor {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> io::Result<NoDelayAcceptor> {
        let listener = TcpListener::bind(addr).await?;
        let local = LocalAddr(listener.local_addr()?.into());
        Ok(NoDelayAcceptor { listener, local })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Acceptor for NoDelayAcceptor {
    type Io = TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        vec![self.local.clone()]
    }

    async fn accept(&mut self) -> io::Result<(TcpStream, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, peer) = self.listener.accept().await?;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        Ok((stream, self.local.clone(), RemoteAddr(peer.into()), Scheme::HTTP))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        use poem::listener::Acceptor;
        let mut acceptor = super::NoDelayAcceptor::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = acceptor.local_addr().expect("addr");
        let client = tokio::spawn(async move { tokio::net::TcpStream::connect(addr).await });
        let (stream, ..) = acceptor.accept().await.expect("accept");
        assert!(stream.nodelay().expect("nodelay"), "TCP_NODELAY must be set on accepted sockets");
        drop(client.await);
    }
}
