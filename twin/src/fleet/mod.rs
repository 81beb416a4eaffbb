//! Fleet deployments: one release to the cars a selector (and a geofence) picks, in phases with
//! thresholds, a rate limit and a time-to-live. The pieces here are pure: [`selector`] and
//! [`geofence`] pick the cars, [`rollout`] decides which start and what follows.

pub mod geofence;
pub mod rollout;
pub mod selector;
