//! The registry's endpoints over real HTTP, one test per behaviour of the distribution spec's
//! pull side that clients rely on, with the exact status, headers and error code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use cardeploy_registry::{Catalog, Registry};
use cardeploy_testkit::oci::{Image, Layout, OCI_INDEX, OCI_MANIFEST, tar};
use cardeploy_testkit::procs::http;

struct Served {
    _dir: tempfile::TempDir,
    layout: Layout,
    image: Image,
    arm: Image,
    addr: SocketAddr,
    registry: Arc<Registry>,
    _running: common::Running,
}

/// `nav` holds a single image tagged `1.0` and an index tagged `multi` (amd64 and arm64 images);
/// `other` holds an image of its own.
async fn served() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(&dir.path().join("nav"));
    let image = layout.image(
        "arm64",
        &[
            tar(&[("etc/nav", b"v1")]),
            tar(&[("bin/nav", &[7u8; 3000])]),
        ],
    );
    let arm = layout.image("arm64", &[tar(&[("a", b"arm")])]);
    let amd = layout.image("amd64", &[tar(&[("a", b"amd")])]);
    let index = layout.index(&[("amd64", &amd), ("arm64", &arm)]);
    layout.list(&[(&image.manifest, "1.0"), (&index, "multi")]);
    let mut catalog = Catalog::from_layout(&layout.dir, "nav").unwrap();
    let other = Layout::new(&dir.path().join("other"));
    let o = other.image("arm64", &[tar(&[("o", b"other")])]);
    other.list(&[(&o.manifest, "1")]);
    catalog.add_layout(&other.dir, "other").unwrap();
    let running = common::serve(catalog).await;
    Served {
        _dir: dir,
        layout,
        image,
        arm,
        addr: running.addr,
        registry: running.registry.clone(),
        _running: running,
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["errors"][0]["code"].as_str().unwrap().to_owned()
    }
    fn message(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["errors"][0]["message"].as_str().unwrap().to_owned()
    }
}

