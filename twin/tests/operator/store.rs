//! The chunk store's gc: what no release needs goes after the grace period, nothing else.

use super::*;

fn chunk_path(env: &Env, id: &cardeploy_chunks::Digest) -> PathBuf {
    let hex = id.hex();
    env.chunks().join("chunks").join(&hex[..2]).join(hex)
}

fn index_path(env: &Env, index: &ChunkIndex) -> PathBuf {
    env.chunks().join("indexes").join(index.id().hex())
}

/// Set a stored file's time back by two days (past the default grace period of one).
fn age(path: &Path) {
    let then = SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(then)
        .unwrap();
}

use super::common::{upload, upload_chunks};

/// The twin with its gc running every second (its first round runs at once).
fn collecting(env: &Env) -> Config {
    let mut config = env.config();
    config.gc_interval_secs = 1;
    config
}

#[tokio::test]
async fn unreferenced_chunks_and_indexes_go_after_the_grace_period_and_released_ones_stay() {
    let env = Env::new();
    // Set up with the gc idle (its one round ran at start), age the files, then let it run.
    let twin = env.start_with(env.config()).await;
    let released = upload(&twin, &noise(1, 300_000)).await;
    let artifact =
        cardeploy_testkit::signing::artifact(ArtifactKind::RaucBundle, "rootfs", &released);
    let release = env.signer().manifest("os", "1.0.0", vec![artifact]);
    env.signer()
        .publish(twin.api_addr, &twin.operator_token, &release)
        .await;
    let unreleased = upload(&twin, &noise(2, 300_000)).await;
    let loose = noise(3, 20_000);
    let loose_index = chunk_bytes(&loose, Params::DEFAULT);
    upload_chunks(&twin, &loose, &loose_index).await;
    let fresh = noise(4, 20_000);
    let fresh_index = chunk_bytes(&fresh, Params::DEFAULT);
    upload_chunks(&twin, &fresh, &fresh_index).await;
    twin.stop().await.unwrap();
    for index in [&released, &unreleased, &loose_index] {
        for c in &index.chunks {
            age(&chunk_path(&env, &c.id));
        }
    }
    for index in [&released, &unreleased] {
        age(&index_path(&env, index));
    }

    let twin = env.start_with(collecting(&env)).await;
    eventually(WAIT, "the unreleased index to go", || {
        (!index_path(&env, &unreleased).exists()).then_some(())
    })
    .await;
    eventually(WAIT, "its chunks and the loose one to go", || {
        unreleased
            .chunks
            .iter()
            .chain(&loose_index.chunks)
            .all(|c| !chunk_path(&env, &c.id).exists())
            .then_some(())
    })
    .await;
    assert!(
        index_path(&env, &released).exists(),
        "a released index went"
    );
    for c in released.chunks.iter().chain(&fresh_index.chunks) {
        assert!(chunk_path(&env, &c.id).exists(), "chunk {} went", c.id);
    }
    let (status, body) = api(
        &twin,
        "GET",
        &format!("/api/v1/indexes/{}", unreleased.id()),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = api(
        &twin,
        "GET",
        &format!("/api/v1/indexes/{}", released.id()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_chunk_the_twin_said_it_has_outlives_the_gc_until_its_index_arrives() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let data = noise(5, 200_000);
    let index = chunk_bytes(&data, Params::DEFAULT);
    upload_chunks(&twin, &data, &index).await;
    // A canary: old and unreferenced, it shows when a gc round has run.
    let canary = noise(6, 20_000);
    let canary_index = chunk_bytes(&canary, Params::DEFAULT);
    upload_chunks(&twin, &canary, &canary_index).await;
    for c in index.chunks.iter().chain(&canary_index.chunks) {
        age(&chunk_path(&env, &c.id));
    }
    // `release push` asks first; the twin has every chunk, so none will be uploaded.
    let ids: Vec<String> = index.chunks.iter().map(|c| c.id.hex()).collect();
    let (status, answer) = api(
        &twin,
        "POST",
        "/api/v1/chunks/missing",
        Some(json!({"chunks": ids})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["missing"], json!([]));
    twin.stop().await.unwrap();

    let twin = env.start_with(collecting(&env)).await;
    eventually(WAIT, "a gc round", || {
        canary_index
            .chunks
            .iter()
            .all(|c| !chunk_path(&env, &c.id).exists())
            .then_some(())
    })
    .await;
    let (status, body) = rest_bytes(
        twin.api_addr,
        &twin.operator_token,
        &format!("/api/v1/indexes/{}", index.id()),
        index.encode(),
    )
    .await;
    assert_eq!(
        status, 201,
        "the chunks the twin said it had are gone: {body}"
    );
}
