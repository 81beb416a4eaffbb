//! The agent's persistent state, written atomically before every effect: temp file, fsync,
//! rename, fsync of the directory. A crash at any moment leaves either the old or the new file,
//! never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cardeploy_protocol::{DesiredState, ReportedState};
use serde::{Deserialize, Serialize};

use crate::Error;

/// 2: signed desired states (issue 4) — the counter, the target release and installed versions.
/// 3: the OS update state (`os`); a schema-2 file loads with an idle OS state.
/// 4: the counter's scope, the count of accepted desired states, the installed OS; a schema-3
/// file loads with its counter in the scope of the root in force (`adopt_scope`).
pub const SCHEMA: u32 = 4;
const FILE: &str = "state.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub schema: u32,
    /// Grows with every agent start; with `seq` it orders this agent's reports.
    pub epoch: u64,
    /// The last desired state the agent accepted, exactly as it arrived (signed).
    pub desired: Option<DesiredState>,
    /// The highest desired-state counter accepted (D4) in `counter_scope`: a replayed older one
    /// is refused.
    #[serde(default)]
    pub last_counter: Option<u64>,
    /// The counter scope of `last_counter` (D4a: the director role it was accepted under). A
    /// root whose director role is another starts a fresh scope.
    #[serde(default)]
    pub counter_scope: Option<String>,
    /// How many desired states this car accepted, ever: what tells the OS update that a desired
    /// state is newer than the one a failure happened under, whatever counter scope it is in.
    #[serde(default)]
    pub accepted: u64,
    /// The verified release the accepted desired state names: what the agent works towards.
    #[serde(default)]
    pub target: Option<Target>,
    /// The highest version installed per release line (M5: no downgrade without an override).
    #[serde(default)]
    pub installed: std::collections::BTreeMap<String, String>,
    /// The OS this hardware runs, from the last OS release installed (M5a: held against every OS
    /// release, whatever line it claims).
    #[serde(default)]
    pub installed_os: Option<InstalledOs>,
    pub reported: ReportedState,
    /// Artifacts the car holds, by name: the id (hex) of each one's chunk index. The previous
    /// version of an artifact is the base the twin makes deltas against.
    #[serde(default)]
    pub artifacts: std::collections::BTreeMap<String, String>,
    /// The OS update (A/B through RAUC) and the releases this car will not install again.
    #[serde(default)]
    pub os: crate::os::OsRecord,
}

/// The line and version of the OS release this hardware runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledOs {
    pub line: String,
    pub version: String,
}

/// A verified release, as much of it as the agent needs after verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// sha256 of the release manifest (M6).
    pub release: String,
    pub line: String,
    pub version: String,
    pub artifacts: Vec<cardeploy_release::Artifact>,
}

impl State {
    /// A state written before counters had scopes holds a counter accepted under the root in
    /// force then, which is the root loaded now: it adopts that root's scope, and its counter
    /// stands for the desired states accepted so far. Returns whether anything changed.
    pub fn adopt_scope(&mut self, scope: &str) -> bool {
        if self.last_counter.is_none() || self.counter_scope.is_some() {
            return false;
        }
        self.counter_scope = Some(scope.to_owned());
        self.accepted = self.accepted.max(self.last_counter.unwrap_or(0));
        true
    }
}

impl Target {
    /// `line@version`, how people name a release.
    pub fn label(&self) -> String {
        format!("{}@{}", self.line, self.version)
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            epoch: 0,
            desired: None,
            last_counter: None,
            counter_scope: None,
            accepted: 0,
            target: None,
            installed: std::collections::BTreeMap::new(),
            installed_os: None,
            reported: ReportedState::idle(),
            artifacts: std::collections::BTreeMap::new(),
            os: crate::os::OsRecord::default(),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Load the state. A missing file is a first start. A corrupt file is moved aside (never
    /// deleted: someone may want to look at it) and reported through the returned warning.
    pub fn load(&self) -> Result<(State, Option<Error>), Error> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((State::default(), None));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        // Read the schema first so that a newer agent's file gets a clear error, not "corrupt".
        #[derive(Deserialize)]
        struct Schema {
            schema: u32,
        }
        if let Ok(Schema { schema }) = serde_json::from_slice::<Schema>(&bytes)
            && schema > SCHEMA
        {
            return Err(Error::StateSchema {
                path,
                found: schema,
                supported: SCHEMA,
            });
        }
        match serde_json::from_slice::<State>(&bytes) {
            Ok(mut state) => {
                state.schema = SCHEMA;
                Ok((state, None))
            }
            Err(source) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let moved_to = self.dir.join(format!("{FILE}.corrupt-{stamp}"));
                fs::rename(&path, &moved_to).map_err(io(&path))?;
                Ok((
                    State::default(),
                    Some(Error::CorruptState {
                        path,
                        moved_to,
                        source,
                    }),
                ))
            }
        }
    }

