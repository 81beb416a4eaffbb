//! Signed releases for tests (docs/release-format.md): a root with its own root and release
//! keys and the twin's director key, releases signed with it, registered with a running twin.
//! Tests drive the same REST calls as `cardeploy root push` and `cardeploy release push`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cardeploy_chunks::ChunkIndex;
use cardeploy_release::{
    Artifact, ArtifactKind, DowngradeOverride, Envelope, OVERRIDE_TYPE, PublicKey, RELEASE_TYPE,
    ROOT_TYPE, Release, Role, Roles, Root, SigningKey, key_file, sign,
};
use serde_json::json;

use crate::rest;

/// The compatible string test cars are configured with.
pub const COMPATIBLE: &str = "cardeploy-test";

/// Root and release keys for one test fleet.
pub struct Signer {
    pub root_key: SigningKey,
    pub release_key: SigningKey,
    pub director: PublicKey,
    dir: tempfile::TempDir,
    root: Vec<u8>,
}

fn role(key: &PublicKey) -> Role {
    Role {
        keyids: vec![key.id()],
        threshold: 1,
    }
}

/// A root document naming one key per role, valid for a year from now.
pub fn root_document(
    version: u64,
    root: &PublicKey,
    release: &PublicKey,
    director: &PublicKey,
) -> Root {
    Root {
        version,
        expires: now() + 365 * 86_400,
        keys: [root, release, director]
            .into_iter()
            .map(|k| (k.id(), k.clone()))
            .collect(),
        roles: Roles {
            root: role(root),
            release: role(release),
            director: role(director),
        },
    }
}

/// The clock signed documents are checked against.
pub use cardeploy_release::now_secs as now;

/// A release artifact declared from its chunk index.
pub fn artifact(kind: ArtifactKind, name: &str, index: &ChunkIndex) -> Artifact {
    Artifact {
        kind,
        name: name.to_owned(),
        digest: index.artifact.hex(),
        size: index.size,
        index: index.id().hex(),
    }
}

/// A release artifact declared from the twin's view of its chunk index
/// (`GET /api/v1/indexes/{index}`).
pub fn artifact_from_view(
    kind: ArtifactKind,
    name: &str,
    index: &str,
    view: &serde_json::Value,
) -> Artifact {
    Artifact {
        kind,
        name: name.to_owned(),
        digest: view["artifact"].as_str().unwrap().to_owned(),
        size: view["size"].as_u64().unwrap(),
        index: index.to_owned(),
    }
}

impl Signer {
    /// Keys for the root and release roles; `director` is the twin's key
    /// (`<data_dir>/director.pub`).
    pub fn new(director: PublicKey) -> Self {
        let root_key = SigningKey::generate().unwrap();
        let release_key = SigningKey::generate().unwrap();
        let doc = root_document(1, &root_key.public(), &release_key.public(), &director);
        let root = sign(ROOT_TYPE, &serde_json::to_vec(&doc).unwrap(), &[&root_key]).to_json();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.json"), &root).unwrap();
        Self {
            root_key,
            release_key,
            director,
            dir,
            root,
        }
    }

    /// For the twin in `data_dir`, which must have started once (it makes its director key).
    pub fn for_twin(data_dir: &Path) -> Self {
        Self::new(key_file::read_public(&data_dir.join("director.pub")).unwrap())
    }

    /// The version 1 root: what a car pins (config `root`).
    pub fn root_path(&self) -> PathBuf {
        self.dir.path().join("root.json")
    }

    pub fn root_bytes(&self) -> &[u8] {
        &self.root
    }

    /// Root version `version` with the same root and release keys and `director` as the
    /// director key, signed by the root key (old and new threshold alike): what
    /// `cardeploy root rotate --director-key` makes when the twin's director key is replaced.
    pub fn rotation(&self, version: u64, director: &PublicKey) -> Vec<u8> {
        let doc = root_document(
            version,
            &self.root_key.public(),
            &self.release_key.public(),
            director,
        );
        sign(
            ROOT_TYPE,
            &serde_json::to_vec(&doc).unwrap(),
            &[&self.root_key],
        )
        .to_json()
    }

    /// A manifest for the test hardware.
    pub fn manifest(&self, line: &str, version: &str, artifacts: Vec<Artifact>) -> Release {
        Release {
            line: line.to_owned(),
            version: version.to_owned(),
            compatible: COMPATIBLE.to_owned(),
            created: now(),
            artifacts,
            workloads: Vec::new(),
            images: Vec::new(),
        }
    }

    pub fn sign_release(&self, release: &Release) -> Envelope {
        sign(
            RELEASE_TYPE,
            &serde_json::to_vec(release).unwrap(),
            &[&self.release_key],
        )
    }

    /// A root-signed permission to install `line@version` although it is older.
    pub fn downgrade(&self, line: &str, version: &str) -> Envelope {
        let doc = DowngradeOverride {
            line: line.to_owned(),
            version: version.to_owned(),
            expires: now() + 3600,
        };
        sign(
            OVERRIDE_TYPE,
            &serde_json::to_vec(&doc).unwrap(),
            &[&self.root_key],
        )
    }

    /// Upload the version 1 root to the twin (`cardeploy root push`).
    pub async fn push_root(&self, api: SocketAddr, token: &str) {
        let body: serde_json::Value = serde_json::from_slice(&self.root).unwrap();
        let (status, answer) = rest(api, token, "POST", "/api/v1/roots", Some(body)).await;
        assert_eq!(status, 200, "{answer}");
    }

    /// Sign and register a release (`cardeploy release push`, after its artifacts); returns its
    /// digest.
    pub async fn publish(&self, api: SocketAddr, token: &str, release: &Release) -> String {
        let envelope = self.sign_release(release);
        let body: serde_json::Value = serde_json::from_slice(&envelope.to_json()).unwrap();
        let (status, answer) = rest(api, token, "POST", "/api/v1/releases", Some(body)).await;
        assert!(status == 201 || status == 200, "{status} {answer}");
        answer["digest"].as_str().unwrap().to_owned()
    }

    /// Publish `line@version` with `artifacts` and make it `car`'s desired state; returns the
    /// twin's view of the signed desired state.
    pub async fn desire(
        &self,
        api: SocketAddr,
        token: &str,
        car: &str,
        release: &Release,
    ) -> serde_json::Value {
        let digest = self.publish(api, token, release).await;
        let (status, answer) = rest(
            api,
            token,
            "PUT",
            &format!("/api/v1/cars/{car}/desired"),
            Some(json!({ "release": digest })),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        answer
    }
}

/// Blocking forms for benchmarks that drive a twin process (`procs::TwinProcess`, whose `api` is
/// a URL).
impl Signer {
    fn post(
        api: &str,
        token: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut response = crate::procs::http()
            .post(&format!("{api}{path}"))
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// [`Signer::push_root`] to the twin at `api` (`http://host:port`).
    pub fn push_root_to(&self, api: &str, token: &str) {
        let body = serde_json::from_slice(&self.root).unwrap();
        let (status, answer) = Self::post(api, token, "/api/v1/roots", body);
        assert_eq!(status, 200, "{answer}");
    }

    /// [`Signer::publish`] to the twin at `api`; returns the release digest.
    pub fn publish_to(&self, api: &str, token: &str, release: &Release) -> String {
        let body = serde_json::from_slice(&self.sign_release(release).to_json()).unwrap();
        let (status, answer) = Self::post(api, token, "/api/v1/releases", body);
        assert!(status == 201 || status == 200, "{status} {answer}");
        answer["digest"].as_str().unwrap().to_owned()
    }
}
