//! The relay's HTTP server: hyper's HTTP/1.1 connection, one task per connection,
//! `POST /heartbeat` answered straight by its handler and everything else by the axum router
//! (with the peer as `ConnectInfo<SocketAddr>`). Meta nodes use [`serve_router`]
//! (`axum::serve`).
//!
//! The heartbeat is the one request that comes a million times per interval: taking it before
//! the router (no route match, no extractor, no HTTP/1-or-2 sniffing as `axum::serve` does)
//! is part of what brings the relay close to a hello-world hyper server (docs/ops-bench.md).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// The future of a response.
pub type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Answers `POST /heartbeat` from its body.
pub type Heartbeat = Arc<dyn Fn(Body) -> Answer + Send + Sync>;

/// Where package downloads are served: a runtime of their own (`--cache-threads`), so a
/// download storm shares the CPU with the heartbeats instead of queueing them behind its
/// socket writes.
#[derive(Clone)]
pub struct Packages {
    pub runtime: tokio::runtime::Handle,
}

/// How a plain-HTTP connection that goes to [`Packages`] starts.
const PACKAGE_REQUESTS: [&[u8]; 2] = [b"GET /pkg/", b"HEAD /pkg/"];
/// Longest wait for a new connection's first bytes before it is served on the main runtime.
const PEEK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves on `listener` (HTTPS with `tls`, else plain HTTP) until `shutdown`, then lets the
/// requests in flight finish (connections close after their current request). With
/// `packages`, plain-HTTP connections whose first request is for `/pkg/` run there.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ServerConfig>>,
    app: Router,
    heartbeat: Option<Heartbeat>,
    packages: Option<Packages>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let shared = Shared { app, heartbeat, shutdown: shutdown.clone() };
    match tls {
        None => {
            let mut listener = listener;
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = Listener::accept(&mut listener) => accepted,
                };
                let (shared, packages, tracker) = (shared.clone(), packages.clone(), connections.clone());
                connections.spawn(async move {
                    match packages {
                        Some(p) if for_packages(&tcp).await => match tcp.into_std() {
                            Ok(std) => {
                                p.runtime.spawn(tracker.track_future(async move {
                                    match tokio::net::TcpStream::from_std(std) {
                                        Ok(tcp) => shared.connection(tcp, peer).await,
                                        Err(error) => tracing::debug!(%peer, %error, "cannot move a package connection"),
                                    }
                                }));
                            }
                            Err(error) => tracing::debug!(%peer, %error, "cannot move a package connection"),
                        },
                        _ => shared.connection(tcp, peer).await,
                    }
                });
            }
        }
        Some(config) => {
            let mut listener = crate::tls::TlsListener::new(listener, config)?;
            loop {
                let (io, peer) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let shared = shared.clone();
                let names = crate::tls::PeerNames::of(io.get_ref().1);
                connections.spawn(async move { shared.connection_as(io, peer, names).await });
            }
        }
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves `app` with `axum::serve` (HTTPS with `tls`), the peer as `ConnectInfo<SocketAddr>`,
/// until `shutdown`: what meta nodes use.
pub async fn serve_router(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ServerConfig>>,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shutdown2 = shutdown.clone();
    let stop = async move { shutdown.cancelled().await };
    match tls {
        None => axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(stop).await,
        // Over TLS the requests carry the client certificate's names (`tls::PeerNames`).
        Some(config) => serve(listener, Some(config), app, None, None, shutdown2).await,
    }
}

/// Whether a new connection's first request is for a package (peeked, not read).
async fn for_packages(tcp: &tokio::net::TcpStream) -> bool {
    let mut head = [0u8; 10];
    let peeked = async {
        loop {
            let n = tcp.peek(&mut head).await?;
            // Enough to tell, or all the client will send before it waits for an answer.
            if n >= head.len() || n == 0 || PACKAGE_REQUESTS.iter().all(|p| !p.starts_with(&head[..n])) {
                return Ok::<usize, std::io::Error>(n);
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    };
    match tokio::time::timeout(PEEK_TIMEOUT, peeked).await {
        Ok(Ok(n)) => PACKAGE_REQUESTS.iter().any(|p| head[..n].starts_with(p)),
        _ => false,
    }
}

#[derive(Clone)]
struct Shared {
    app: Router,
    heartbeat: Option<Heartbeat>,
    shutdown: CancellationToken,
}

impl Shared {
    /// One connection, until it closes or the server shuts down.
    async fn connection<I>(self, io: I, peer: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.connection_as(io, peer, crate::tls::PeerNames::default()).await
    }

    /// [`connection`](Self::connection) of a client that showed a certificate with `names`
    /// (given to the router's requests as an extension).
    async fn connection_as<I>(self, io: I, peer: SocketAddr, names: crate::tls::PeerNames)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Shared { app, heartbeat, shutdown } = self;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let answer: Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> = match &heartbeat {
                Some(h) if request.method() == Method::POST && request.uri().path() == "/heartbeat" => {
                    let answer = h(Body::new(request.into_body()));
                    Box::pin(async move { Ok(answer.await) })
                }
                _ => {
                    let mut request = request.map(Body::new);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request.extensions_mut().insert(names.clone());
                    let mut app = app.clone();
                    Box::pin(async move { app.call(request).await })
                }
            };
            answer
        });
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::trace!(%peer, %error, "connection ended");
                }
            }
            _ = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}
