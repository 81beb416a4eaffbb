//! A small blocking client of the twin's operator REST API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The twin's operator API.
    #[arg(
        long,
        env = "CARDEPLOY_API",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    pub api: String,
    /// Operator token (see <data>/operator.token on the twin).
    #[arg(long, env = "CARDEPLOY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Read the operator token from this file instead.
    #[arg(long, env = "CARDEPLOY_TOKEN_FILE", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// The twin answered with an error status. Kept as a type so a command can add a hint for the
/// statuses it expects (`err.downcast_ref::<HttpError>()`).
#[derive(Debug)]
pub struct HttpError {
    pub what: String,
    pub status: u16,
    /// The twin's `{"error": "..."}` text, or the raw body.
    pub message: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = ureq::http::StatusCode::from_u16(self.status)
            .map_or_else(|_| self.status.to_string(), |s| s.to_string());
        write!(f, "{}: {status}: {}", self.what, self.message)
    }
}

impl std::error::Error for HttpError {}

/// Append to `e` what to do about it, if the twin answered with one of the statuses in `hints`.
pub fn with_hint(e: anyhow::Error, hints: &[(u16, &str)]) -> anyhow::Error {
    let status = e.downcast_ref::<HttpError>().map(|h| h.status);
    match hints.iter().find(|(s, _)| Some(*s) == status) {
        Some((_, hint)) => anyhow::anyhow!("{e:#}\n  {hint}"),
        None => e,
    }
}

pub struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Self> {
        let token = match (&args.token, &args.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => crate::files::read_to_string(file)
                .context("reading the operator token")?
                .trim()
                .to_owned(),
            (None, None) => bail!(
                "no operator token: pass --token-file <twin data>/operator.token (or set CARDEPLOY_TOKEN)"
            ),
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Ok(Self {
            base: args.api.trim_end_matches('/').to_owned(),
            token,
            agent,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response =
            response.with_context(|| format!("{what}: cannot reach the twin at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return response
                .body_mut()
                .read_json()
                .with_context(|| format!("{what}: unreadable answer"));
        }
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| format!("(its answer could not be read: {e})"));
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(body);
        Err(HttpError {
            what: what.to_owned(),
            status: status.as_u16(),
            message,
        }
        .into())
    }

    pub fn get<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        let response = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(what, response)
    }

    pub fn delete<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        let response = self
            .agent
            .delete(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(what, response)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(what, self.agent.post(self.url(path)), body)
    }

    pub fn put<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(what, self.agent.put(self.url(path)), body)
    }

    /// PUT raw bytes (chunks, indexes).
    pub fn put_bytes<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<T> {
        self.finish(what, self.put_raw(path, body))
    }

    /// PUT raw bytes. Uploads are what a twin limits (429 when it serves as many as it takes
    /// at once, 503 when it is restarting): those answers are retried with backoff, the twin's
    /// `Retry-After` respected, until [`UPLOAD_RETRIES`] tries are spent.
    fn put_raw(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut attempt = 0;
        loop {
            let response = self
                .agent
                .put(self.url(path))
                .header("Authorization", format!("Bearer {}", self.token))
                .header("Content-Type", "application/octet-stream")
                .send(body)?;
            let busy = matches!(response.status().as_u16(), 429 | 503);
            if !busy || attempt == UPLOAD_RETRIES {
                return Ok(response);
            }
            let retry_after = response
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            std::thread::sleep(retry_delay(attempt, retry_after, fastrand::f64()));
            attempt += 1;
        }
    }

    /// PUT raw bytes where the answer carries nothing we need.
    pub fn put_bytes_unit(&self, what: &str, path: &str, body: &[u8]) -> anyhow::Result<()> {
        let response = self.put_raw(path, body);
        let mut response =
            response.with_context(|| format!("{what}: cannot reach the twin at {}", self.base))?;
        if response.status().is_success() {
            return Ok(());
        }
        let status = response.status();
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| format!("(its answer could not be read: {e})"));
        bail!("{what}: {status}: {body}")
    }

    fn send<T: DeserializeOwned>(
        &self,
        what: &str,
        request: ureq::RequestBuilder<ureq::typestate::WithBody>,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let response = request
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(what, response)
    }
}

/// Tries after the first that a busy twin gets (about a minute of waiting in all).
pub const UPLOAD_RETRIES: u32 = 10;

/// How long to wait before try `attempt + 1`: exponential from 250 ms, capped at 8 s, with
/// `jitter` (0..1) spreading the second half so that parallel uploaders do not come back in step;
/// never sooner than the twin's `Retry-After`.
pub fn retry_delay(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let base = Duration::from_millis(250)
        .saturating_mul(1 << attempt.min(5))
        .min(Duration::from_secs(8));
    let spread = base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    spread.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_jitter_and_honour_retry_after() {
        let ms = |attempt, jitter| retry_delay(attempt, None, jitter).as_millis();
        assert_eq!((ms(0, 0.0), ms(0, 1.0)), (125, 250));
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (250, 500));
        assert_eq!((ms(4, 0.0), ms(4, 1.0)), (2000, 4000));
        assert_eq!(ms(5, 1.0), 8000, "capped");
        assert_eq!(ms(9, 1.0), 8000, "stays capped");
        let told = Some(Duration::from_secs(3));
        assert_eq!(retry_delay(0, told, 1.0), Duration::from_secs(3));
        assert_eq!(retry_delay(5, told, 1.0), Duration::from_secs(8));
    }
}
