//! RSocket over TCP frames each frame with a 3-byte length (RSocket spec, "Framing Format"). The
//! length allows 16 MiB; we refuse anything above [`crate::MAX_FRAME`] *before buffering it*: the
//! bytes are skipped as they arrive and the frame's stream gets an ERROR, so one oversized request
//! costs neither memory nor the connection.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use rsocket_rust::frame::Frame;
use rsocket_rust::utils::Writeable;
use tokio_util::codec::{Decoder, Encoder};

const LEN_BYTES: usize = 3;
const STREAM_ID_BYTES: usize = 4;

#[derive(Debug)]
pub enum Decoded {
    Frame(Frame),
    /// A frame longer than the limit; its bytes are being skipped.
    Oversized {
        stream_id: u32,
        len: usize,
    },
}

#[derive(Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// Bytes of an oversized frame still to skip.
    skipping: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            skipping: 0,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Decoded;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Decoded>> {
        if self.skipping > 0 {
            let n = self.skipping.min(buf.len());
            buf.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if buf.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        if len > self.max_frame {
            if buf.len() < LEN_BYTES + STREAM_ID_BYTES {
                return Ok(None);
            }
            let stream_id = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) & 0x7FFF_FFFF;
            buf.advance(LEN_BYTES);
            self.skipping = len;
            // Skip what is already here; the rest as it arrives.
            let n = self.skipping.min(buf.len());
            buf.advance(n);
            self.skipping -= n;
            return Ok(Some(Decoded::Oversized { stream_id, len }));
        }
        if buf.len() < LEN_BYTES + len {
            buf.reserve(LEN_BYTES + len - buf.len());
            return Ok(None);
        }
        buf.advance(LEN_BYTES);
        let mut frame_bytes = buf.split_to(len);
        decode_frame(&mut frame_bytes).map(|frame| Some(Decoded::Frame(frame)))
    }
}

/// rsocket_rust's `Frame::decode` panics on some malformed input (e.g. an unknown frame type hits
/// `unreachable!`). A peer must not be able to do that to us: known problems are checked first,
/// and anything else that panics is caught and becomes an ordinary decoding error.
fn decode_frame(bytes: &mut BytesMut) -> io::Result<Frame> {
    let malformed = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if bytes.len() < 6 {
        return Err(malformed(format!(
            "frame of {} bytes is shorter than its header",
            bytes.len()
        )));
    }
    let frame_type = u16::from_be_bytes([bytes[4], bytes[5]]) >> 10;
    if !(0x01..=0x0E).contains(&frame_type) {
        return Err(malformed(format!("unknown frame type {frame_type:#x}")));
    }
    let len = bytes.len();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Frame::decode(bytes))) {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(e)) => Err(malformed(format!(
            "malformed RSocket frame of {len} bytes: {e}"
        ))),
        Err(_) => Err(malformed(format!(
            "malformed RSocket frame of {len} bytes (the decoder gave up)"
        ))),
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, frame: Frame, buf: &mut BytesMut) -> io::Result<()> {
        let len = frame.len();
        if len > 0xFF_FFFF {
            // Fragmentation keeps frames far below this; a bigger one is a bug on our side.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {len} bytes cannot be length-prefixed in 3 bytes"),
            ));
        }
        buf.reserve(LEN_BYTES + len);
        buf.put_u8((len >> 16) as u8);
        buf.put_u8((len >> 8) as u8);
        buf.put_u8(len as u8);
        frame.write_to(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn encoded(frame: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new(usize::MAX).encode(frame, &mut buf).unwrap();
        buf
    }

    fn request(stream_id: u32, size: usize) -> Frame {
        rsocket_rust::frame::RequestResponse::builder(stream_id, 0)
            .set_data(Bytes::from(vec![7u8; size]))
            .build()
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = encoded(request(1, 10));
        let mut codec = FrameCodec::new(1024);
        match codec.decode(&mut buf).unwrap() {
            Some(Decoded::Frame(f)) => assert_eq!(f.get_stream_id(), 1),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_skipped_without_buffering_and_the_next_frame_decodes() {
        let big = encoded(request(5, 10_000));
        let small = encoded(request(7, 10));
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        // Feed the big frame in small pieces, as TCP would: the buffer never holds more than a
        // piece.
        let mut reported = None;
        for piece in big.chunks(500) {
            buf.extend_from_slice(piece);
            if let Some(d) = codec.decode(&mut buf).unwrap() {
                reported = Some(d);
            }
            assert!(buf.len() <= 500, "buffered {} bytes", buf.len());
        }
        assert!(matches!(
            reported,
            Some(Decoded::Oversized { stream_id: 5, .. })
        ));
        buf.extend_from_slice(&small);
        match codec.decode(&mut buf).unwrap() {
            Some(Decoded::Frame(f)) => assert_eq!(f.get_stream_id(), 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_malformed_frame_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 6, 0, 0, 0, 1, 0xFF, 0xFF][..]);
        assert!(FrameCodec::new(1024).decode(&mut buf).is_err());
    }
}
