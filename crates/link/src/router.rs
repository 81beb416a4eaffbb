//! Routing: the RSocket routing extension inside composite metadata, both ways, and the adapter
//! that turns rsocket_rust's untyped `RSocket` calls into calls on a [`Responder`] by route name.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use rsocket_rust::extension::{CompositeMetadata, MimeType, RoutingMetadata};
use rsocket_rust::prelude::{Flux, Payload, RSocket};
use rsocket_rust::utils::Writeable;

use crate::Refusal;
use crate::bounds::Bounds;

pub const MIME_COMPOSITE: &str = "message/x.rsocket.composite-metadata.v0";
pub const MIME_ROUTING: &str = "message/x.rsocket.routing.v0";

/// What one side serves. Implemented by the twin (car routes) and the agent (`twin.inspect`).
#[async_trait]
pub trait Responder: Send + Sync + 'static {
    async fn request_response(&self, route: &str, data: Bytes) -> Result<Bytes, Refusal>;

    /// Nothing goes back to the peer; errors are the responder's to log.
    async fn fire_and_forget(&self, route: &str, data: Bytes);

    /// A stream ends after its first error.
    fn request_stream(
        &self,
        route: &str,
        data: Bytes,
    ) -> BoxStream<'static, Result<Bytes, Refusal>>;
}

/// Composite metadata holding one routing tag.
pub fn route_metadata(route: &str) -> Bytes {
    let routing = RoutingMetadata::builder().push_str(route).build();
    let mut tag = BytesMut::new();
    routing.write_to(&mut tag);
    let composite = CompositeMetadata::builder()
        .push(MimeType::from(MIME_ROUTING), tag.freeze())
        .build();
    let mut out = BytesMut::new();
    composite.write_to(&mut out);
    out.freeze()
}

/// The route of a request. `metadata_mime` is what the peer declared in SETUP: composite metadata
/// (what we and Spring send) or bare routing metadata (what some clients send).
pub fn route_of(metadata_mime: &str, metadata: Option<&Bytes>) -> Result<String, Refusal> {
    let Some(metadata) = metadata else {
        return Err(Refusal::new(
            "request without metadata: put the route in composite metadata with the routing extension (message/x.rsocket.routing.v0)",
        ));
    };
    let mut bytes = BytesMut::from(&metadata[..]);
    let routing = if metadata_mime == MIME_ROUTING {
        bytes
    } else {
        let composite = CompositeMetadata::decode(&mut bytes)
            .map_err(|e| Refusal::new(format!("malformed composite metadata: {e}")))?;
        let entry = composite
            .iter()
            .find(|entry| entry.get_mime_type().as_str() == Some(MIME_ROUTING))
            .ok_or_else(|| {
                Refusal::new(
                    "no routing entry (message/x.rsocket.routing.v0) in the composite metadata",
                )
            })?;
        BytesMut::from(&entry.get_metadata()[..])
    };
    let mut routing = routing;
    let tags = RoutingMetadata::decode(&mut routing)
        .map_err(|e| Refusal::new(format!("malformed routing metadata: {e}")))?;
    tags.get_tags()
        .first()
        .cloned()
        .ok_or_else(|| Refusal::new("routing metadata names no route"))
}

/// rsocket_rust's view of a [`Responder`].
pub(crate) struct Router {
    pub responder: Arc<dyn Responder>,
    pub metadata_mime: String,
    pub max_payload: usize,
    pub peer_label: String,
    /// The connection's bounds: answers wait here for room in its outbound budget.
    pub bounds: Arc<Bounds>,
}

/// The connection ended while an answer waited for room in the outbound budget.
fn gone() -> Refusal {
    Refusal::new("the connection closed")
}

impl Router {
    fn open(&self, request: Payload) -> Result<(String, Bytes), Refusal> {
        let (data, metadata) = request.split();
        let route = route_of(&self.metadata_mime, metadata.as_ref())?;
        let data = data.unwrap_or_default();
        // The connection already refuses oversized frames; this also covers reassembled ones.
        if data.len() > self.max_payload {
            return Err(Refusal::new(format!(
                "{route}: payload of {} bytes exceeds the {}-byte limit",
                data.len(),
                self.max_payload
            )));
        }
        Ok((route, data))
    }
}

