//! Real connections on loopback: mutual TLS, routing, deadlines, limits, windows and dead peers.
//! Each rsocket_rust gap docs/protocol.md lists (closed in `crates/link`) has a test here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cardeploy_link::tls::{PeerRegistry, TlsFiles, client_config, fingerprint_pem, server_config};
use cardeploy_link::{
    Acceptor, Bytes, ClientOptions, ClientSecurity, Error, Limits, LinkServer, Peer, Refusal,
    Requester, Responder, ServerOptions, ServerSecurity, ServerStats, Session, Window, connect,
};
use cardeploy_testkit::{Fault, FaultProxy, TestPki, eventually};
use futures::StreamExt;
use futures::stream::BoxStream;

struct TestResponder {
    fnf: Arc<Mutex<Vec<String>>>,
    /// `silent` requests that reached the responder (and will never be answered).
    silent: Arc<AtomicUsize>,
    /// One clone per responder alive: what a connection's engine holds while it lasts.
    _alive: Arc<()>,
}

#[async_trait]
impl Responder for TestResponder {
    async fn request_response(&self, route: &str, data: Bytes) -> Result<Bytes, Refusal> {
        match route {
            "echo" => Ok(data),
            "silent" => {
                self.silent.fetch_add(1, Ordering::SeqCst);
                futures::future::pending::<()>().await;
                unreachable!()
            }
            "fail" => Err(Refusal::new("malformed hello: expected JSON")),
            other => Err(Refusal::unknown_route(
                other,
                &["echo", "silent", "fail", "count"],
            )),
        }
    }

    async fn fire_and_forget(&self, _route: &str, data: Bytes) {
        self.fnf
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&data).into_owned());
    }

    fn request_stream(
        &self,
        route: &str,
        data: Bytes,
    ) -> BoxStream<'static, Result<Bytes, Refusal>> {
        if route != "count" {
            return futures::stream::once(async { Err(Refusal::new("no such stream")) }).boxed();
        }
        let n: usize = String::from_utf8_lossy(&data).parse().unwrap_or(0);
        futures::stream::iter((0..n).map(|_| Ok(Bytes::from(vec![1u8; 1024])))).boxed()
    }
}

#[derive(Default)]
struct TestAcceptor {
    sessions: Mutex<Vec<(Peer, Requester)>>,
    fnf: Arc<Mutex<Vec<String>>>,
    silent: Arc<AtomicUsize>,
    alive: Arc<()>,
    /// Where each session came from.
    remotes: Mutex<Vec<std::net::SocketAddr>>,
}

impl Acceptor for TestAcceptor {
    fn accept(&self, session: Session) -> Result<Arc<dyn Responder>, Refusal> {
        self.remotes.lock().unwrap().push(session.remote);
        if &session.setup_data[..] == b"refuse me" {
            return Err(Refusal::new("this car is suspended"));
        }
        self.sessions
            .lock()
            .unwrap()
            .push((session.peer, session.requester));
        Ok(Arc::new(TestResponder {
            fnf: self.fnf.clone(),
            silent: self.silent.clone(),
            _alive: self.alive.clone(),
        }))
    }
}

struct Harness {
    pki: TestPki,
    addr: std::net::SocketAddr,
    acceptor: Arc<TestAcceptor>,
    stats: Arc<ServerStats>,
    registry: PeerRegistry,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn twin(heartbeat: Duration) -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pki = TestPki::new();
    let registry = PeerRegistry::default();
    let (ca, cert, key) = (pki.ca(), pki.twin_cert(), pki.twin_key());
    let config = server_config(
        &TlsFiles {
            ca: &ca,
            cert: &cert,
            key: &key,
        },
        registry.clone(),
    )
    .unwrap();
    let server = LinkServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerSecurity::MutualTls {
            config,
            registry: registry.clone(),
        },
        ServerOptions {
            heartbeat,
            request_deadline: Duration::from_secs(5),
            ..ServerOptions::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let acceptor = Arc::new(TestAcceptor::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(acceptor.clone(), async {
        let _ = stopped.await;
    }));
    Harness {
        pki,
        addr,
        acceptor,
        stats,
        registry,
        _stop: stop,
    }
}

impl Harness {
    fn register(&self, car: &str) -> cardeploy_testkit::CarFiles {
        let files = self.pki.car(car);
        self.registry
            .insert(fingerprint_pem(&files.cert_pem).unwrap(), car.to_owned());
        files
    }

