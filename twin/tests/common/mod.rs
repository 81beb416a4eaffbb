//! What the twin's integration tests share: the twin on port 0 with a test PKI and a root, cars
//! registered through the API, the link's own client as a car.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::Duration;

use cardeploy_link::{Bytes, Requester};
use cardeploy_protocol::{self as protocol, Hello, HelloReply, Phase, ReportedState, route};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::signing::Signer;
use cardeploy_testkit::{CarFiles, TestPki, rest};
use cardeploy_twin::{Config, Running};
use serde_json::{Value, json};

pub struct Env {
    pub pki: TestPki,
    pub data: tempfile::TempDir,
    pub signer: std::sync::OnceLock<Signer>,
    /// With `CARDEPLOY_TWIN_DB=postgres` (the test command's second pass over the twin's
    /// suites): a fresh PostgreSQL database of this test's own instead of SQLite in `data`.
    pub database_url: Option<String>,
    /// With `CARDEPLOY_TWIN_OBJECTS=s3`: the chunk store in a bucket of this test's own.
    pub object_store: Option<cardeploy_twin::ObjectStoreConfig>,
}

/// The chunk store the twin's suites run on: files, or a bucket when the test command's second
/// pass asks for it.
fn object_store() -> Option<cardeploy_twin::ObjectStoreConfig> {
    match std::env::var("CARDEPLOY_TWIN_OBJECTS").as_deref() {
        Ok("s3") => {
            let endpoint = cardeploy_testkit::s3::endpoint()
                .expect("CARDEPLOY_TWIN_OBJECTS=s3 needs CARDEPLOY_S3_ENDPOINT");
            let bucket = cardeploy_testkit::s3::fresh_bucket(&endpoint).unwrap();
            Some(cardeploy_twin::ObjectStoreConfig {
                url: format!("s3://{bucket}/twin"),
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                access_key_id: Some(cardeploy_testkit::s3::ACCESS_KEY.into()),
                secret_access_key: Some(cardeploy_testkit::s3::SECRET_KEY.into()),
                allow_http: true,
            })
        }
        Ok("files") | Err(_) => None,
        Ok(other) => panic!("CARDEPLOY_TWIN_OBJECTS={other:?}: use files or s3"),
    }
}

/// The database the twin's suites run on: SQLite, or PostgreSQL when the test command's second
/// pass asks for it.
fn database_url() -> Option<String> {
    match std::env::var("CARDEPLOY_TWIN_DB").as_deref() {
        Ok("postgres") => {
            let server = cardeploy_testkit::postgres::server()
                .expect("CARDEPLOY_TWIN_DB=postgres needs CARDEPLOY_POSTGRES_URL");
            Some(cardeploy_testkit::postgres::fresh_database_blocking(&server).unwrap())
        }
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("CARDEPLOY_TWIN_DB={other:?}: use sqlite or postgres"),
    }
}

impl Env {
    pub fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Self {
            pki: TestPki::new(),
            data: tempfile::tempdir().unwrap(),
            signer: std::sync::OnceLock::new(),
            database_url: database_url(),
            object_store: object_store(),
        }
    }

    pub fn config(&self) -> Config {
        let mut config = Config::new(self.data.path());
        config.cars_listen = "127.0.0.1:0".parse().unwrap();
        config.api_listen = "127.0.0.1:0".parse().unwrap();
        config.ca = Some(self.pki.ca());
        config.cert = Some(self.pki.twin_cert());
        config.key = Some(self.pki.twin_key());
        config.heartbeat_secs = 2;
        config.database_url = self.database_url.clone();
        config.object_store = self.object_store.clone();
        config
    }

    /// The twin with a root naming its director key (what `cardeploy root push` uploads).
    pub async fn start(&self) -> Running {
        self.start_with(self.config()).await
    }

    /// The twin with `config`, and a root naming its director key the first time.
    pub async fn start_with(&self, config: Config) -> Running {
        let twin = cardeploy_twin::start(config).await.unwrap();
        if self.signer.get().is_none() {
            let signer = Signer::for_twin(self.data.path());
            signer.push_root(twin.api_addr, &twin.operator_token).await;
            let _ = self.signer.set(signer);
        }
        twin
    }

    /// The chunk store's directory.
    pub fn chunks(&self) -> std::path::PathBuf {
        self.data.path().join("chunks")
    }

    pub async fn start_without_root(&self) -> Running {
        cardeploy_twin::start(self.config()).await.unwrap()
    }

    pub fn signer(&self) -> &Signer {
        self.signer.get().unwrap()
    }
}

