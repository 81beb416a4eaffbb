//! Fresh PostgreSQL databases for the twin's tests on PostgreSQL. `cargo xtask test` starts a
//! server of its own and names it in `CARDEPLOY_POSTGRES_URL`; each test takes a new, empty
//! database on it, so tests never see each other's rows.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::Connection;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The server's admin URL from `CARDEPLOY_POSTGRES_URL`. Under `CI` a missing one fails the
/// test; by hand it is `None` and the caller skips its PostgreSQL half, loudly.
pub fn server() -> Option<String> {
    match std::env::var("CARDEPLOY_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if ci() => panic!(
            "CI is set but CARDEPLOY_POSTGRES_URL is not: the database tests must run on PostgreSQL too (cargo xtask test starts one)"
        ),
        _ => {
            eprintln!(
                "SKIPPED on PostgreSQL: set CARDEPLOY_POSTGRES_URL to a server's postgres:// URL (cargo xtask test starts one)"
            );
            None
        }
    }
}

/// A new, empty database on the server at `admin` (a URL whose user may create databases);
/// returns its URL.
pub async fn fresh_database(admin: &str) -> anyhow::Result<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "cardeploy_test_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await?;
    conn.close().await?;
    let (server, _) = admin
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("{admin}: expected postgres://…/database"))?;
    Ok(format!("{server}/{name}"))
}

/// [`fresh_database`] from code that is not async (test set-up): on a thread of its own.
pub fn fresh_database_blocking(admin: &str) -> anyhow::Result<String> {
    let admin = admin.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(fresh_database(&admin))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("creating a database panicked"))?
}
