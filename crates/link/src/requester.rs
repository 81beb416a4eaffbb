//! Requests with guarantees: every request has a deadline, a closed connection fails pending
//! requests at once instead of leaving them hanging, payloads are bounded before they are sent,
//! and data streams are read in bounded windows.

use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::conn::{CloseOnDrop, CloseSignal};
use crate::router::route_metadata;
use crate::socket::{Failure, Socket};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

/// A cheap, cloneable handle for requests on one connection, in either direction.
#[derive(Clone)]
pub struct Requester {
    pub(crate) socket: Arc<Socket>,
    pub(crate) close: CloseSignal,
    pub(crate) deadline: Duration,
    pub(crate) max_payload: usize,
    /// On the car: the connection ends when its last requester is dropped (nothing could use it
    /// any more). The twin's connections end with the car or the twin's shutdown.
    pub(crate) _owner: Option<Arc<CloseOnDrop>>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("closed", &self.close.is_closed())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Bounds of one window of a request-stream.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub max_items: usize,
    pub max_bytes: usize,
}

impl Requester {
    /// The route's metadata, once the payload is known to fit.
    fn metadata(&self, route: &str, data: &Bytes) -> Result<Bytes, Error> {
        if data.len() > self.max_payload {
            return Err(Error::PayloadTooLarge {
                route: route.to_owned(),
                size: data.len(),
                limit: self.max_payload,
            });
        }
        Ok(route_metadata(route))
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_closed()
    }

    /// Resolves when the connection is over.
    pub async fn closed(&self) {
        self.close.closed().await
    }

    /// End the connection (e.g. after a missed heartbeat); pending requests fail with `Closed`.
    pub fn close(&self) {
        self.close.close()
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    pub async fn request_response(&self, route: &str, data: Bytes) -> Result<Bytes, Error> {
        self.request_response_within(route, data, self.deadline)
            .await
    }

    pub async fn request_response_within(
        &self,
        route: &str,
        data: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, Error> {
        let metadata = self.metadata(route, &data)?;
        if self.is_closed() {
            return Err(self.gone(route));
        }
        let answer = tokio::select! {
            answer = tokio::time::timeout(deadline, self.socket.request_response(metadata, data)) => answer,
            () = self.close.closed() => return Err(self.gone(route)),
        };
        match answer {
            Err(_) => Err(Error::Deadline {
                route: route.to_owned(),
                deadline,
            }),
            Ok(Err(failure)) => Err(self.failed(route, failure)),
            Ok(Ok(Some(data))) => Ok(data),
            Ok(Ok(None)) => Err(Error::EmptyAnswer {
                route: route.to_owned(),
            }),
        }
    }

    pub async fn fire_and_forget(&self, route: &str, data: Bytes) -> Result<(), Error> {
        let metadata = self.metadata(route, &data)?;
        if self.is_closed() {
            return Err(self.gone(route));
        }
        self.socket
            .fire_and_forget(metadata, data)
            .await
            .map_err(|failure| self.failed(route, failure))
    }

    /// A long-lived stream (e.g. `car.desired`). It ends with `Err(Closed)` when the connection
    /// does, so a consumer never waits on a dead connection. Items are small control messages;
    /// bulk data goes through [`Requester::request_window`].
    pub fn request_stream(
        &self,
        route: &str,
        data: Bytes,
    ) -> BoxStream<'static, Result<Bytes, Error>> {
        let metadata = match self.metadata(route, &data) {
            Ok(metadata) => metadata,
            Err(e) => return futures::stream::once(async move { Err(e) }).boxed(),
        };
        let inner = self.socket.request_stream(metadata, data);
        let this = self.clone();
        let route = route.to_owned();
        async_stream::stream! {
            let mut inner = std::pin::pin!(inner);
            loop {
                tokio::select! {
                    item = inner.next() => match item {
                        Some(Ok(data)) => yield Ok(data),
                        Some(Err(failure)) => { yield Err(this.failed(&route, failure)); break; }
                        None => break,
                    },
                    () = this.close.closed() => { yield Err(this.gone(&route)); break; }
                }
            }
        }
        .boxed()
    }

    /// One bounded window of a request-stream: at most `window.max_items` items and
    /// `window.max_bytes` bytes, all within the deadline. The protocol uses no REQUEST_N, so the
    /// responder must itself send no more than the window the request names; a responder that
    /// sends more is cut off with `WindowOverflow` (and cancelled), so our memory stays bounded
    /// either way.
    pub async fn request_window(
        &self,
        route: &str,
        data: Bytes,
        window: Window,
    ) -> Result<Vec<Bytes>, Error> {
        self.request_window_within(route, data, window, self.deadline)
            .await
    }

    /// [`Requester::request_window`] with its own deadline (bulk data on a slow link needs
    /// longer than a control request).
    pub async fn request_window_within(
        &self,
        route: &str,
        data: Bytes,
        window: Window,
        deadline: Duration,
    ) -> Result<Vec<Bytes>, Error> {
        let mut stream = self.request_stream(route, data);
        let collect = async {
            let mut items = Vec::new();
            let mut bytes = 0usize;
            while let Some(item) = stream.next().await {
                let item = item?;
                bytes += item.len();
                if items.len() == window.max_items {
                    return Err(Error::WindowOverflow {
                        route: route.to_owned(),
                        limit: window.max_items,
                        what: "items",
                    });
                }
                if bytes > window.max_bytes {
                    return Err(Error::WindowOverflow {
                        route: route.to_owned(),
                        limit: window.max_bytes,
                        what: "bytes",
                    });
                }
                items.push(item);
            }
            Ok(items)
        };
        match tokio::time::timeout(deadline, collect).await {
            Ok(result) => result,
            Err(_) => Err(Error::Deadline {
                route: route.to_owned(),
                deadline,
            }),
        }
    }
}

impl Requester {
    /// The connection is over: say why when the peer told us (e.g. a refused SETUP).
    fn gone(&self, route: &str) -> Error {
        match self.socket.ended() {
            Some(message) => Error::Remote {
                route: route.to_owned(),
                message,
            },
            None => Error::Closed {
                route: route.to_owned(),
            },
        }
    }

    fn failed(&self, route: &str, failure: Failure) -> Error {
        match failure {
            Failure::Remote(message) => Error::Remote {
                route: route.to_owned(),
                message,
            },
            Failure::Closed => self.gone(route),
        }
    }
}
