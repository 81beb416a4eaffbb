//! RSocket fragmentation, both ways: a payload we send cut into frames of at most the MTU
//! (metadata first, FOLLOW on every frame but the last, continuations as PAYLOAD), and a payload
//! the peer sends joined from its fragments. The guard (`guard.rs`) has already bounded how many
//! fragmented payloads a peer may have in flight and how large each may grow.

use bytes::{Bytes, BytesMut};
use rsocket_rust::frame::{self, Frame};

/// How a payload we send starts: a request of one of the three kinds we make, or an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    Response,
    Stream,
    FireAndForget,
    Answer { complete: bool },
}

/// One payload as frames of at most `mtu` bytes of metadata and data each (RSocket
/// fragmentation: metadata first, every frame but the last with FOLLOW, continuations as PAYLOAD).
pub(crate) fn frames(
    id: u32,
    opening: Opening,
    metadata: Option<Bytes>,
    mut data: Bytes,
    mtu: usize,
) -> Vec<Frame> {
    let mtu = mtu.max(64);
    let mut metadata = metadata.filter(|m| !m.is_empty());
    let mut out = Vec::with_capacity(1 + data.len() / mtu);
    loop {
        let mut room = mtu;
        let m = metadata.as_mut().map(|m| {
            let n = m.len().min(room);
            room -= n;
            m.split_to(n)
        });
        if metadata.as_ref().is_some_and(Bytes::is_empty) {
            metadata = None;
        }
        let d = data.split_to(data.len().min(room));
        let last = data.is_empty() && metadata.is_none();
        let follow = if last { 0 } else { Frame::FLAG_FOLLOW };
        let all = (Some(d), m);
        let frame = match (opening, out.is_empty()) {
            (Opening::Response, true) => frame::RequestResponse::builder(id, follow)
                .set_all(all)
                .build(),
            (Opening::Stream, true) => frame::RequestStream::builder(id, follow)
                .set_initial_request_n(frame::REQUEST_MAX)
                .set_all(all)
                .build(),
            (Opening::FireAndForget, true) => {
                frame::RequestFNF::builder(id, follow).set_all(all).build()
            }
            (Opening::Answer { complete }, _) => {
                let end = if last && complete {
                    Frame::FLAG_COMPLETE
                } else {
                    0
                };
                frame::Payload::builder(id, Frame::FLAG_NEXT | follow | end)
                    .set_all(all)
                    .build()
            }
            (_, false) => frame::Payload::builder(id, follow).set_all(all).build(),
        };
        out.push(frame);
        if last {
            return out;
        }
    }
}

/// A payload arriving in fragments.
pub(crate) struct Join {
    pub opening: Opening,
    pub metadata: Option<BytesMut>,
    pub data: BytesMut,
    pub flags: u16,
}

impl Join {
    pub fn start(opening: Opening, parts: (Option<Bytes>, Option<Bytes>), flags: u16) -> Self {
        let mut join = Self {
            opening,
            metadata: None,
            data: BytesMut::new(),
            flags: 0,
        };
        join.push(parts, flags);
        join
    }

    pub fn push(&mut self, (data, metadata): (Option<Bytes>, Option<Bytes>), flags: u16) {
        if let Some(m) = metadata {
            self.metadata
                .get_or_insert_with(BytesMut::new)
                .extend_from_slice(&m);
        }
        if let Some(d) = data {
            self.data.extend_from_slice(&d);
        }
        self.flags |= flags & (Frame::FLAG_NEXT | Frame::FLAG_COMPLETE);
    }
}

#[cfg(test)]
mod tests {
    use rsocket_rust::frame::Body;

    use super::*;

    fn parts(frame: &Frame) -> (usize, usize, u16) {
        let (m, d) = match frame.get_body_ref() {
            Body::RequestResponse(r) => (r.get_metadata(), r.get_data()),
            Body::RequestStream(r) => (r.get_metadata(), r.get_data()),
            Body::Payload(p) => (p.get_metadata(), p.get_data()),
            other => panic!("{other:?}"),
        };
        (
            m.map_or(0, Bytes::len),
            d.map_or(0, Bytes::len),
            frame.get_flag(),
        )
    }

    #[test]
    fn a_small_request_is_one_frame() {
        let out = frames(
            1,
            Opening::Response,
            Some(Bytes::from_static(b"route")),
            Bytes::from_static(b"data"),
            1024,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(parts(&out[0]).0, 5);
        assert_eq!(parts(&out[0]).1, 4);
        assert_eq!(out[0].get_flag() & Frame::FLAG_FOLLOW, 0);
    }

    #[test]
    fn fragments_carry_metadata_first_and_follow_on_all_but_the_last() {
        let metadata = Bytes::from(vec![1u8; 100]);
        let data = Bytes::from(vec![2u8; 250]);
        let out = frames(3, Opening::Stream, Some(metadata), data, 64);
        // 350 bytes at 64 a frame.
        assert_eq!(out.len(), 6);
        assert!(matches!(out[0].get_body_ref(), Body::RequestStream(_)));
        let mut seen_data = false;
        let (mut m_total, mut d_total) = (0, 0);
        for (i, frame) in out.iter().enumerate() {
            let (m, d, flags) = parts(frame);
            assert!(m + d <= 64);
            assert!(!(seen_data && m > 0), "metadata after data in frame {i}");
            seen_data |= d > 0;
            m_total += m;
            d_total += d;
            let last = i == out.len() - 1;
            assert_eq!(flags & Frame::FLAG_FOLLOW == 0, last, "frame {i}");
            if i > 0 {
                assert!(matches!(frame.get_body_ref(), Body::Payload(_)));
            }
        }
        assert_eq!((m_total, d_total), (100, 250));
    }

    #[test]
    fn an_answer_completes_only_on_its_last_fragment() {
        let out = frames(
            2,
            Opening::Answer { complete: true },
            None,
            Bytes::from(vec![0u8; 200]),
            64,
        );
        assert_eq!(out.len(), 4);
        for (i, frame) in out.iter().enumerate() {
            let flags = frame.get_flag();
            assert_ne!(flags & Frame::FLAG_NEXT, 0);
            assert_eq!(flags & Frame::FLAG_COMPLETE != 0, i == 3);
        }
        // An empty answer is still one frame with NEXT.
        let empty = frames(
            2,
            Opening::Answer { complete: true },
            None,
            Bytes::new(),
            64,
        );
        assert_eq!(empty.len(), 1);
        assert_eq!(
            empty[0].get_flag() & (Frame::FLAG_NEXT | Frame::FLAG_COMPLETE),
            Frame::FLAG_NEXT | Frame::FLAG_COMPLETE
        );
    }
}
