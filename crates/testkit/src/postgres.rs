//! Fresh PostgreSQL databases for the twin's tests on PostgreSQL. `cargo xtask test` starts a
//! server of its own and names it in `CARDEPLOY_POSTGRES_URL`; each test takes a new, empty
//! database on it, so tests never see each other's rows.

use sqlx::Connection;

/// The server's admin URL from `CARDEPLOY_POSTGRES_URL`. Under `CI` a missing one fails the
/// test; by hand it is `None` and the caller skips its PostgreSQL half, loudly.
pub fn server() -> Option<String> {
    match std::env::var("CARDEPLOY_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            crate::cannot_run(
                "the PostgreSQL half of this test",
                "CARDEPLOY_POSTGRES_URL, a PostgreSQL server's postgres:// URL (cargo xtask test starts one)",
            );
            None
        }
    }
}

/// A new, empty database on the server at `admin` (a URL whose user may create databases);
/// returns its URL.
pub async fn fresh_database(admin: &str) -> anyhow::Result<String> {
    let name = crate::unique_name("cardeploy_test", '_');
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
