//! The operator API under abuse, and the secrets on disk.

use super::*;

/// One request with a raw body and content type; status, headers and JSON body.
async fn raw(
    twin: &Running,
    method: &'static str,
    path: &str,
    content_type: &'static str,
    body: Vec<u8>,
) -> (u16, ureq::http::HeaderMap, Value) {
    let url = format!("http://{}{path}", twin.api_addr);
    let auth = format!("Bearer {}", twin.operator_token);
    tokio::task::spawn_blocking(move || {
        let agent = cardeploy_testkit::procs::http();
        let response = match method {
            "POST" => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", content_type)
                .send(&body[..]),
            "PUT" => agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", content_type)
                .send(&body[..]),
            "DELETE" => agent.delete(&url).header("Authorization", &auth).call(),
            "GET" => agent.get(&url).header("Authorization", &auth).call(),
            other => panic!("raw(): {other}"),
        };
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, json)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_refused_bodies_answer_with_the_json_error() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    struct Case {
        what: &'static str,
        method: &'static str,
        path: &'static str,
        content_type: &'static str,
        body: &'static [u8],
        status: u16,
        says: &'static str,
    }
    let json = "application/json";
    let cases = [
        Case {
            what: "unknown route",
            method: "GET",
            path: "/api/v1/nothing-here",
            content_type: "",
            body: b"",
            status: 404,
            says: "no such route",
        },
        Case {
            what: "wrong method",
            method: "DELETE",
            path: "/api/v1/releases",
            content_type: "",
            body: b"",
            status: 405,
            says: "not allowed",
        },
        Case {
            what: "not JSON",
            method: "POST",
            path: "/api/v1/cars",
            content_type: "text/plain",
            body: b"{}",
            status: 415,
            says: json,
        },
        Case {
            what: "bad JSON",
            method: "POST",
            path: "/api/v1/cars",
            content_type: json,
            body: b"{\"id\":",
            status: 400,
            says: "JSON",
        },
        Case {
            what: "missing field",
            method: "POST",
            path: "/api/v1/cars",
            content_type: json,
            body: b"{\"id\":\"V\"}",
            status: 422,
            says: "certificate_pem",
        },
        Case {
            what: "bad query",
            method: "GET",
            path: "/api/v1/cars/V/events?limit=-1",
            content_type: "",
            body: b"",
            status: 400,
            says: "limit",
        },
    ];
    for Case {
        what,
        method,
        path,
        content_type,
        body,
        status,
        says,
    } in cases
    {
        let (got, headers, json) = raw(&twin, method, path, content_type, body.to_vec()).await;
        assert_eq!(got, status, "{what}: {json}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{what}"
        );
        let error = json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {json}"));
        assert!(error.contains(says), "{what}: {error}");
    }
}

#[tokio::test]
async fn bodies_over_their_route_limit_get_413_while_uploads_take_more() {
    let env = Env::new();
    let mut config = env.config();
    // An index of a 1 MiB artifact has at most 65 chunks: 2404 bytes.
    config.max_artifact_bytes = 1 << 20;
    let twin = env.start_with(config).await;
    let big_json = json!({"id": "V", "certificate_pem": "x".repeat(65 << 10)});
    let (status, _, body) = raw(
        &twin,
        "POST",
        "/api/v1/cars",
        "application/json",
        big_json.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("64 KiB"), "{body}");

    // A chunk of 1 MiB is far over the JSON limit and fine as an upload.
    let chunk = noise(7, 1 << 20);
    let id = cardeploy_chunks::Digest::of(&chunk);
    let frame = zstd::bulk::compress(&chunk, 1).unwrap();
    assert!(frame.len() > 64 << 10);
    let (status, body) = rest_bytes(
        twin.api_addr,
        &twin.operator_token,
        &format!("/api/v1/chunks/{id}"),
        frame,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let (status, body) = rest_bytes(
        twin.api_addr,
        &twin.operator_token,
        &format!("/api/v1/indexes/{id}"),
        vec![0; 2405],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].is_string(), "{body}");
}

/// Read from `stream` until the twin closes it; what it sent.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("the twin kept the connection open")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_client_slow_with_its_headers_is_cut_off_and_one_slow_with_its_body_gets_408() {
    let env = Env::new();
    let mut config = env.config();
    config.api_header_timeout_secs = 1;
    config.api_body_timeout_secs = 1;
    let twin = env.start_with(config).await;

    let mut slow_headers = tokio::net::TcpStream::connect(twin.api_addr).await.unwrap();
    slow_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: twin\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut slow_headers).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    // A connection that never sends anything is closed the same way.
    let mut silent = tokio::net::TcpStream::connect(twin.api_addr).await.unwrap();
    read_to_close(&mut silent).await;

    let mut slow_body = tokio::net::TcpStream::connect(twin.api_addr).await.unwrap();
    let head = format!(
        "PUT /api/v1/cars/V/desired HTTP/1.1\r\nHost: twin\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"release\"",
        twin.operator_token
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, slow_body.read(&mut answer))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("{\"error\":\"the request body did not arrive"),
        "{answer}"
    );
}

