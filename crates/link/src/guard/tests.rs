use std::time::{Duration, Instant};

use bytes::Bytes;
use rsocket_rust::frame::{self, Frame};

use super::{Inbound, Streams};

const MAX_FRAGMENTED: usize = 4096;

/// The twin's view: peers (cars) open odd streams and must start with SETUP.
fn twin() -> Streams {
    let mut s = Streams::new(false, true, 8, MAX_FRAGMENTED);
    assert_eq!(s.inbound(&setup(), Instant::now()), Inbound::PASS);
    s
}

/// The car's view: it opens odd streams itself.
fn car() -> Streams {
    Streams::new(true, false, 8, MAX_FRAGMENTED)
}

fn setup() -> Frame {
    frame::Setup::builder(0, 0).build()
}

fn rr(id: u32) -> Frame {
    frame::RequestResponse::builder(id, 0)
        .set_data(Bytes::from_static(b"{}"))
        .build()
}

fn rs(id: u32) -> Frame {
    frame::RequestStream::builder(id, 0)
        .set_data(Bytes::from_static(b"{}"))
        .build()
}

fn fnf(id: u32, flag: u16) -> Frame {
    frame::RequestFNF::builder(id, flag)
        .set_data(Bytes::from_static(b"{}"))
        .build()
}

fn payload(id: u32, flag: u16, size: usize) -> Frame {
    frame::Payload::builder(id, flag)
        .set_data(Bytes::from(vec![0u8; size]))
        .build()
}

fn error(id: u32) -> Frame {
    frame::Error::builder(id, 0)
        .set_code(0x201)
        .set_data(Bytes::from_static(b"no"))
        .build()
}

fn cancel(id: u32) -> Frame {
    frame::Cancel::builder(id, 0).build()
}

fn malformed(verdict: &Inbound) -> bool {
    matches!(verdict, Inbound::Malformed(_))
}

fn rejected(verdict: &Inbound) -> bool {
    matches!(verdict, Inbound::Reject { .. })
}

const NEXT: u16 = Frame::FLAG_NEXT;
const COMPLETE: u16 = Frame::FLAG_COMPLETE;
const FOLLOW: u16 = Frame::FLAG_FOLLOW;

#[test]
fn a_connection_must_start_with_one_setup() {
    let now = Instant::now();
    let mut fresh = Streams::new(false, true, 8, MAX_FRAGMENTED);
    assert!(malformed(&fresh.inbound(&rr(1), now)));
    let mut s = Streams::new(false, true, 8, MAX_FRAGMENTED);
    assert_eq!(s.inbound(&setup(), now), Inbound::PASS);
    assert!(malformed(&s.inbound(&setup(), now)));
    assert!(malformed(&car().inbound(&setup(), now)));
}

#[test]
fn the_ninth_concurrent_stream_is_rejected_and_a_slot_frees_when_an_answer_completes() {
    let now = Instant::now();
    let mut s = twin();
    for i in 0..8u32 {
        assert_eq!(s.inbound(&rs(2 * i + 1), now), Inbound::PASS);
    }
    assert_eq!(s.open_theirs(), 8);
    let ninth = s.inbound(&rr(17), now);
    assert!(rejected(&ninth), "{ninth:?}");
    // The refusal itself is sent although stream 17 is not open.
    assert!(s.outbound(&error(17)));
    assert!(!s.outbound(&error(17)), "one refusal per stream");
    // An item of stream 1 is sent and keeps it open; its COMPLETE frees the slot.
    assert!(s.outbound(&payload(1, NEXT, 10)));
    assert_eq!(s.open_theirs(), 8);
    assert!(s.outbound(&payload(1, COMPLETE, 0)));
    assert_eq!(s.open_theirs(), 7);
    assert_eq!(s.inbound(&rr(19), now), Inbound::PASS);
}

#[test]
fn fire_and_forget_does_not_hold_a_stream() {
    let now = Instant::now();
    let mut s = twin();
    for i in 0..8u32 {
        assert_eq!(s.inbound(&rs(2 * i + 1), now), Inbound::PASS);
    }
    assert_eq!(
        s.inbound(&fnf(17, 0), now),
        Inbound::Pass {
            completes_fnf: true
        }
    );
    // A fragmented one completes with its last fragment.
    assert_eq!(s.inbound(&fnf(19, FOLLOW), now), Inbound::PASS);
    assert_eq!(
        s.inbound(&payload(19, 0, 10), now),
        Inbound::Pass {
            completes_fnf: true
        }
    );
}

#[test]
fn a_payload_or_error_on_a_request_the_peer_opened_is_malformed() {
    // rsocket_rust reaches unreachable!() for both.
    let now = Instant::now();
    let mut s = twin();
    assert_eq!(s.inbound(&rr(1), now), Inbound::PASS);
    assert!(malformed(&s.inbound(&payload(1, NEXT, 1), now)));
    let mut s = twin();
    assert_eq!(s.inbound(&rr(1), now), Inbound::PASS);
    assert!(malformed(&s.inbound(&error(1), now)));
}