    fn options(
        &self,
        files: &cardeploy_testkit::CarFiles,
        addr: std::net::SocketAddr,
    ) -> ClientOptions {
        let ca = self.pki.ca();
        let config = client_config(&TlsFiles {
            ca: &ca,
            cert: &files.cert,
            key: &files.key,
        })
        .unwrap();
        ClientOptions {
            addr: format!("localhost:{}", addr.port()),
            security: ClientSecurity::MutualTls(config),
            heartbeat: Duration::from_secs(10),
            request_deadline: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            setup_data: Bytes::from_static(b"{}"),
            responder: Some(Arc::new(TestResponder {
                fnf: Arc::default(),
                silent: Arc::default(),
                _alive: Arc::default(),
            })),
            bind: None,
        }
    }
}

#[tokio::test]
async fn a_registered_car_is_authenticated_by_its_certificate_and_routes_work() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-A");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let answer = link
        .request_response("echo", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"hello");
    let sessions = h.acceptor.sessions.lock().unwrap();
    assert_eq!(sessions[0].0, Peer::Authenticated("VIN-A".into()));
}

#[tokio::test]
async fn the_twin_can_ask_the_car_over_the_same_connection() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-B");
    let _link = connect(&h.options(&car, h.addr)).await.unwrap();
    // SETUP is processed right after connect; wait for the session.
    let requester = eventually(Duration::from_secs(5), "the session", || {
        h.acceptor
            .sessions
            .lock()
            .unwrap()
            .first()
            .map(|s| s.1.clone())
    })
    .await;
    let answer = requester
        .request_response("echo", Bytes::from_static(b"inspect"))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"inspect");
}

