//! The relay's HTTP server: hyper's HTTP/1.1 connection, one task per connection,
//! `POST /heartbeat` answered straight by its handler and everything else by the axum router
//! (with the peer as `ConnectInfo<SocketAddr>`). Meta nodes use [`serve_router`]
//! (`axum::serve`).
//!
//! The heartbeat is the one request that comes a million times per interval: taking it before
//! the router (no route match, no extractor, no HTTP/1-or-2 sniffing as `axum::serve` does)
//! is part of what brings the relay close to a hello-world hyper server (docs/ops-bench.md).
//!
//! Every listener is bounded ([`ConnLimits`]): at most `max_connections` open at once (TLS
//! handshakes included; past it a new connection is closed at once and counted), a request's
//! headers within `header_timeout`, its body within `body_timeout` of the headers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use axum::response::Response;
use axum::serve::Listener;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// The future of a response.
pub type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Answers `POST /heartbeat` from its host credential header (if any) and its body.
pub type Heartbeat = Arc<dyn Fn(Option<axum::http::HeaderValue>, Body) -> Answer + Send + Sync>;

/// Where package downloads are served: a runtime of their own (`--cache-threads`), so a
/// download storm shares the CPU with the heartbeats instead of queueing them behind its
/// socket writes.
#[derive(Clone)]
pub struct Packages {
    pub runtime: tokio::runtime::Handle,
}

/// How a plain-HTTP connection that goes to [`Packages`] starts.
const PACKAGE_REQUESTS: [&[u8]; 2] = [b"GET /pkg/", b"HEAD /pkg/"];

/// What one listener allows each client (`--max-connections`, `--header-timeout-ms`,
/// `--body-timeout-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, TLS handshakes included.
    pub max_connections: usize,
    /// A request's headers must be in within this of its first byte (of the connection's
    /// start for the first request).
    pub header_timeout: Duration,
    /// A request's body must be in within this of its headers.
    pub body_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits { max_connections: 10_000, header_timeout: Duration::from_secs(10), body_timeout: Duration::from_secs(30) }
    }
}

/// The connection cap of one listener: one permit per open connection.
#[derive(Clone)]
pub struct Gate {
    permits: Arc<tokio::sync::Semaphore>,
    refused: ::metrics::Counter,
    /// Unix second of the last "refused" log line (one a second at most).
    logged: Arc<AtomicU32>,
    max: usize,
}

impl Gate {
    /// A gate of `max` connections, refusals counted in `ops_{component}_connections_refused_total`.
    pub fn new(max: usize, component: &'static str) -> Self {
        Gate {
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            refused: ::metrics::counter!(format!("ops_{component}_connections_refused_total")),
            logged: Arc::new(AtomicU32::new(0)),
            max,
        }
    }

    /// Describes the gate's metric (once per process).
    pub fn describe(component: &'static str) {
        ::metrics::describe_counter!(
            format!("ops_{component}_connections_refused_total"),
            ::metrics::Unit::Count,
            "Connections closed at accept because --max-connections were open (TLS handshakes included)."
        );
    }

    /// A permit for a new connection from `peer`; None (counted, logged once a second at
    /// most) when `max_connections` are open: the caller drops the connection.
    pub fn admit(&self, peer: SocketAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.refused.increment(1);
                let now = ops_config::clock::unix_now_u32();
                if self.logged.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(%peer, max = self.max, "connection refused: --max-connections open");
                }
                None
            }
        }
    }
}

/// Serves on `listener` (HTTPS with `tls`, else plain HTTP) until `shutdown`, then lets the
/// requests in flight finish (connections close after their current request). With
/// `packages`, plain-HTTP connections whose first request is for `/pkg/` run there.
/// `component` names the metrics (`ops_{component}_...`).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ServerConfig>>,
    app: Router,
    heartbeat: Option<Heartbeat>,
    packages: Option<Packages>,
    limits: ConnLimits,
    component: &'static str,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let gate = Gate::new(limits.max_connections, component);
    let shared = Shared { app, heartbeat, shutdown: shutdown.clone(), limits };
    match tls {
        None => {
            let mut listener = listener;
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = Listener::accept(&mut listener) => accepted,
                };
                let Some(permit) = gate.admit(peer) else { continue };
                let (shared, packages, tracker) = (shared.clone(), packages.clone(), connections.clone());
                connections.spawn(async move {
                    match packages {
                        Some(p) if for_packages(&tcp, limits.header_timeout).await => match tcp.into_std() {
                            Ok(std) => {
                                p.runtime.spawn(tracker.track_future(async move {
                                    match tokio::net::TcpStream::from_std(std) {
                                        Ok(tcp) => shared.connection(tcp, peer).await,
                                        Err(error) => tracing::debug!(%peer, %error, "cannot move a package connection"),
                                    }
                                    drop(permit);
                                }));
                            }
                            Err(error) => tracing::debug!(%peer, %error, "cannot move a package connection"),
                        },
                        _ => {
                            shared.connection(tcp, peer).await;
                            drop(permit);
                        }
                    }
                });
            }
        }
        Some(config) => {
            let mut listener = crate::tls::TlsListener::new(listener, config, gate)?;
            loop {
                let (io, peer, permit) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let shared = shared.clone();
                let names = crate::tls::PeerNames::of(io.get_ref().1);
                connections.spawn(async move {
                    shared.connection_as(io, peer, names).await;
                    drop(permit);
                });
            }
        }
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves `app` (HTTPS with `tls`), the peer as `ConnectInfo<SocketAddr>`, until `shutdown`:
/// what meta nodes use.
pub async fn serve_router(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ServerConfig>>,
    app: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Over TLS the requests carry the client certificate's names (`tls::PeerNames`).
    serve(listener, tls, app, None, None, limits, "meta", shutdown).await
}

/// A request body that must be in by a deadline: past it, the next read is an error (the
/// handler refuses the request and the connection closes). The timer is set only when a read
/// has to wait, so a body that came with its headers costs none.
struct Deadline {
    inner: Incoming,
    by: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let by = this.by;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(by)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err("request body not received within --body-timeout-ms".into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a new connection's first request is for a package (peeked, not read; at most
/// `wait` for its first bytes).
async fn for_packages(tcp: &tokio::net::TcpStream, wait: Duration) -> bool {
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
    match tokio::time::timeout(wait, peeked).await {
        Ok(Ok(n)) => PACKAGE_REQUESTS.iter().any(|p| head[..n].starts_with(p)),
        _ => false,
    }
}

#[derive(Clone)]
struct Shared {
    app: Router,
    heartbeat: Option<Heartbeat>,
    shutdown: CancellationToken,
    limits: ConnLimits,
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
        let Shared { app, heartbeat, shutdown, limits } = self;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let by = tokio::time::Instant::now() + limits.body_timeout;
            let request = request.map(|inner| Deadline { inner, by, timer: None });
            let answer: Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> = match &heartbeat {
                Some(h) if request.method() == Method::POST && request.uri().path() == "/heartbeat" => {
                    let credential = crate::enrollment::Enrollment::credential_of(request.headers());
                    let answer = h(credential, Body::new(request.into_body()));
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
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(io), service);
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