#[tokio::test]
async fn uploads_beyond_the_limit_get_429_with_retry_after_before_their_body_is_read() {
    let env = Env::new();
    let mut config = env.config();
    config.max_concurrent_uploads = 1;
    let twin = env.start_with(config).await;
    let data = b"one small chunk".to_vec();
    let id = cardeploy_chunks::Digest::of(&data);
    let frame = zstd::bulk::compress(&data, 1).unwrap();

    // An upload whose body never comes holds the only slot.
    let mut holder = tokio::net::TcpStream::connect(twin.api_addr).await.unwrap();
    let head = format!(
        "PUT /api/v1/chunks/{id} HTTP/1.1\r\nHost: twin\r\nAuthorization: Bearer {}\r\nContent-Length: 1000\r\n\r\n",
        twin.operator_token
    );
    holder.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let (_, headers, body) = loop {
        let path = format!("/api/v1/chunks/{id}");
        let answer = raw(
            &twin,
            "PUT",
            &path,
            "application/octet-stream",
            frame.clone(),
        )
        .await;
        if answer.0 == 429 {
            break answer;
        }
        assert!(
            started.elapsed() < WAIT,
            "no 429 while the slot is held: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("uploads are in progress"),
        "{body}"
    );
    // Other routes are not uploads.
    let (status, _) = api(&twin, "GET", "/api/v1/cars", None).await;
    assert_eq!(status, 200);

    drop(holder);
    until("the slot to free", || {
        let frame = frame.clone();
        let twin = &twin;
        async move {
            raw(
                twin,
                "PUT",
                &format!("/api/v1/chunks/{id}"),
                "application/octet-stream",
                frame,
            )
            .await
            .0 == 201
        }
    })
    .await;
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn the_twin_refuses_to_start_with_a_secret_open_to_others() {
    let env = Env::new();
    env.start_with(env.config()).await.stop().await.unwrap();
    let secrets = [
        env.data.path().join("operator.token"),
        env.data.path().join("director.key"),
        env.pki.twin_key(),
    ];
    for secret in &secrets {
        set_mode(secret, 0o640);
        let e = cardeploy_twin::start(env.config()).await.unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, cardeploy_twin::Error::Config { .. }),
            "{message}"
        );
        assert!(message.contains(&secret.display().to_string()), "{message}");
        assert!(message.contains("0640"), "{message}");
        assert!(
            message.contains(&format!("chmod 600 {}", secret.display())),
            "{message}"
        );
        set_mode(secret, 0o600);
    }
    env.start_with(env.config()).await.stop().await.unwrap();
}

#[tokio::test]
async fn the_twin_creates_its_data_directory_private() {
    let env = Env::new();
    let mut config = env.config();
    config.data_dir = env.data.path().join("fresh/data");
    let twin = cardeploy_twin::start(config.clone()).await.unwrap();
    let mode = std::fs::metadata(&config.data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    twin.stop().await.unwrap();
}