fn reply(data: Bytes) -> Payload {
    Payload::builder().set_data(data).build()
}

#[async_trait]
impl RSocket for Router {
    async fn metadata_push(&self, _req: Payload) -> rsocket_rust::Result<()> {
        // Not part of the protocol (rsocket_rust sends it on a non-zero stream id, which other
        // implementations reject); ignore rather than fail the connection.
        Ok(())
    }

    async fn fire_and_forget(&self, req: Payload) -> rsocket_rust::Result<()> {
        match self.open(req) {
            Ok((route, data)) => self.responder.fire_and_forget(&route, data).await,
            Err(refusal) => {
                tracing::warn!(peer = %self.peer_label, "dropped a fire-and-forget request: {refusal}")
            }
        }
        // The reader took a permit before it passed this request on.
        self.bounds.fire_and_forget_done();
        Ok(())
    }

    async fn request_response(&self, req: Payload) -> rsocket_rust::Result<Option<Payload>> {
        let (route, data) = self.open(req).map_err(anyhow_refusal)?;
        match self.responder.request_response(&route, data).await {
            Ok(answer) => {
                if !self
                    .bounds
                    .outbound
                    .reserve(answer.len(), &self.bounds.close)
                    .await
                {
                    return Err(anyhow_refusal(gone()));
                }
                Ok(Some(reply(answer)))
            }
            Err(refusal) => Err(anyhow_refusal(refusal)),
        }
    }

    fn request_stream(&self, req: Payload) -> Flux<rsocket_rust::Result<Payload>> {
        match self.open(req) {
            Ok((route, data)) => {
                let mut inner = self.responder.request_stream(&route, data);
                let bounds = self.bounds.clone();
                // rsocket_rust polls a stream as fast as it yields and queues every item
                // unbounded; each item waits for room in the outbound budget instead. It also
                // keeps polling after an error item, sending one ERROR per item: stop at the
                // first. (The COMPLETE it sends after the ERROR is dropped by the writer.)
                let stream = async_stream::stream! {
                    while let Some(item) = inner.next().await {
                        match item {
                            Ok(bytes) => {
                                if !bounds.outbound.reserve(bytes.len(), &bounds.close).await {
                                    yield Err(anyhow_refusal(gone()));
                                    break;
                                }
                                yield Ok(reply(bytes));
                            }
                            Err(refusal) => {
                                yield Err(anyhow_refusal(refusal));
                                break;
                            }
                        }
                    }
                };
                Box::pin(stream)
            }
            Err(refusal) => Box::pin(futures::stream::once(futures::future::ready(Err(
                anyhow_refusal(refusal),
            )))),
        }
    }

    fn request_channel(
        &self,
        _reqs: Flux<rsocket_rust::Result<Payload>>,
    ) -> Flux<rsocket_rust::Result<Payload>> {
        Box::pin(futures::stream::once(futures::future::ready(Err(
            anyhow_refusal(Refusal::new(
                "request-channel is not part of the cardeploy protocol",
            )),
        ))))
    }
}

fn anyhow_refusal(refusal: Refusal) -> anyhow::Error {
    anyhow::Error::new(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_survives_composite_metadata() {
        let metadata = route_metadata("car.hello");
        assert_eq!(
            route_of(MIME_COMPOSITE, Some(&metadata)).unwrap(),
            "car.hello"
        );
    }

    #[test]
    fn bare_routing_metadata_is_understood() {
        let routing = RoutingMetadata::builder().push_str("car.report").build();
        let mut bytes = BytesMut::new();
        routing.write_to(&mut bytes);
        assert_eq!(
            route_of(MIME_ROUTING, Some(&bytes.freeze())).unwrap(),
            "car.report"
        );
    }

    #[test]
    fn garbage_metadata_is_a_refusal_not_a_panic() {
        for garbage in [
            &b""[..],
            b"\x05ab",
            b"\xfe\xff\xff\xff",
            b"\x7e\x00\x00\x09abc",
        ] {
            let bytes = Bytes::copy_from_slice(garbage);
            assert!(
                route_of(MIME_COMPOSITE, Some(&bytes)).is_err(),
                "{garbage:?}"
            );
        }
        assert!(route_of(MIME_COMPOSITE, None).is_err());
    }
}
