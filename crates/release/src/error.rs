use std::path::PathBuf;

/// Why signed metadata was refused. Each variant is one threat with the facts a person needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("signed document is malformed: {0}")]
    Malformed(String),
    #[error("signed document is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload type is {found:?}, expected {expected:?}")]
    PayloadType { expected: String, found: String },
    #[error(
        "only {valid} valid signature(s) from distinct trusted keys, {threshold} required (signatures seen: {seen})"
    )]
    BelowThreshold {
        valid: usize,
        threshold: usize,
        seen: usize,
    },
    #[error("a threshold of {threshold} cannot be met by {keys} key(s)")]
    ImpossibleThreshold { threshold: usize, keys: usize },
    #[error("{what} expired at {expires} (now {now}); a newer one must be fetched")]
    Expired {
        what: String,
        expires: u64,
        now: u64,
    },
    #[error("root version {got} cannot follow version {have}: roots rotate one version at a time")]
    RootVersion { have: u64, got: u64 },
    #[error(
        "{what} `{name}` is not a safe name (1-64 of A-Z a-z 0-9 - _ ., starting alphanumeric)"
    )]
    UnsafeName { what: String, name: String },
    #[error("artifact {name} is {size} bytes, more than this car accepts ({limit})")]
    ArtifactTooLarge { name: String, size: u64, limit: u64 },
    #[error("release is for hardware `{release}`, this car is `{car}`")]
    Incompatible { release: String, car: String },
    #[error(
        "release line {line} runs {installed}; {offered} would be a downgrade (allowed only with a root-signed override)"
    )]
    Downgrade {
        line: String,
        installed: String,
        offered: String,
    },
    #[error("desired state is addressed to car {theirs}, this is {ours}")]
    OtherCar { ours: String, theirs: String },
    #[error("desired state counter {counter} is not above the last accepted ({last}): a replay")]
    Replay { counter: u64, last: u64 },
    #[error(
        "desired state counter {counter} jumps beyond {limit} (last accepted {last}): a leaked director key may be at work; rotate the director key in a new root (docs/release-format.md, D4a)"
    )]
    CounterJump { counter: u64, last: u64, limit: u64 },
    #[error("{what}: {why}")]
    Time { what: String, why: String },
    #[error(
        "release line `{line}` is not in canonical form (1-64 of a-z 0-9 -, starting and ending alphanumeric)"
    )]
    LineName { line: String },
    #[error(
        "this hardware ({compatible}) runs the OS {running}; {offered} moves it to another line (allowed only with a root-signed override)"
    )]
    LineSwitch {
        compatible: String,
        running: String,
        offered: String,
    },
    #[error("desired state names release {named}, but the release offered is {got}")]
    ReleaseMismatch { named: String, got: String },
    #[error(
        "artifact {name}: its chunk index gives {what} {found}, the release declares {declared}; nothing was downloaded"
    )]
    ArtifactMismatch {
        name: String,
        what: &'static str,
        declared: String,
        found: String,
    },
    #[error("public key is malformed: {0}")]
    Key(String),
    #[error("cannot read the key file {path}: {source}")]
    KeyFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a key file written by `cardeploy keys gen`: {why}")]
    KeyFile { path: PathBuf, why: String },
    /// Boxed: the chunk crate's error is large and this one travels in every verification result.
    #[cfg(feature = "sign")]
    #[error("cannot write the key file {path}: {source}")]
    KeyFileWrite {
        path: PathBuf,
        #[source]
        source: Box<cardeploy_chunks::Error>,
    },
}