pub async fn api_async(
    twin: &Running,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    rest(twin.api_addr, &twin.operator_token, method, path, body).await
}

pub async fn register(env: &Env, twin: &Running, car: &str) -> CarFiles {
    let files = env.pki.car(car);
    let (status, body) = api_async(
        twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": car, "attributes": {"model": "tx7"}, "certificate_pem": files.cert_pem})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    files
}

pub async fn car_link(env: &Env, twin: &Running, files: &CarFiles, claimed_id: &str) -> Requester {
    cardeploy_testkit::car_link(
        twin.cars_addr.port(),
        (&env.pki.ca(), &files.cert, &files.key),
        claimed_id,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

pub async fn hello(link: &Requester, phase: Phase) -> HelloReply {
    let hello = Hello {
        agent_version: "test".into(),
        reported: ReportedState {
            phase,
            ..ReportedState::idle()
        },
    };
    let answer = link
        .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await
        .unwrap();
    protocol::decode("hello reply", &answer).unwrap()
}

pub async fn put_bytes(twin: &Running, path: &str, body: Vec<u8>) -> (u16, Value) {
    cardeploy_testkit::rest_bytes(twin.api_addr, &twin.operator_token, path, body).await
}

/// Register a release whose one artifact is `index` (declared from `chunks`).
pub async fn publish(
    env: &Env,
    twin: &Running,
    artifact: &str,
    chunks: &cardeploy_chunks::ChunkIndex,
) -> (u16, Value) {
    let signer = env.signer();
    let a = cardeploy_testkit::signing::artifact(ArtifactKind::RaucBundle, artifact, chunks);
    let release = signer.manifest("os", "1.0.0", vec![a]);
    let body: Value = serde_json::from_slice(&signer.sign_release(&release).to_json()).unwrap();
    api_async(twin, "POST", "/api/v1/releases", Some(body)).await
}

/// `apps@version`, with no artifacts, signed and registered through `twin` (registered already
/// is fine); its digest.
pub async fn apps_release(env: &Env, twin: &Running, version: &str) -> String {
    let signer = env.signer();
    let manifest = signer.manifest("apps", version, vec![]);
    let body: Value = serde_json::from_slice(&signer.sign_release(&manifest).to_json()).unwrap();
    let (status, view) = api_async(twin, "POST", "/api/v1/releases", Some(body)).await;
    assert!(status == 201 || status == 200, "{view}");
    view["digest"].as_str().unwrap().to_owned()
}

/// Upload every chunk of `data` (zstd -3), as `cardeploy artifact push` would.
pub async fn upload_chunks(twin: &Running, data: &[u8], index: &cardeploy_chunks::ChunkIndex) {
    let offsets = index.offsets();
    for (i, c) in index.chunks.iter().enumerate() {
        let raw = &data[offsets[i] as usize..offsets[i + 1] as usize];
        let z = zstd::bulk::compress(raw, 3).unwrap();
        let (status, body) = put_bytes(twin, &format!("/api/v1/chunks/{}", c.id), z).await;
        assert_eq!(status, 201, "{body}");
    }
}

/// Upload `data` as an artifact, chunks then index, as `cardeploy artifact push` does; returns
/// its chunk index.
pub async fn upload(twin: &Running, data: &[u8]) -> cardeploy_chunks::ChunkIndex {
    let index = cardeploy_chunks::chunk_bytes(data, cardeploy_chunks::Params::DEFAULT);
    upload_chunks(twin, data, &index).await;
    let (status, body) = put_bytes(
        twin,
        &format!("/api/v1/indexes/{}", index.id()),
        index.encode(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    index
}
