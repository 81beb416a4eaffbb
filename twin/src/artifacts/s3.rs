//! The chunk store, its indexes and the delta cache in S3-compatible object storage, so that
//! several twin instances share them ([`crate::config::ObjectStoreConfig`]). The S3 protocol is
//! the `object_store` crate's (Apache Arrow's); this file only maps the store's objects onto it.
//!
//! The store's callers are synchronous (they run on blocking threads), the S3 client is async:
//! each call runs on a small runtime of this backend's own and the caller waits for it, so a call
//! never needs to know which runtime (if any) it was made from.
//!
//! What S3 does differently from files: a PUT is whole or nothing and durable when acknowledged,
//! so [`Blobs::sync`] has nothing to do; there is no "touch", so refreshing an object's time (a
//! chunk an upload relies on, [`cardeploy_chunks::Store::hold`]) writes it again.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use cardeploy_chunks::blobs::{Blobs, Listed};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};

use crate::Error;
use crate::config::ObjectStoreConfig;

pub(crate) struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket: empty, or ending with `/`.
    prefix: String,
    location: String,
    /// Taken (and shut down without waiting) when the backend is dropped, wherever that is.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for S3Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Blobs")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Blobs {
    /// Connect to the bucket in `config` and check it answers (a listing of nothing), so a
    /// wrong endpoint, bucket or key is found when the twin starts, not at the first upload.
    pub fn connect(config: &ObjectStoreConfig) -> Result<Self, Error> {
        let bad = |why: String| Error::ObjectStore {
            location: config.url.clone(),
            why,
        };
        let (bucket, prefix) = config.bucket_and_prefix().map_err(bad)?;
        // Credentials and region from the environment (AWS_ACCESS_KEY_ID, …) unless the
        // configuration names them.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_allow_http(config.allow_http);
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        // object_store's HTTP client is rustls without a provider of its own: the ring one, as
        // everywhere in the twin (an error means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cardeploy-s3")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start its client: {e}")))?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.trim_end_matches('/'))
        };
        let blobs = Self {
            store: Arc::new(store),
            location: format!("s3://{bucket}/{prefix}"),
            prefix,
            runtime: Some(runtime),
        };
        blobs
            .list("keep/")
            .map_err(|e| bad(format!("the bucket does not answer: {e}")))?;
        Ok(blobs)
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{key}", self.prefix))
    }

    /// Run `future` on this backend's runtime and wait for it.
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let Some(runtime) = &self.runtime else {
            return Err(other("the object store client has stopped"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .map_err(|_| other("the object store client stopped during a request"))?
    }
}

impl Blobs for S3Blobs {
    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move {
            match store.get_opts(&path, GetOptions::default()).await {
                Ok(found) => Ok(Some(found.bytes().await.map_err(other)?.to_vec())),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(other(e)),
            }
        })
    }

    fn get_range(&self, key: &str, offset: u64, max: u64) -> io::Result<Option<(Vec<u8>, u64)>> {
        let Some(stat) = self.stat(key)? else {
            return Ok(None);
        };
        let end = stat.size.min(offset.saturating_add(max));
        if offset >= end {
            return Ok(Some((Vec::new(), stat.size)));
        }
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move {
            let options = GetOptions::default().with_range(Some(offset..end));
            match store.get_opts(&path, options).await {
                Ok(found) => Ok(Some((
                    found.bytes().await.map_err(other)?.to_vec(),
                    stat.size,
                ))),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(other(e)),
            }
        })
    }

    fn put(&self, key: &str, bytes: &[u8], _durable: bool) -> io::Result<()> {
        let (store, path) = (self.store.clone(), self.path(key));
        let payload = PutPayload::from(bytes.to_vec());
        self.run(async move {
            store
                .put_opts(&path, payload, PutOptions::default())
                .await
                .map_err(other)?;
            Ok(())
        })
    }

    fn stat(&self, key: &str) -> io::Result<Option<Listed>> {
        let (store, path, key) = (self.store.clone(), self.path(key), key.to_owned());
        self.run(async move {
            match store
                .get_opts(&path, GetOptions::default().with_head(true))
                .await
                .map(|found| found.meta)
            {
                Ok(meta) => Ok(Some(Listed {
                    key,
                    modified: SystemTime::from(meta.last_modified),
                    size: meta.size,
                })),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(other(e)),
            }
        })
    }

    fn touch(&self, key: &str) -> io::Result<bool> {
        match self.get(key)? {
            Some(bytes) => self.put(key, &bytes, true).map(|()| true),
            None => Ok(false),
        }
    }

    /// One PUT: a touch here would download the object only to upload the same bytes.
    fn put_fresh(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.put(key, bytes, true)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move {
            let one = futures::stream::once(async move { Ok(path) }).boxed();
            let deleted: Vec<_> = store.delete_stream(one).collect().await;
            match deleted.into_iter().next() {
                Some(Err(e)) if !is_not_found(&e) => Err(other(e)),
                _ => Ok(()),
            }
        })
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        // object_store lists by whole path segments: list the prefix's directory, keep what
        // starts with the prefix.
        let full = format!("{}{prefix}", self.prefix);
        let dir = full.rsplit_once('/').map_or("", |(dir, _)| dir).to_owned();
        let (store, ours) = (self.store.clone(), self.prefix.clone());
        self.run(async move {
            let under = (!dir.is_empty()).then(|| ObjectPath::from(dir));
            let metas: Vec<object_store::ObjectMeta> = store
                .list(under.as_ref())
                .try_collect()
                .await
                .map_err(other)?;
            Ok(metas
                .into_iter()
                .filter_map(|meta| {
                    let location = meta.location.as_ref();
                    if !location.starts_with(&full) {
                        return None;
                    }
                    Some(Listed {
                        key: location[ours.len()..].to_owned(),
                        modified: SystemTime::from(meta.last_modified),
                        size: meta.size,
                    })
                })
                .collect())
        })
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use cardeploy_chunks::{ChunkIndex, Digest, Params, Store, chunk_reader};

    use super::*;
    use crate::artifacts::cache::{DeltaCache, Entry, Grade, Key};

    fn in_bucket(endpoint: &str, bucket: &str, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            url: format!("s3://{bucket}/{prefix}"),
            endpoint: Some(endpoint.to_owned()),
            region: Some("us-east-1".into()),
            access_key_id: Some(cardeploy_testkit::s3::ACCESS_KEY.into()),
            secret_access_key: Some(cardeploy_testkit::s3::SECRET_KEY.into()),
            allow_http: true,
        }
    }

    /// The store's objects on each backend the run has: files always, a bucket of its own on
    /// the S3-compatible server when the test command runs one (`CARDEPLOY_S3_ENDPOINT`).
    fn each() -> Vec<(&'static str, Arc<dyn Blobs>, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let files: Arc<dyn Blobs> =
            Arc::new(cardeploy_chunks::blobs::FsBlobs::open(dir.path()).unwrap());
        let mut all = vec![("files", files, Some(dir))];
        if let Some(endpoint) = cardeploy_testkit::s3::endpoint() {
            let bucket = cardeploy_testkit::s3::fresh_bucket(&endpoint).unwrap();
            let s3 = S3Blobs::connect(&in_bucket(&endpoint, &bucket, "fleet-1")).unwrap();
            all.push(("S3", Arc::new(s3), None));
        }
        all
    }

    /// An artifact's chunks and index, cut small so there are several.
    fn artifact(seed: u8) -> (ChunkIndex, Vec<(Digest, Vec<u8>)>) {
        let data: Vec<u8> = (0..2_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect();
        let mut chunks = Vec::new();
        let index = chunk_reader(&data[..], Params::DEFAULT, |cut| {
            chunks.push((cut.id, cut.data.to_vec()));
            Ok(())
        })
        .unwrap();
        (index, chunks)
    }

    #[test]
    fn the_chunk_store_works_alike_on_files_and_in_a_bucket() {
        for (on, blobs, _dir) in each() {
            let store = Store::with_blobs(blobs);
            let (index, chunks) = artifact(1);
            assert!(chunks.len() > 1, "{on}");
            for (id, data) in &chunks[1..] {
                store.put_raw(id, data).unwrap();
            }
            let (first, data) = &chunks[0];
            let frame = zstd::bulk::compress(data, 3).unwrap();
            assert_eq!(
                store.put_compressed_durable(first, &frame).unwrap(),
                *data,
                "{on}"
            );
            assert!(
                store.put_compressed(first, b"not zstd").is_err(),
                "{on}: checked"
            );
            for (id, data) in &chunks {
                assert!(store.has(id), "{on}");
                assert_eq!(store.get(id).unwrap(), *data, "{on}");
            }
            assert_eq!(store.get_both(first).unwrap().0, frame, "{on}: as it came");
            let missing = Digest::of(b"never stored");
            assert!(!store.has(&missing), "{on}");
            assert!(
                matches!(
                    store.get(&missing),
                    Err(cardeploy_chunks::Error::ChunkMissing(_))
                ),
                "{on}"
            );
            assert!(store.hold(first, Duration::from_secs(60)).unwrap(), "{on}");
            assert!(
                !store.hold(&missing, Duration::from_secs(60)).unwrap(),
                "{on}"
            );

            let id = store.put_index_durable(&index).unwrap();
            assert!(store.has_index(&id), "{on}");
            assert_eq!(store.get_index(&id, u64::MAX).unwrap(), index, "{on}");
            assert_eq!(
                Digest::of(&store.index_bytes(&id).unwrap()),
                id,
                "{on}: verified"
            );
            assert!(store.index_modified(&id).is_ok(), "{on}");
            store.keep("os@1.0.0", &id).unwrap();
            assert_eq!(store.kept().unwrap(), vec![("os@1.0.0".into(), id)], "{on}");

            // One more chunk no index names: gc takes it, and only it.
            let stray = Digest::of(b"stray");
            store.put_raw(&stray, b"stray").unwrap();
            let before = store.stats().unwrap();
            assert_eq!(before.chunks, chunks.len() as u64 + 1, "{on}");
            let removed = store.gc(u64::MAX).unwrap();
            assert_eq!(removed.chunks, 1, "{on}");
            assert!(!store.has(&stray), "{on}");
            assert!(store.has(first), "{on}: kept");
            // Unpinned, everything goes; a grace period spares what is young.
            store.unkeep("os@1.0.0").unwrap();
            assert_eq!(
                store
                    .gc_older_than(u64::MAX, Duration::from_secs(3600))
                    .unwrap()
                    .chunks,
                0,
                "{on}"
            );
            assert_eq!(
                store.gc(u64::MAX).unwrap().chunks,
                chunks.len() as u64,
                "{on}"
            );
            assert!(!store.has_index(&id), "{on}");
        }
    }

    #[test]
    fn a_corrupt_chunk_is_set_aside_and_reported_not_served() {
        for (on, blobs, _dir) in each() {
            let store = Store::with_blobs(blobs.clone());
            let id = Digest::of(b"the real chunk");
            let key = format!("chunks/{}/{}", &id.hex()[..2], id.hex());
            blobs
                .put(
                    &key,
                    &zstd::bulk::compress(b"something else", 3).unwrap(),
                    true,
                )
                .unwrap();
            let err = store.get(&id).unwrap_err();
            assert!(
                matches!(err, cardeploy_chunks::Error::StoreCorrupt { .. }),
                "{on}: {err}"
            );
            assert!(!store.has(&id), "{on}: fetched again next time");
            assert!(
                blobs
                    .stat(&format!("corrupt/{}", id.hex()))
                    .unwrap()
                    .is_some(),
                "{on}: kept for inspection"
            );
        }
    }

    #[test]
    fn the_delta_cache_lives_beside_the_chunks() {
        let key = |target: u8, position| Key {
            target: Digest::of(&[target]),
            base: Digest::of(&[9]),
            position,
        };
        for (on, blobs, _dir) in each() {
            let cache = DeltaCache::open(blobs.clone(), 1 << 20).unwrap();
            cache
                .put(&key(1, 0), &Entry::Frame(vec![1; 30]), Grade::Trial)
                .unwrap();
            cache
                .put(&key(1, 0), &Entry::Frame(vec![2; 10]), Grade::Full)
                .unwrap();
            cache.put(&key(2, 3), &Entry::Whole, Grade::Full).unwrap();
            assert_eq!(
                cache.get(&key(1, 0)),
                Some((Entry::Frame(vec![2; 10]), Grade::Full)),
                "{on}"
            );
            assert_eq!(cache.bytes(), 11, "{on}");
            // Opened again (another instance, or after a restart): the same entries counted.
            let again = DeltaCache::open(blobs.clone(), 1 << 20).unwrap();
            assert_eq!(again.bytes(), 11, "{on}");
            assert_eq!(
                again.get(&key(2, 3)),
                Some((Entry::Whole, Grade::Full)),
                "{on}"
            );
            let gone = Digest::of(&[2]);
            assert_eq!(again.retain(|d| *d != gone), 1, "{on}");
            assert_eq!(again.get(&key(2, 3)), None, "{on}");
            again.discard(&key(1, 0));
            assert_eq!(again.bytes(), 0, "{on}");
        }
    }

    #[test]
    fn a_bucket_that_does_not_answer_is_an_error_at_start_that_names_it() {
        let Some(endpoint) = cardeploy_testkit::s3::endpoint() else {
            return;
        };
        let err = S3Blobs::connect(&in_bucket(&endpoint, "no-such-bucket-here", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://no-such-bucket-here"), "{err}");
        let bad = ObjectStoreConfig {
            url: "bucket-without-scheme".into(),
            ..in_bucket(&endpoint, "x", "")
        };
        let err = S3Blobs::connect(&bad).unwrap_err().to_string();
        assert!(err.contains("s3://bucket"), "{err}");
    }
}
