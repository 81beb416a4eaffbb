//! Installing a bundle and waiting for RAUC to finish.
//!
//! RAUC 1.8 answers `InstallBundle` as soon as its install thread runs; the outcome comes later
//! as the `Completed(i)` signal, and `Operation` goes back to `idle` around the same time. Which of
//! the two reaches a client first is not fixed, so the wait ends only when both have been seen.
//!
//! Signals from before our call must not end the wait (a `Completed` or an `idle` of an
//! installation that ended just as we subscribed). RAUC sends them from one connection, so their
//! serial numbers are ordered with the serial of its reply to our `InstallBundle`: `Completed` and
//! `Operation` changes with a serial below the reply's are ignored. Progress is not filtered that
//! way: RAUC's install thread may publish its first progress before the reply goes out.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::Instrument;
use zbus::Variant;

use crate::proxy::INTERFACE;
use crate::{Error, InstallArgs, Progress, Rauc, bundle_source};

impl Rauc {
    /// Installs `bundle` and waits until RAUC has finished: both the `Completed` signal arrived
    /// and `Operation` is back at `idle`. `on_progress` sees every `Progress` change on the way.
    ///
    /// Refuses with [`Error::Busy`] if an installation already runs. A failed installation is
    /// [`Error::InstallFailed`] with RAUC's `LastError`; RAUC leaving the bus (crash, stop) or
    /// this connection closing is [`Error::ServiceGone`]; `deadline` bounds the whole call
    /// ([`Error::Timeout`]; RAUC may then still be installing).
    pub async fn install(
        &self,
        bundle: &Path,
        args: &InstallArgs,
        deadline: Duration,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<(), Error> {
        let source = bundle_source(bundle)?;
        let span = tracing::info_span!(
            "rauc_install",
            bundle = %source,
            transaction = args.transaction_id.as_deref().unwrap_or("-"),
        );
        let started = Instant::now();
        let run = self.install_and_wait(&source, args, &mut on_progress);
        let outcome = match tokio::time::timeout(deadline, run.instrument(span.clone())).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout { after: deadline }),
        };
        span.in_scope(|| match &outcome {
            Ok(()) => tracing::info!(took = ?started.elapsed(), "installed"),
            Err(e) => tracing::warn!(took = ?started.elapsed(), error = %e, "install failed"),
        });
        outcome
    }

    async fn install_and_wait<F: FnMut(&Progress)>(
        &self,
        source: &str,
        args: &InstallArgs,
        on_progress: &mut F,
    ) -> Result<(), Error> {
        // Subscribe before anything can happen, so nothing is missed.
        let subscribing = |e| Error::from_call("subscribing to RAUC's signals", e);
        let mut owner = self
            .installer
            .inner()
            .receive_owner_changed()
            .await
            .map_err(subscribing)?;
        let mut completed = self
            .installer
            .receive_completed()
            .await
            .map_err(subscribing)?;
        let mut changes = self
            .properties
            .receive_properties_changed()
            .await
            .map_err(subscribing)?;

        // Refuse rather than queue: RAUC itself would refuse too, with a less telling message.
        if self.operation().await? != "idle" {
            return Err(Error::Busy);
        }

        // Only keys RAUC 1.8 knows: it refuses the whole call on an unknown one.
        let mut options: HashMap<&str, Variant<'_>> = HashMap::new();
        if args.ignore_compatible {
            options.insert("ignore-compatible", Variant::Bool(true));
        }
        let reply = self
            .installer
            .inner()
            .call_method("InstallBundle", &(source, &options))
            .await
            .map_err(|e| Error::from_call("InstallBundle", e))?;
        let reply_serial = reply.primary_header().serial_num();
        tracing::debug!(%reply_serial, "RAUC accepted the bundle");

        let mut result: Option<i32> = None;
        let mut idle = false;
        let code = loop {
            if let Some(code) = result
                && idle
            {
                break code;
            }
            tokio::select! {
                // Progress first, so a last `100` queued before `Completed` is still reported.
                biased;
                change = changes.next() => {
                    let Some(change) = change else {
                        return Err(Error::ServiceGone);
                    };
                    let ours = change.message().primary_header().serial_num() > reply_serial;
                    let args = change.args().map_err(|e| decode("PropertiesChanged", e))?;
                    if args.interface_name().as_str() != INTERFACE {
                        continue;
                    }
                    for (name, value) in args.changed_properties() {
                        match *name {
                            // Progress only informs: an odd one is logged, not fatal to a
                            // wait whose outcome RAUC reports separately.
                            "Progress" => match progress_from(value) {
                                Ok(progress) => on_progress(&progress),
                                Err(e) => tracing::warn!(error = %e, "skipping a Progress change"),
                            },
                            "Operation" if ours => {
                                let op = <&str>::try_from(value)
                                    .map_err(|e| decode("Operation property", e))?;
                                idle = op == "idle";
                            }
                            _ => {}
                        }
                    }
                }
                signal = completed.next() => {
                    let Some(signal) = signal else {
                        return Err(Error::ServiceGone);
                    };
                    if signal.message().primary_header().serial_num() < reply_serial {
                        tracing::debug!("ignoring a Completed of an earlier installation");
                        continue;
                    }
                    let code = signal.args().map_err(|e| decode("Completed signal", e))?.result;
                    tracing::debug!(code, idle, "Completed");
                    result = Some(code);
                    // `idle` may have been published before this signal: ask.
                    if !idle {
                        idle = match self.operation().await {
                            Ok(op) => op == "idle",
                            // Gone between its signal and our question.
                            Err(Error::NoService) => return Err(Error::ServiceGone),
                            Err(e) => return Err(e),
                        };
                    }
                }
                // Any change of owner means the RAUC we talked to is gone (a new owner would be a
                // restarted RAUC, which knows nothing of this installation); the stream ending
                // means our connection closed.
                _ = owner.next() => return Err(Error::ServiceGone),
            }
        };
        if code == 0 {
            return Ok(());
        }
        let last_error = match self.last_error().await {
            Ok(message) => message,
            Err(e) => format!("(RAUC's LastError could not be read: {e})"),
        };
        Err(Error::InstallFailed { code, last_error })
    }
}

fn decode(what: &str, e: zbus::Error) -> Error {
    Error::Decode {
        what: what.to_owned(),
        why: e.to_string(),
    }
}

/// `Progress` is `(isi)`: percentage, message, nesting depth.
fn progress_from(value: &Variant<'_>) -> Result<Progress, Error> {
    if let Variant::Structure(s) = value
        && let [
            Variant::I32(percentage),
            Variant::Str(message),
            Variant::I32(depth),
        ] = s.fields()
    {
        return Ok(Progress {
            percentage: *percentage,
            message: message.to_string(),
            depth: *depth,
        });
    }
    Err(Error::Decode {
        what: "Progress property".to_owned(),
        why: format!("expected (isi), got {}", value.value_signature()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_decodes_from_its_structure() {
        let v = Variant::from(zbus::Structure::from((40, "Checking bundle done.", 2)));
        assert_eq!(
            progress_from(&v).unwrap(),
            Progress {
                percentage: 40,
                message: "Checking bundle done.".into(),
                depth: 2
            }
        );
    }

    #[test]
    fn progress_of_another_shape_is_a_decode_error() {
        let v = Variant::from(zbus::Structure::from((40u32, "x", 2)));
        assert!(matches!(progress_from(&v), Err(Error::Decode { .. })));
        assert!(matches!(
            progress_from(&Variant::from(7)),
            Err(Error::Decode { .. })
        ));
    }
}
