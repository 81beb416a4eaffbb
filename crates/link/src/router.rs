//! Routing: the RSocket routing extension inside composite metadata, both ways, and the
//! [`Responder`] that serves requests by route name.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use rsocket_rust::extension::{CompositeMetadata, MimeType, RoutingMetadata};
use rsocket_rust::utils::Writeable;

use crate::Refusal;

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