async fn call(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Answer {
    let url = format!("http://{addr}{path}");
    let headers: Vec<(&'static str, String)> =
        headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let mut response = http().run(req.body(()).unwrap()).unwrap();
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = response.body_mut().read_to_vec().unwrap();
        Answer {
            status,
            headers,
            body,
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_base_endpoint_says_registry_v2() {
    let s = served().await;
    let a = call(s.addr, "GET", "/v2/", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("Docker-Distribution-API-Version"),
        Some("registry/2.0")
    );
}

#[tokio::test]
async fn a_manifest_by_tag_and_by_digest_is_its_exact_bytes_with_its_digest() {
    let s = served().await;
    let bytes = std::fs::read(s.layout.path(&s.image.manifest.digest)).unwrap();
    for reference in ["1.0".to_owned(), s.image.manifest.digest_string()] {
        let a = call(
            s.addr,
            "GET",
            &format!("/v2/nav/manifests/{reference}"),
            &[("Accept", OCI_MANIFEST)],
        )
        .await;
        assert_eq!(a.status, 200, "{reference}");
        assert_eq!(a.body, bytes);
        assert_eq!(a.header("Content-Type"), Some(OCI_MANIFEST));
        assert_eq!(
            a.header("Docker-Content-Digest"),
            Some(s.image.manifest.digest_string().as_str())
        );
    }
    let head = call(s.addr, "HEAD", "/v2/nav/manifests/1.0", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("Content-Length"),
        Some(bytes.len().to_string().as_str())
    );
    assert_eq!(
        head.header("Docker-Content-Digest"),
        Some(s.image.manifest.digest_string().as_str())
    );
}

#[tokio::test]
async fn a_client_that_takes_no_index_gets_the_manifest_for_the_cars_platform() {
    let s = served().await;
    let index = call(
        s.addr,
        "GET",
        "/v2/nav/manifests/multi",
        &[("Accept", &format!("{OCI_INDEX}, {OCI_MANIFEST}"))],
    )
    .await;
    assert_eq!(index.header("Content-Type"), Some(OCI_INDEX));
    let only_manifests = call(
        s.addr,
        "GET",
        "/v2/nav/manifests/multi",
        &[("Accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(only_manifests.status, 200);
    assert_eq!(
        only_manifests.header("Docker-Content-Digest"),
        Some(s.arm.manifest.digest_string().as_str())
    );
    assert_eq!(
        only_manifests.body,
        std::fs::read(s.layout.path(&s.arm.manifest.digest)).unwrap()
    );
}

#[tokio::test]
async fn a_manifest_type_the_client_does_not_accept_is_manifest_unknown_with_the_type() {
    let s = served().await;
    let a = call(
        s.addr,
        "GET",
        "/v2/nav/manifests/1.0",
        &[(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.code(), "MANIFEST_UNKNOWN");
    assert!(a.message().contains(OCI_MANIFEST), "{}", a.message());
}

#[tokio::test]
async fn blobs_come_whole_or_by_range_with_the_spec_headers() {
    let s = served().await;
    let layer = &s.image.layers[1];
    let bytes = std::fs::read(s.layout.path(&layer.digest)).unwrap();
    let path = format!("/v2/nav/blobs/{}", layer.digest_string());
    let whole = call(s.addr, "GET", &path, &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, bytes);
    assert_eq!(
        whole.header("Docker-Content-Digest"),
        Some(layer.digest_string().as_str())
    );
    assert_eq!(whole.header("Accept-Ranges"), Some("bytes"));
    let part = call(s.addr, "GET", &path, &[("Range", "bytes=512-1023")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, bytes[512..1024]);
    assert_eq!(
        part.header("Content-Range"),
        Some(format!("bytes 512-1023/{}", bytes.len()).as_str())
    );
    let tail = call(s.addr, "GET", &path, &[("Range", "bytes=-100")]).await;
    assert_eq!(tail.body, bytes[bytes.len() - 100..]);
    let beyond = call(
        s.addr,
        "GET",
        &path,
        &[("Range", &format!("bytes={}-", bytes.len()))],
    )
    .await;
    assert_eq!(beyond.status, 416);
    assert_eq!(
        beyond.header("Content-Range"),
        Some(format!("bytes */{}", bytes.len()).as_str())
    );
    let head = call(s.addr, "HEAD", &path, &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("Content-Length"),
        Some(bytes.len().to_string().as_str())
    );
}

#[tokio::test]
async fn a_repository_serves_only_its_own_blobs() {
    let s = served().await;
    let path = format!("/v2/other/blobs/{}", s.image.layers[0].digest_string());
    let a = call(s.addr, "GET", &path, &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.code(), "BLOB_UNKNOWN");
    let a = call(s.addr, "GET", "/v2/nowhere/manifests/1.0", &[]).await;
    assert_eq!((a.status, a.code().as_str()), (404, "NAME_UNKNOWN"));
    let a = call(s.addr, "GET", "/v2/nav/manifests/2.0", &[]).await;
    assert_eq!((a.status, a.code().as_str()), (404, "MANIFEST_UNKNOWN"));
}

#[tokio::test]
async fn malformed_names_and_digests_get_the_spec_codes() {
    let s = served().await;
    let a = call(s.addr, "GET", "/v2/Nav/manifests/1.0", &[]).await;
    assert_eq!((a.status, a.code().as_str()), (400, "NAME_INVALID"));
    let a = call(s.addr, "GET", "/v2/nav/blobs/sha256:1234", &[]).await;
    assert_eq!((a.status, a.code().as_str()), (400, "DIGEST_INVALID"));
    let encoded = s.image.layers[0].digest_string().replace(':', "%3A");
    let a = call(s.addr, "GET", &format!("/v2/nav/blobs/{encoded}"), &[]).await;
    assert_eq!(a.status, 200, "a percent-encoded `:` is still a digest");
}

#[tokio::test]
async fn pushing_is_refused_as_unsupported() {
    let s = served().await;
    for (method, path) in [
        ("POST", "/v2/nav/blobs/uploads/"),
        ("PUT", "/v2/nav/manifests/1.0"),
        ("DELETE", "/v2/nav/manifests/1.0"),
    ] {
        let a = call(s.addr, method, path, &[]).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (405, "UNSUPPORTED"),
            "{method} {path}"
        );
        assert_eq!(a.header("Allow"), Some("GET, HEAD"));
    }
}

#[tokio::test]
async fn tags_are_listed_in_order_and_paginated() {
    let s = served().await;
    let a = call(s.addr, "GET", "/v2/nav/tags/list", &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "name": "nav", "tags": ["1.0", "multi"] })
    );
    let a = call(s.addr, "GET", "/v2/nav/tags/list?n=1", &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0"]));
    assert_eq!(
        a.header("Link"),
        Some("</v2/nav/tags/list?n=1&last=1.0>; rel=\"next\"")
    );
    let a = call(s.addr, "GET", "/v2/nav/tags/list?n=1&last=1.0", &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["multi"]));
    assert_eq!(a.header("Link"), None);
}

#[tokio::test]
async fn a_blob_damaged_on_disk_after_it_was_served_is_refused_and_reported() {
    let s = served().await;
    let layer = &s.image.layers[1];
    let path = format!("/v2/nav/blobs/{}", layer.digest_string());
    assert_eq!(call(s.addr, "GET", &path, &[]).await.status, 200);
    assert!(s.registry.take_damaged().is_empty());
    // Same size, one byte flipped, a later modification time: hashed again before serving.
    let file = s.layout.path(&layer.digest);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[600] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let a = call(s.addr, "GET", &path, &[]).await;
    assert_eq!((a.status, a.code().as_str()), (404, "BLOB_UNKNOWN"));
    assert!(a.message().contains("damaged"), "{}", a.message());
    assert_eq!(
        s.registry.take_damaged().into_iter().collect::<Vec<_>>(),
        vec![layer.digest]
    );
}

#[tokio::test]
async fn a_replaced_catalog_serves_the_new_images_only() {
    let s = served().await;
    let dir = tempfile::tempdir().unwrap();
    let next = Layout::new(dir.path());
    let image = next.image("arm64", &[tar(&[("v2", b"2")])]);
    next.list(&[(&image.manifest, "2.0")]);
    s.registry
        .replace(Catalog::from_layout(&next.dir, "nav").unwrap());
    assert_eq!(
        call(s.addr, "GET", "/v2/nav/manifests/2.0", &[])
            .await
            .status,
        200
    );
    assert_eq!(
        call(s.addr, "GET", "/v2/nav/manifests/1.0", &[])
            .await
            .status,
        404
    );
}
