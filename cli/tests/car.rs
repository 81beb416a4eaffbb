//! `cardeploy car` and `artifact push` against a scripted twin: the requests the CLI makes
//! (pages of events, revocation, uploads retried when the twin is busy) and what it prints.
//! The twin's side of each is tested against the real twin in `twin/tests/operator.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardeploy_protocol::CarId;
use cardeploy_protocol::api::{CarView, CertificateState, IndexView};
use serde_json::{Value, json};

/// A car as the real twin shows it (the views are the protocol crate's types, so the scripted
/// answers have the real shape).
fn car_view(id: &str, certificate: CertificateState, connected: bool) -> Value {
    serde_json::to_value(CarView {
        id: CarId::new(id).unwrap(),
        attributes: Default::default(),
        fingerprint: "ab".repeat(32),
        certificate,
        revoked_at: (certificate == CertificateState::Revoked).then_some(1_000),
        connected,
        connected_to: None,
        desired: None,
        reported: None,
        progress: None,
        install: None,
        dropped_reports: 0,
        position: None,
    })
    .unwrap()
}

/// One request the scripted twin received.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    body: Vec<u8>,
}

/// What it answers: status line, extra headers, JSON body.
struct Reply {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

fn reply(status: &'static str, body: Value) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body,
    }
}

type Script = dyn Fn(&Request) -> Reply + Send + Sync;

/// An HTTP/1.1 twin that answers every request with `script`, keeps connections alive and
/// serves each on its own thread (the uploader opens several at once).
struct ScriptedTwin {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl ScriptedTwin {
    fn start(script: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        {
            let requests = requests.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (requests, script) = (requests.clone(), script.clone());
                    std::thread::spawn(move || serve(stream, &requests, &*script));
                }
            });
        }
        Self { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, requests: &Mutex<Vec<Request>>, script: &Script) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header == "\r\n" {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            assert!(
                !name.eq_ignore_ascii_case("transfer-encoding"),
                "this twin reads Content-Length bodies only"
            );
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let request = Request {
            method: method.to_owned(),
            target: target.to_owned(),
            body,
        };
        let answer = script(&request);
        requests.lock().unwrap().push(request);
        let text = answer.body.to_string();
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            answer.status,
            text.len()
        );
        for (name, value) in answer.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if write!(writer, "{head}\r\n{text}").is_err() {
            return;
        }
    }
}

fn cardeploy(twin: &ScriptedTwin, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cardeploy"))
        .args(args)
        .args(["--api", &twin.url, "--token", "t"])
        .env_remove("CARDEPLOY_API")
        .env_remove("CARDEPLOY_TOKEN")
        .env_remove("CARDEPLOY_TOKEN_FILE")
        .output()
        .unwrap()
}

fn stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "cardeploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of `key` in a request target's query.
fn query(target: &str, key: &str) -> Option<i64> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
        .map(|v| v.parse().unwrap())
}

/// A twin holding events 1..=`count` of one car, paging them as the real one does.
fn twin_with_events(count: i64) -> ScriptedTwin {
    ScriptedTwin::start(move |request| {
        let limit = query(&request.target, "limit").unwrap();
        let before = query(&request.target, "before").unwrap_or(i64::MAX);
        let newest = (before - 1).min(count);
        let oldest = (newest - limit + 1).max(1);
        let events: Vec<Value> = (oldest..=newest)
            .map(|id| json!({"id": id, "at": 1000 + id, "kind": "k", "message": format!("m{id}")}))
            .collect();
        let next = (oldest > 1).then_some(oldest);
        reply(
            "200 OK",
            json!({"events": events, "next_before": next.map_or(Value::Null, |n| json!(n))}),
        )
    })
}

#[test]
fn car_events_follows_pages_back_until_it_has_as_many_as_asked() {
    let twin = twin_with_events(2500);
    let out = stdout(cardeploy(
        &twin,
        &["car", "events", "VIN-1", "--limit", "2100"],
    ));
    let targets: Vec<String> = twin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        [
            "/api/v1/cars/VIN-1/events?limit=1000",
            "/api/v1/cars/VIN-1/events?limit=1000&before=1501",
            "/api/v1/cars/VIN-1/events?limit=100&before=501",
        ]
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2100);
    assert!(lines[0].ends_with(" m401"), "oldest first: {}", lines[0]);
    assert!(lines[2099].ends_with(" m2500"), "{}", lines[2099]);
}