#[tokio::test]
async fn an_unregistered_certificate_from_the_fleet_ca_is_refused_in_the_handshake() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.pki.car("VIN-NOT-REGISTERED");
    let result = async {
        let link = connect(&h.options(&car, h.addr)).await?;
        link.request_response("echo", Bytes::from_static(b"x"))
            .await
    }
    .await;
    assert!(result.is_err(), "an unregistered car got an answer");
    eventually(Duration::from_secs(5), "the refusal to be counted", || {
        (h.stats
            .handshakes_refused
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(h.acceptor.sessions.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_even_if_its_fingerprint_were_known() {
    let h = twin(Duration::from_secs(10)).await;
    let foreign = h.pki.foreign_car("VIN-A");
    h.registry
        .insert(fingerprint_pem(&foreign.cert_pem).unwrap(), "VIN-A".into());
    let result = async {
        let link = connect(&h.options(&foreign, h.addr)).await?;
        link.request_response("echo", Bytes::from_static(b"x"))
            .await
    }
    .await;
    assert!(result.is_err());
    assert_eq!(h.acceptor.sessions.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn an_unknown_route_is_an_error_with_a_clear_message_and_the_connection_stays_up() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-C");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let err = link
        .request_response("car.fly", Bytes::new())
        .await
        .unwrap_err();
    match err {
        Error::Remote { message, .. } => {
            assert!(message.contains("unknown route \"car.fly\""), "{message}");
            assert!(message.contains("echo"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let err = link
        .request_response("fail", Bytes::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("malformed hello"), "{err}");
    let answer = link
        .request_response("echo", Bytes::from_static(b"still here"))
        .await;
    assert_eq!(&answer.unwrap()[..], b"still here");
}

#[tokio::test]
async fn a_refused_setup_reaches_the_car_as_an_error() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-S");
    let mut options = h.options(&car, h.addr);
    options.setup_data = Bytes::from_static(b"refuse me");
    let link = connect(&options).await.unwrap();
    let err = link
        .request_response("echo", Bytes::new())
        .await
        .unwrap_err();
    // The refusal arrives before anything else the twin sends, and the request fails with it.
    assert!(
        matches!(&err, Error::Remote { message, .. }
            if message == "REJECTED_SETUP: this car is suspended"),
        "{err:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), link.closed())
        .await
        .expect("the twin closes a refused connection");
}

#[tokio::test]
async fn a_request_without_an_answer_fails_at_its_deadline() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-D");
    let mut options = h.options(&car, h.addr);
    options.request_deadline = Duration::from_millis(300);
    let link = connect(&options).await.unwrap();
    let started = Instant::now();
    let err = link
        .request_response("silent", Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Deadline { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn pending_requests_fail_as_soon_as_the_connection_is_lost() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-E");
    let proxy = FaultProxy::start(h.addr).await;
    let mut options = h.options(&car, proxy.addr);
    options.request_deadline = Duration::from_secs(60);
    let link = connect(&options).await.unwrap();
    let pending = tokio::spawn({
        let link = link.clone();
        async move { link.request_response("silent", Bytes::new()).await }
    });
    // The request is pending at the twin (not still on its way) when the connection goes.
    eventually(
        Duration::from_secs(5),
        "the request to reach the twin",
        || (h.acceptor.silent.load(Ordering::SeqCst) > 0).then_some(()),
    )
    .await;
    let started = Instant::now();
    proxy.set(Fault::Reset);
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the pending request hung after the connection was lost")
        .unwrap();
    assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_silent_peer_is_dropped_by_both_sides_within_three_heartbeats() {
    let heartbeat = Duration::from_millis(300);
    let h = twin(heartbeat).await;
    let car = h.register("VIN-F");
    let proxy = FaultProxy::start(h.addr).await;
    let mut options = h.options(&car, proxy.addr);
    options.heartbeat = heartbeat;
    let link = connect(&options).await.unwrap();
    link.request_response("echo", Bytes::new()).await.unwrap();
    let open = || {
        h.stats
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(open(), 1);
    let started = Instant::now();
    proxy.set(Fault::Blackhole);
    tokio::time::timeout(Duration::from_secs(5), link.closed())
        .await
        .expect("the car did not notice the dead twin");
    let car_side = started.elapsed();
    eventually(
        Duration::from_secs(5),
        "the twin to drop the session",
        || (open() == 0).then_some(()),
    )
    .await;
    let twin_side = started.elapsed();
    // 3 intervals of silence, plus at most one interval of scheduling slack.
    assert!(car_side <= heartbeat * 4, "car noticed after {car_side:?}");
    assert!(
        twin_side <= heartbeat * 4,
        "twin noticed after {twin_side:?}"
    );
}

#[tokio::test]
async fn an_idle_but_alive_connection_is_kept() {
    let heartbeat = Duration::from_millis(200);
    let h = twin(heartbeat).await;
    let car = h.register("VIN-G");
    let mut options = h.options(&car, h.addr);
    options.heartbeat = heartbeat;
    let link = connect(&options).await.unwrap();
    // Ten intervals without any request: keepalives must hold the connection. Here the time
    // passing is what is tested, not a stand-in for an event.
    tokio::time::sleep(heartbeat * 10).await;
    assert!(!link.is_closed());
    link.request_response("echo", Bytes::new()).await.unwrap();
}

#[tokio::test]
async fn payloads_up_to_the_limit_travel_in_fragments() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-H");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let big = Bytes::from(vec![42u8; 1024 * 1024]);
    let answer = link.request_response("echo", big.clone()).await.unwrap();
    assert_eq!(answer, big);
}

#[tokio::test]
async fn an_oversized_payload_is_refused_before_sending() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-I");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let err = link
        .request_response("echo", Bytes::from(vec![0u8; 1024 * 1024 + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err:?}");
}

/// A peer that ignores the limit — fragmented or in one frame — is refused by the receiver
/// before the payload is buffered, and the connection stays up.
#[tokio::test]
async fn an_oversized_payload_from_a_careless_peer_is_refused_and_the_connection_stays_up() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-J");
    for mtu in [64 * 1024, 0] {
        let mut options = h.options(&car, h.addr);
        options.limits = Limits {
            max_payload: 8 * 1024 * 1024,
            max_frame: 9 * 1024 * 1024,
            mtu,
            ..Limits::default()
        };
        let link = connect(&options).await.unwrap();
        let err = link
            .request_response("echo", Bytes::from(vec![0u8; 2 * 1024 * 1024]))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("limit"),
            "mtu {mtu}: unexpected error {err}"
        );
        let answer = link
            .request_response("echo", Bytes::from_static(b"ok"))
            .await;
        assert_eq!(&answer.unwrap()[..], b"ok", "mtu {mtu}");
    }
}

#[tokio::test]
async fn a_window_returns_what_the_responder_sent_and_overflow_is_an_error() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-K");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let window = Window {
        max_items: 16,
        max_bytes: 64 * 1024,
    };
    let items = link
        .request_window("count", Bytes::from_static(b"16"), window)
        .await
        .unwrap();
    assert_eq!(items.len(), 16);
    let err = link
        .request_window("count", Bytes::from_static(b"40"), window)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::WindowOverflow { what: "items", .. }),
        "{err:?}"
    );
    let tight = Window {
        max_items: 100,
        max_bytes: 10 * 1024,
    };
    let err = link
        .request_window("count", Bytes::from_static(b"20"), tight)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::WindowOverflow { what: "bytes", .. }),
        "{err:?}"
    );
    // The connection survives a cut-off window.
    link.request_response("echo", Bytes::new()).await.unwrap();
}

#[tokio::test]
async fn fire_and_forget_arrives() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-L");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    link.fire_and_forget("report", Bytes::from_static(b"one"))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the report", || {
        (h.acceptor.fnf.lock().unwrap().as_slice() == ["one"]).then_some(())
    })
    .await;
}

/// Every connection's state goes when the connection does, on both ends and whoever ends it: the
/// engine holds a connection's responder while the connection lasts, so responders still alive
/// after the close are connections kept (rsocket_rust 0.7.5 kept every one, ~12 KiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_leaves_nothing_behind_on_either_side() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-GONE");
    let car_alive = Arc::new(());
    let window = Window {
        max_items: 4,
        max_bytes: 64 * 1024,
    };
    const ROUNDS: usize = 30;
    for round in 0..ROUNDS {
        let mut options = h.options(&car, h.addr);
        options.responder = Some(Arc::new(TestResponder {
            fnf: Arc::default(),
            silent: Arc::default(),
            _alive: car_alive.clone(),
        }));
        let link = connect(&options).await.unwrap();
        // Traffic both ways first: an answer, a window, one cut off (cancelled), a request from
        // the twin to the car, a fire-and-forget.
        link.request_response("echo", Bytes::from_static(b"x"))
            .await
            .unwrap();
        link.request_window("count", Bytes::from_static(b"3"), window)
            .await
            .unwrap();
        link.request_window("count", Bytes::from_static(b"50"), window)
            .await
            .unwrap_err();
        link.fire_and_forget("report", Bytes::from_static(b"r"))
            .await
            .unwrap();
        let twin_side = eventually(Duration::from_secs(5), "the session", || {
            h.acceptor.sessions.lock().unwrap().pop().map(|s| s.1)
        })
        .await;
        twin_side
            .request_response("echo", Bytes::from_static(b"inspect"))
            .await
            .unwrap();
        assert_eq!(Arc::strong_count(&car_alive), 2, "round {round}");
        match round % 3 {
            0 => link.close(),
            1 => twin_side.close(),
            // The car just goes: its requester dropped, the twin sees the socket end.
            _ => {}
        }
        drop(link);
        drop(twin_side);
    }
    eventually(
        Duration::from_secs(10),
        "every connection's state on the car to go",
        || (Arc::strong_count(&car_alive) == 1).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "every connection's state on the twin to go",
        || {
            (Arc::strong_count(&h.acceptor.alive) == 1
                && h.stats.open_connections.load(Ordering::SeqCst) == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        h.stats.sessions_accepted.load(Ordering::SeqCst),
        ROUNDS as u64
    );
}

/// A car's reports are numbered and the twin drops one older than the last it stored: the
/// requests must reach the responder in the order they were sent, also when many are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_requests_reach_the_responder_in_the_order_sent() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-ORDER");
    let link = connect(&h.options(&car, h.addr)).await.unwrap();
    let sent: Vec<String> = (0..200).map(|i| format!("report {i}")).collect();
    for report in &sent {
        link.fire_and_forget("report", Bytes::from(report.clone()))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "every report", || {
        (h.acceptor.fnf.lock().unwrap().len() == sent.len()).then_some(())
    })
    .await;
    assert_eq!(*h.acceptor.fnf.lock().unwrap(), sent);
}

/// A simulated fleet spreads its cars over loopback addresses (one source address has only as
/// many connections to the twin as ephemeral ports): the connection comes from the address given.
#[tokio::test]
async fn a_car_connects_from_the_local_address_it_is_given() {
    let h = twin(Duration::from_secs(10)).await;
    let car = h.register("VIN-FROM");
    let mut options = h.options(&car, h.addr);
    let source: std::net::IpAddr = "127.3.2.1".parse().unwrap();
    options.bind = Some(source);
    let link = connect(&options).await.unwrap();
    link.request_response("echo", Bytes::new()).await.unwrap();
    let remotes = h.acceptor.remotes.lock().unwrap().clone();
    assert_eq!(remotes.len(), 1);
    assert_eq!(remotes[0].ip(), source);
    // An address of the other family than the twin's is a clear error, not a hang.
    options.bind = Some("::1".parse().unwrap());
    options.addr = format!("127.0.0.1:{}", h.addr.port());
    let err = connect(&options).await.unwrap_err();
    assert!(
        err.to_string().contains("no address of the family"),
        "{err}"
    );
}