#[test]
fn stream_ids_must_be_the_peers_and_not_in_use() {
    let now = Instant::now();
    let mut s = twin();
    assert!(
        malformed(&s.inbound(&rr(2), now)),
        "even ids are the twin's"
    );
    let mut s = twin();
    assert!(malformed(&s.inbound(&rr(0), now)));
    // Out of order is how rsocket_rust sends them (each from a task of its own).
    let mut s = twin();
    assert_eq!(s.inbound(&rr(5), now), Inbound::PASS);
    assert_eq!(s.inbound(&rr(3), now), Inbound::PASS);
    let mut s = twin();
    assert_eq!(s.inbound(&rr(5), now), Inbound::PASS);
    assert!(malformed(&s.inbound(&rr(5), now)), "an open id reused");
    let mut s = twin();
    assert!(malformed(&s.inbound(&payload(9, NEXT, 1), now)));
    assert!(malformed(&twin().inbound(&payload(0, NEXT, 1), now)));
    assert!(malformed(&twin().inbound(&cancel(0), now)));
}

#[test]
fn the_twins_first_request_travels_on_stream_0_as_rsocket_rust_numbers_it() {
    let now = Instant::now();
    let mut c = car();
    assert_eq!(c.inbound(&rr(0), now), Inbound::PASS);
    assert!(c.outbound(&payload(0, NEXT | COMPLETE, 10)));
    assert_eq!(c.open_theirs(), 0);
    assert_eq!(c.inbound(&rr(2), now), Inbound::PASS);
    assert_eq!(c.inbound(&rr(4), now), Inbound::PASS);
    assert!(malformed(&c.inbound(&rr(4), now)), "4 is still open");
    let mut t = twin();
    assert!(t.outbound(&rr(0)));
    assert_eq!(
        t.inbound(&payload(0, NEXT | COMPLETE, 10), now),
        Inbound::PASS
    );
    assert_eq!(
        t.inbound(&payload(0, NEXT | COMPLETE, 10), now),
        Inbound::Drop
    );
}

#[test]
fn late_frames_for_ended_streams_are_dropped_not_fatal() {
    let now = Instant::now();
    let mut s = twin();
    assert_eq!(s.inbound(&rs(1), now), Inbound::PASS);
    assert!(s.outbound(&payload(1, COMPLETE, 0)));
    // The car cancels a stream that just completed: a race, not an attack.
    assert_eq!(s.inbound(&cancel(1), now), Inbound::Drop);
    // rsocket_rust sends a COMPLETE after an ERROR: only the first terminal frame goes out.
    assert_eq!(s.inbound(&rs(3), now), Inbound::PASS);
    assert!(s.outbound(&error(3)));
    assert!(!s.outbound(&payload(3, COMPLETE, 0)));
}

#[test]
fn a_cancelled_stream_frees_its_slot_and_gets_nothing_more() {
    let now = Instant::now();
    let mut s = twin();
    assert_eq!(s.inbound(&rs(1), now), Inbound::PASS);
    assert_eq!(s.inbound(&cancel(1), now), Inbound::PASS);
    assert_eq!(s.open_theirs(), 0);
    assert!(!s.outbound(&payload(1, NEXT, 10)));
}

#[test]
fn a_cancelled_request_response_still_gets_its_answer() {
    let now = Instant::now();
    let mut s = twin();
    assert_eq!(s.inbound(&rr(1), now), Inbound::PASS);
    assert_eq!(s.inbound(&cancel(1), now), Inbound::Drop);
    assert_eq!(
        s.open_theirs(),
        1,
        "the work goes on, so the slot stays taken"
    );
    assert!(s.outbound(&payload(1, NEXT | COMPLETE, 10)));
    assert_eq!(s.open_theirs(), 0);
}

#[test]
fn answers_to_our_requests_pass_until_their_terminal_frame() {
    let now = Instant::now();
    let mut s = car();
    assert!(s.outbound(&rs(1)));
    assert_eq!(s.inbound(&payload(1, NEXT, 10), now), Inbound::PASS);
    assert_eq!(s.inbound(&error(1), now), Inbound::PASS);
    // rsocket_rust's COMPLETE after its ERROR: late, dropped.
    assert_eq!(s.inbound(&payload(1, COMPLETE, 0), now), Inbound::Drop);
    assert!(s.outbound(&rr(3)));
    assert_eq!(
        s.inbound(&payload(3, NEXT | COMPLETE, 10), now),
        Inbound::PASS
    );
    assert_eq!(
        s.inbound(&payload(3, NEXT | COMPLETE, 10), now),
        Inbound::Drop
    );
    assert!(
        malformed(&s.inbound(&payload(5, NEXT, 10), now)),
        "we never asked on 5"
    );
    // After we cancel, frames already in flight are dropped.
    assert!(s.outbound(&rs(5)));
    assert!(s.outbound(&cancel(5)));
    assert_eq!(s.inbound(&payload(5, NEXT, 10), now), Inbound::Drop);
}