    pub fn save(&self, state: &State) -> Result<(), Error> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
        {
            let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
            file.write_all(&bytes).map_err(io(&tmp))?;
            file.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename is durable only once the directory entry is.
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardeploy_protocol::Phase;

    fn sample() -> State {
        State {
            schema: SCHEMA,
            epoch: 4,
            desired: None,
            last_counter: Some(2),
            counter_scope: Some("5c0pe".into()),
            accepted: 2,
            target: Some(Target {
                release: "ef".repeat(32),
                line: "app".into(),
                version: "1.0.0".into(),
                artifacts: vec![cardeploy_release::Artifact {
                    kind: cardeploy_release::ArtifactKind::RaucBundle,
                    name: "rootfs".into(),
                    digest: "cd".repeat(32),
                    size: 10,
                    index: "ab".repeat(32),
                }],
            }),
            installed: [("app".to_owned(), "1.0.0".to_owned())].into(),
            installed_os: Some(InstalledOs {
                line: "app".into(),
                version: "1.0.0".into(),
            }),
            reported: ReportedState {
                phase: Phase::Applied,
                desired_counter: Some(2),
                release: Some("app@1.0.0".into()),
                ..ReportedState::idle()
            },
            artifacts: [("rootfs".to_owned(), "ab".repeat(32))].into(),
            os: crate::os::OsRecord::default(),
        }
    }

    #[test]
    fn a_counter_from_before_scopes_adopts_the_scope_of_the_root_in_force() {
        let mut old = sample();
        old.counter_scope = None;
        old.accepted = 0;
        old.last_counter = Some(7);
        assert!(old.adopt_scope("scope-of-root-1"));
        assert_eq!(old.counter_scope.as_deref(), Some("scope-of-root-1"));
        // The count of accepted desired states starts where the old counter was, so an OS
        // failure recorded under counter 7 is retried only by a newer one.
        assert_eq!(old.accepted, 7);
        assert!(!old.adopt_scope("another"), "adopted once");
        let mut fresh = State::default();
        assert!(
            !fresh.adopt_scope("scope"),
            "nothing accepted, nothing to adopt"
        );
    }

    #[test]
    fn state_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().0, State::default());
        store.save(&sample()).unwrap();
        let (loaded, warning) = store.load().unwrap();
        assert_eq!(loaded, sample());
        assert!(warning.is_none());
        assert!(!dir.path().join(".state.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_state_file_is_moved_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        fs::write(store.path(), b"{\"schema\":1,\"epoch\":").unwrap();
        let (state, warning) = store.load().unwrap();
        assert_eq!(state, State::default());
        let Some(Error::CorruptState { moved_to, .. }) = warning else {
            panic!("expected CorruptState, got {warning:?}");
        };
        assert_eq!(fs::read(moved_to).unwrap(), b"{\"schema\":1,\"epoch\":");
    }

    #[test]
    fn a_state_from_a_newer_agent_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        fs::write(store.path(), b"{\"schema\":99}").unwrap();
        assert!(matches!(
            store.load(),
            Err(Error::StateSchema { found: 99, .. })
        ));
        assert!(store.path().exists(), "the newer file must be left alone");
    }

    #[test]
    fn a_torn_temp_file_from_a_crash_does_not_affect_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        store.save(&sample()).unwrap();
        // A crash between create and rename leaves a partial temp file behind.
        fs::write(dir.path().join(".state.json.tmp"), b"{\"sch").unwrap();
        assert_eq!(store.load().unwrap().0, sample());
        store.save(&State::default()).unwrap();
        assert_eq!(store.load().unwrap().0, State::default());
    }
}
