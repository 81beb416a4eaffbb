//! systemd's notify protocol (sd_notify(3)), so that a unit with `Type=notify` and `WatchdogSec=`
//! knows when the agent is up, that it is still alive, and when it is stopping.
//!
//! Written by hand instead of taking the `sd-notify` crate: the protocol is one datagram of
//! `KEY=VALUE` lines per state change, sent to the socket `$NOTIFY_SOCKET` names (a path, or an
//! abstract socket when it starts with `@`). std's `UnixDatagram` does that in about forty lines;
//! a crate for them would be one more dependency on the car to audit and update.
//!
//! What the agent sends:
//! - `READY=1` (with a `STATUS=`) once it has loaded its configuration and state and started its
//!   tasks, before the twin is reached: the car must work offline;
//! - `STATUS=` when the connection to the twin comes or goes;
//! - `WATCHDOG=1` every `$WATCHDOG_USEC / 2`, when systemd asks for a watchdog
//!   (`$WATCHDOG_PID` unset or this process, as `sd_watchdog_enabled` decides);
//! - `STOPPING=1` when shutdown begins (SIGTERM).
//!
//! Without `$NOTIFY_SOCKET` (busybox init in the qemu image, tests, a shell) every call does
//! nothing. Nothing here is fatal: a bad watchdog variable is a warning and no pings, and of the
//! send errors only the first is a warning (the rest are debug, so a gone socket does not flood
//! the journal).

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The shortest ping interval: `WATCHDOG_USEC=1` would otherwise make the ping task spin.
const MIN_PING: Duration = Duration::from_millis(1);

/// What `$WATCHDOG_USEC` and `$WATCHDOG_PID` ask of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchdogEnv {
    /// `WATCHDOG_USEC` is unset: the unit has no watchdog.
    Off,
    /// `WATCHDOG_PID` names another process: the watchdog is someone else's (we inherited the
    /// variables from a parent that systemd watches).
    OtherProcess { pid: u32 },
    /// Send `WATCHDOG=1` every `interval` (half the timeout, as sd_watchdog_enabled(3) advises).
    Ping { interval: Duration },
    /// A variable that is not what systemd writes: warn, and no watchdog.
    Invalid {
        variable: &'static str,
        value: String,
        why: &'static str,
    },
}

impl WatchdogEnv {
    /// Decide from the variables' values, as `sd_watchdog_enabled` does: the timeout first, then
    /// the pid. Pure, so tests need not touch the process environment.
    pub fn from_vars(usec: Option<&OsStr>, pid: Option<&OsStr>, our_pid: u32) -> Self {
        let Some(usec) = usec else {
            return Self::Off;
        };
        let timeout = match decimal(usec) {
            Some(0) => {
                return Self::invalid("WATCHDOG_USEC", usec, "a timeout of zero");
            }
            Some(usec) => usec,
            None => {
                return Self::invalid("WATCHDOG_USEC", usec, "not a number of microseconds");
            }
        };
        if let Some(pid) = pid {
            match decimal(pid).map(u32::try_from) {
                Some(Ok(pid)) if pid != 0 => {
                    if pid != our_pid {
                        return Self::OtherProcess { pid };
                    }
                }
                _ => return Self::invalid("WATCHDOG_PID", pid, "not a process id"),
            }
        }
        Self::Ping {
            interval: Duration::from_micros(timeout / 2).max(MIN_PING),
        }
    }

    /// From this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::var_os("WATCHDOG_USEC").as_deref(),
            std::env::var_os("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    fn invalid(variable: &'static str, value: &OsStr, why: &'static str) -> Self {
        Self::Invalid {
            variable,
            value: value.to_string_lossy().into_owned(),
            why,
        }
    }
}

