use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking to RAUC. Each message says what happened and what to
/// check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot connect to the D-Bus bus at {address}: {source} (is dbus running, and is DBUS_SYSTEM_BUS_ADDRESS right?)"
    )]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("RAUC (de.pengutronix.rauc) is not on the system bus: is rauc.service running?")]
    NoService,
    #[error("RAUC {method} failed: {source}")]
    Call {
        method: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("bundle path {path}: {why}")]
    BundlePath { path: PathBuf, why: String },
    #[error("RAUC could not install the bundle (result {code}): {last_error}")]
    InstallFailed { code: i32, last_error: String },
    #[error(
        "RAUC left the bus while it was working (it crashed or was stopped); the slot it was writing is in an unknown state: read RAUC's log, then install again"
    )]
    ServiceGone,
    #[error(
        "RAUC did not finish within {after:?}; it may still be working (see its Operation property)"
    )]
    Timeout { after: Duration },
    #[error(
        "RAUC is busy with another operation; an installation is refused rather than queued, try again when Operation is idle"
    )]
    Busy,
    #[error("unexpected data from RAUC in {what}: {why}")]
    Decode { what: String, why: String },
}

/// The fragment RAUC 1.8 puts in its error reply to any method while an installation runs.
const BUSY_REPLY: &str = "already processing a different method";

impl Error {
    /// Classifies an error of a D-Bus method call or property read.
    pub(crate) fn from_call(method: &'static str, source: zbus::Error) -> Self {
        use zbus::fdo::Error as Fdo;
        match &source {
            zbus::Error::FDO(fdo) => match fdo.as_ref() {
                Fdo::ZBus(inner) => Self::from_call(method, inner.clone()),
                Fdo::ServiceUnknown(_) | Fdo::NameHasNoOwner(_) => Self::NoService,
                // The service died between receiving the call and replying.
                Fdo::NoReply(_) | Fdo::Disconnected(_) => Self::ServiceGone,
                Fdo::Failed(msg) if is_busy(msg) => Self::Busy,
                _ => Self::Call { method, source },
            },
            zbus::Error::MethodError(_, Some(msg), _) if is_busy(msg) => Self::Busy,
            zbus::Error::IncorrectType
            | zbus::Error::SignatureMismatch(..)
            | zbus::Error::Utf8(_)
            | zbus::Error::Failure(_) => Self::Decode {
                what: method.to_owned(),
                why: source.to_string(),
            },
            _ => Self::Call { method, source },
        }
    }
}

fn is_busy(msg: &str) -> bool {
    msg.to_ascii_lowercase().contains(BUSY_REPLY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_replies_are_recognised_in_either_case() {
        assert!(is_busy("Already processing a different method"));
        assert!(is_busy("already processing a different method"));
        assert!(!is_busy("Unsupported key: transaction-id"));
    }

    #[test]
    fn an_unknown_service_is_no_service() {
        let e = Error::from_call(
            "GetPrimary",
            zbus::Error::FDO(Box::new(zbus::fdo::Error::ServiceUnknown("x".into()))),
        );
        assert!(matches!(e, Error::NoService), "{e:?}");
    }

    #[test]
    fn a_wrong_type_is_a_decode_error_naming_what() {
        let e = Error::from_call("Progress", zbus::Error::IncorrectType);
        assert!(
            matches!(&e, Error::Decode { what, .. } if what == "Progress"),
            "{e:?}"
        );
    }
}
