//! Where the state lives: `state.json` in the state directory, written atomically before every
//! effect (`cardeploy_chunks::atomic`: temp file, fsync, rename, fsync of the directory). A crash at any moment leaves either
//! the old or the new file, never a torn one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;
use crate::error::io;
use crate::state::{SCHEMA, State};

const FILE: &str = "state.json";

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
                if state.schema < 5 {
                    state.deployment = state.deployment_from_phase();
                }
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
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Io {
            path: self.path(),
            source: std::io::Error::other(e),
        })?;
        // What the car accepted and holds is nobody else's business on the ECU.
        cardeploy_chunks::atomic::write(&self.path(), &bytes, cardeploy_chunks::atomic::PRIVATE)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::Deployment;
    use crate::release::{Release, ReleaseRef};
    use cardeploy_chunks::Digest;
    use cardeploy_protocol::{Phase, ReportedState};
    use cardeploy_release::InstalledOs;

    fn v(text: &str) -> semver::Version {
        text.parse().unwrap()
    }

    fn app() -> ReleaseRef {
        ReleaseRef {
            digest: Digest([0xef; 32]),
            line: "app".into(),
            version: v("1.0.0"),
        }
    }

    fn sample() -> State {
        State {
            schema: SCHEMA,
            epoch: 4,
            desired: None,
            last_counter: Some(2),
            counter_scope: Some("5c0pe".into()),
            accepted: 2,
            release: Some(
                Release::new(
                    app(),
                    vec![cardeploy_release::Artifact {
                        kind: cardeploy_release::ArtifactKind::RaucBundle,
                        name: "rootfs".into(),
                        digest: "cd".repeat(32),
                        size: 10,
                        index: "ab".repeat(32),
                    }],
                    Vec::new(),
                )
                .unwrap(),
            ),
            deployment: Deployment::Done { release: app() },
            installed: [("app".to_owned(), v("1.0.0"))].into(),
            installed_os: Some(InstalledOs {
                line: "app".into(),
                version: v("1.0.0"),
            }),
            reported: ReportedState {
                phase: Phase::Applied,
                desired_counter: Some(2),
                release: Some("app@1.0.0".into()),
                ..ReportedState::idle()
            },
            artifacts: [("rootfs".to_owned(), Digest([0xab; 32]))].into(),
            os: crate::os::OsRecord::default(),
            workloads: Default::default(),
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

    /// A state file as an agent of schema 4 wrote it, mid-install of an OS release.
    const SCHEMA_4: &str = r#"{
      "schema": 4, "epoch": 3, "desired": null, "last_counter": 5, "counter_scope": "s",
      "accepted": 5,
      "target": {"release": "efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef",
        "line": "app", "version": "1.0.0", "artifacts": [{"kind": "rauc-bundle",
        "name": "rootfs", "digest": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
        "size": 10, "index": "abababababababababababababababababababababababababababababababab"}]},
      "installed": {"app": "0.9.0"}, "installed_os": {"line": "app", "version": "0.9.0"},
      "reported": {"phase": "installing", "desired_counter": 5, "release": "app@1.0.0",
        "last_error": null},
      "artifacts": {"rootfs": "abababababababababababababababababababababababababababababababab"},
      "os": {"update": {"state": "installing", "release": {"digest":
        "efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef",
        "label": "app@1.0.0"}, "attempt": 1}, "refused": [], "confirmed_boot": null}
    }"#;

    #[test]
    fn a_schema_4_state_loads_with_the_deployment_its_phase_stood_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        fs::write(store.path(), SCHEMA_4).unwrap();
        let (state, warning) = store.load().unwrap();
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(state.schema, SCHEMA);
        assert_eq!(state.deployment, Deployment::Applying { release: app() });
        assert_eq!(state.release.as_ref().map(|r| &r.id), Some(&app()));
        assert_eq!(state.os.update.release(), Some(&app()));
        assert_eq!(state.artifacts["rootfs"], Digest([0xab; 32]));
        assert_eq!(state.installed["app"], v("0.9.0"));
        // Saved again in this schema, it loads the same.
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap().0, state);
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