/// Only ASCII digits (no sign, no blanks), as systemd writes them.
fn decimal(value: &OsStr) -> Option<u64> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The agent's line to systemd; cheap to clone. Does nothing when systemd did not ask.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    socket: Option<Arc<Socket>>,
    /// The ping interval, when the watchdog is on.
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Socket {
    socket: UnixDatagram,
    to: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    name: String,
    /// A send failed before: later failures are logged at debug level only.
    failed: AtomicBool,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. Problems are warnings: the
    /// agent runs on without telling systemd.
    pub fn from_env() -> Self {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::default();
        };
        Self::new(&name, WatchdogEnv::from_env())
    }

    /// Notify the socket `name` (a path, or `@` and an abstract name); ping as `watchdog` says.
    pub fn new(name: &OsStr, watchdog: WatchdogEnv) -> Self {
        let socket = match Socket::open(name) {
            Ok(socket) => socket,
            Err(why) => {
                tracing::warn!(
                    "NOTIFY_SOCKET={}: {why}; not notifying systemd",
                    name.to_string_lossy()
                );
                return Self::default();
            }
        };
        let watchdog = match watchdog {
            WatchdogEnv::Ping { interval } => Some(interval),
            WatchdogEnv::Off | WatchdogEnv::OtherProcess { .. } => None,
            WatchdogEnv::Invalid {
                variable,
                value,
                why,
            } => {
                tracing::warn!(
                    "{variable}={value:?} is {why}; no watchdog pings (check WatchdogSec= in the unit)"
                );
                None
            }
        };
        Self {
            socket: Some(Arc::new(socket)),
            watchdog,
        }
    }

    /// Startup is complete; `status` says what the agent does now.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// Shutdown has begun: systemd shows the unit as deactivating and expects the exit.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// The ping interval, when the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        // Only set together with the socket (see `new`).
        self.watchdog
    }

    /// Start pinging, when systemd asked for it; the pings stop when the returned guard drops.
    /// Call on the agent's runtime.
    pub fn start_watchdog(&self) -> Option<Watchdog> {
        let interval = self.watchdog_interval()?;
        let notifier = self.clone();
        tracing::info!(?interval, "systemd watchdog on");
        // The pings come from a task on the agent's own runtime, not from a thread of their own:
        // if that runtime is wedged (a blocking call on its thread, a task that never yields),
        // the pings stop and systemd restarts the agent. That is what the watchdog is for; a
        // separate thread would keep pinging for a dead agent.
        Some(Watchdog(tokio::spawn(async move {
            loop {
                notifier.send("WATCHDOG=1");
                tokio::time::sleep(interval).await;
            }
        })))
    }

    fn send(&self, message: &str) {
        if let Some(socket) = &self.socket {
            socket.send(message);
        }
    }
}

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
enum SocketError {
    #[error("not an absolute path or an @abstract socket (the forms this agent speaks)")]
    Form,
    #[error("not a usable socket address: {0}")]
    Address(#[source] std::io::Error),
    #[error("cannot make a non-blocking datagram socket: {0}")]
    Socket(#[source] std::io::Error),
}

/// The watchdog ping task; aborted when dropped, so it never outlives `run`.
#[derive(Debug)]
pub struct Watchdog(tokio::task::JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Socket {
    fn open(name: &OsStr) -> Result<Self, SocketError> {
        let bytes = name.as_bytes();
        let to = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(name),
            _ => return Err(SocketError::Form),
        }
        .map_err(SocketError::Address)?;
        let socket = UnixDatagram::unbound().map_err(SocketError::Socket)?;
        // A datagram to a receiver whose queue is full would block the runtime's thread; better
        // to lose that one message (and log it).
        socket.set_nonblocking(true).map_err(SocketError::Socket)?;
        Ok(Self {
            socket,
            to,
            name: name.to_string_lossy().into_owned(),
            failed: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &str) {
        // A message is never empty; the first line names it in a log.
        let what = message.lines().next().unwrap_or(message);
        match self.socket.send_to_addr(message.as_bytes(), &self.to) {
            Ok(_) => {}
            Err(e) if !self.failed.swap(true, Ordering::Relaxed) => tracing::warn!(
                socket = %self.name,
                "could not tell systemd {what}: {e} (further failures are logged at debug level)"
            ),
            Err(e) => tracing::debug!(socket = %self.name, "could not tell systemd {what}: {e}"),
        }
    }
}

/// The protocol is one `KEY=VALUE` per line: a newline in a status would end it early.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests;
