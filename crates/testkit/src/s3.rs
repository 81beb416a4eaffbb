//! Fresh buckets on the S3-compatible server the test command runs (moto's server, named in
//! `CARDEPLOY_S3_ENDPOINT`), for the twin's chunk store in object storage. Each test takes a
//! bucket of its own.

/// Credentials the test server accepts (it checks none; the client signs with these anyway).
pub const ACCESS_KEY: &str = "cardeploy-test";
pub const SECRET_KEY: &str = "cardeploy-test-secret";

/// The server's endpoint from `CARDEPLOY_S3_ENDPOINT`. Under `CI` a missing one fails the test;
/// by hand it is `None` and the caller skips its object-storage half, loudly.
pub fn endpoint() -> Option<String> {
    match std::env::var("CARDEPLOY_S3_ENDPOINT") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            crate::cannot_run(
                "the object-storage half of this test",
                "CARDEPLOY_S3_ENDPOINT, an S3-compatible server's http:// URL (cargo xtask test starts one)",
            );
            None
        }
    }
}

/// A new, empty bucket on the server at `endpoint`; returns its name.
pub fn fresh_bucket(endpoint: &str) -> anyhow::Result<String> {
    let bucket = crate::unique_name("cardeploy-test", '-');
    // CreateBucket is a PUT on the bucket's path (path-style addressing).
    let response = crate::procs::http()
        .put(&format!("{}/{bucket}", endpoint.trim_end_matches('/')))
        .send_empty()?;
    anyhow::ensure!(
        response.status().is_success(),
        "creating bucket {bucket} on {endpoint}: HTTP {}",
        response.status()
    );
    Ok(bucket)
}