#[test]
fn fragmented_requests_are_bounded_in_size_and_number() {
    let now = Instant::now();
    let mut s = twin();
    assert_eq!(s.inbound(&fnf(1, FOLLOW), now), Inbound::PASS);
    assert_eq!(s.inbound(&payload(1, FOLLOW, 2000), now), Inbound::PASS);
    let over = s.inbound(&payload(1, FOLLOW, 3000), now);
    assert!(
        matches!(over, Inbound::Reject { local: true, .. }),
        "{over:?}"
    );
    // Its remaining fragments are skipped, then the stream is forgotten.
    assert_eq!(s.inbound(&payload(1, FOLLOW, 100), now), Inbound::Drop);
    assert_eq!(s.inbound(&payload(1, 0, 100), now), Inbound::Drop);
    let mut s = twin();
    for i in 0..8u32 {
        assert_eq!(s.inbound(&fnf(2 * i + 1, FOLLOW), now), Inbound::PASS);
    }
    assert!(rejected(&s.inbound(&fnf(17, FOLLOW), now)));
}

#[test]
fn a_fragmented_answer_to_our_request_is_bounded() {
    let now = Instant::now();
    let mut s = car();
    assert!(s.outbound(&rs(1)));
    assert_eq!(
        s.inbound(&payload(1, NEXT | FOLLOW, 3000), now),
        Inbound::PASS
    );
    assert!(matches!(
        s.inbound(&payload(1, FOLLOW, 3000), now),
        Inbound::Cancel { .. }
    ));
    assert_eq!(s.inbound(&payload(1, NEXT, 10), now), Inbound::Drop);
}

#[test]
fn too_many_refused_fragmenting_requests_drop_the_peer() {
    let now = Instant::now();
    let mut s = twin();
    let mut id = 1;
    let mut verdict = Inbound::PASS;
    for _ in 0..100 {
        verdict = s.inbound(&frame::RequestChannel::builder(id, FOLLOW).build(), now);
        if malformed(&verdict) {
            break;
        }
        assert!(rejected(&verdict));
        id += 2;
    }
    assert!(malformed(&verdict), "{verdict:?}");
}

#[test]
fn request_channel_is_refused() {
    let now = Instant::now();
    let mut s = twin();
    let verdict = s.inbound(&frame::RequestChannel::builder(1, 0).build(), now);
    assert!(rejected(&verdict), "{verdict:?}");
}

#[test]
fn keepalives_asking_for_an_answer_are_answered_at_most_ten_times_a_second() {
    let start = Instant::now();
    let mut s = twin();
    let ka = frame::Keepalive::builder(0, Frame::FLAG_RESPOND).build();
    assert_eq!(s.inbound(&ka, start), Inbound::PASS);
    assert_eq!(
        s.inbound(&ka, start + Duration::from_millis(10)),
        Inbound::Drop
    );
    assert_eq!(
        s.inbound(&ka, start + Duration::from_millis(150)),
        Inbound::PASS
    );
    let answer = frame::Keepalive::builder(0, 0).build();
    assert_eq!(s.inbound(&answer, start), Inbound::PASS);
    assert!(malformed(
        &s.inbound(&frame::Keepalive::builder(3, 0).build(), start)
    ));
}

#[test]
fn oversized_frames_refuse_their_stream_or_cancel_ours() {
    let now = Instant::now();
    let limits = (1024, 1000);
    let mut s = twin();
    assert!(rejected(&s.oversized(1, limits)));
    assert_eq!(
        s.inbound(&payload(1, 0, 10), now),
        Inbound::Drop,
        "rest skipped"
    );
    assert_eq!(s.inbound(&rr(3), now), Inbound::PASS);
    assert!(malformed(&s.oversized(3, limits)), "a request already sent");
    let mut s = car();
    assert!(s.outbound(&rs(1)));
    assert!(matches!(s.oversized(1, limits), Inbound::Cancel { .. }));
    assert_eq!(s.oversized(1, limits), Inbound::Drop);
}

#[test]
fn unused_frame_types_are_ignored() {
    let now = Instant::now();
    let mut s = twin();
    let push = frame::MetadataPush::builder(0, 0)
        .set_metadata(Bytes::from_static(b"x"))
        .build();
    assert_eq!(s.inbound(&push, now), Inbound::Drop);
    assert_eq!(
        s.inbound(&frame::RequestN::builder(1, 0).build(), now),
        Inbound::Drop
    );
}

#[test]
fn answer_bytes_count_only_payloads_toward_peer_streams() {
    assert_eq!(super::answer_bytes(&payload(1, NEXT, 100), false), 100);
    assert_eq!(super::answer_bytes(&payload(2, NEXT, 100), false), 0);
    assert_eq!(super::answer_bytes(&error(1), false), 0);
}