#[test]
fn car_events_stops_at_the_oldest_event() {
    let twin = twin_with_events(30);
    let out = stdout(cardeploy(
        &twin,
        &["car", "events", "VIN-1", "--limit", "5000"],
    ));
    assert_eq!(twin.requests().len(), 1);
    assert_eq!(out.lines().count(), 30);
    let out = stdout(cardeploy(&twin, &["car", "events", "VIN-1"]));
    assert_eq!(out.lines().count(), 30, "the default asks for 50");
}

#[test]
fn car_revoke_deletes_the_car_and_says_how_to_re_provision_it() {
    let twin = ScriptedTwin::start(|_| {
        reply(
            "200 OK",
            car_view("VIN-9", CertificateState::Revoked, false),
        )
    });
    let out = stdout(cardeploy(&twin, &["car", "revoke", "VIN-9"]));
    let requests = twin.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].method.as_str(), requests[0].target.as_str()),
        ("DELETE", "/api/v1/cars/VIN-9")
    );
    assert!(out.contains("abababababababab… revoked"), "{out}");
    assert!(out.contains("cardeploy car add VIN-9"), "{out}");
}

#[test]
fn car_list_says_which_certificates_are_revoked() {
    let twin = ScriptedTwin::start(|_| {
        reply(
            "200 OK",
            json!([
                car_view("VIN-1", CertificateState::Active, true),
                car_view("VIN-2", CertificateState::Revoked, false),
            ]),
        )
    });
    let out = stdout(cardeploy(&twin, &["car", "list"]));
    let row = |car: &str| {
        out.lines()
            .find(|l| l.starts_with(car))
            .unwrap_or_else(|| panic!("no {car} in {out}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert!(out.lines().next().unwrap().contains("CERTIFICATE"), "{out}");
    assert_eq!(row("VIN-1"), "active");
    assert_eq!(row("VIN-2"), "revoked");
}

#[test]
fn a_busy_twin_gets_each_refused_upload_again_after_its_retry_after() {
    // Every chunk is missing; the first two chunk uploads are refused as a busy twin does.
    let refused = Arc::new(Mutex::new(0));
    let twin = {
        let refused = refused.clone();
        ScriptedTwin::start(move |request| match request.method.as_str() {
            "POST" => {
                let asked: Value = serde_json::from_slice(&request.body).unwrap();
                reply("200 OK", json!({"missing": asked["chunks"]}))
            }
            "PUT" if request.target.starts_with("/api/v1/chunks/") => {
                let mut refused = refused.lock().unwrap();
                if *refused < 2 {
                    *refused += 1;
                    Reply {
                        status: "429 Too Many Requests",
                        headers: vec![("Retry-After", "0".into())],
                        body: json!({"error": "busy"}),
                    }
                } else {
                    reply("201 Created", Value::Null)
                }
            }
            _ => {
                let index = request.target.rsplit('/').next().unwrap().to_owned();
                let view = IndexView {
                    index,
                    artifact: "cd".repeat(32),
                    size: 300_000,
                    chunks: 5,
                };
                reply("201 Created", serde_json::to_value(view).unwrap())
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("artifact.bin");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&file, &data).unwrap();
    let out = stdout(cardeploy(
        &twin,
        &["artifact", "push", file.to_str().unwrap(), "--level", "1"],
    ));
    let index = cardeploy_chunks::chunk_bytes(&data, cardeploy_chunks::Params::DEFAULT);
    assert_eq!(out.trim(), index.id().hex());
    let puts: Vec<Request> = twin
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.target.starts_with("/api/v1/chunks/"))
        .collect();
    let mut unique: Vec<_> = index.chunks.iter().map(|c| c.id).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(puts.len(), unique.len() + 2, "two refused, then each once");
    for id in unique {
        assert!(
            puts.iter()
                .any(|r| r.target == format!("/api/v1/chunks/{id}")),
            "chunk {id} never uploaded"
        );
    }
}
