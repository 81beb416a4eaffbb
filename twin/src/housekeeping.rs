//! The twin's periodic tasks: the age sweep of the event log, and the chunk store's gc. Both run
//! once at start and then every interval until the twin stops; a failed round is logged and the
//! next round tries again (a database or disk hiccup must not stop the twin).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cardeploy_chunks::{Digest, StoreStats};

use crate::{Error, Twin, cars};

/// Run `round` every `every` until `stopped` resolves.
async fn every<F, Fut>(every: Duration, stopped: impl Future<Output = ()>, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => round().await,
        }
    }
}

/// Remove events older than `event_max_age_secs`, every `event_sweep_secs`.
pub(crate) async fn sweep_events(
    twin: Arc<Twin>,
    stopped: impl Future<Output = ()>,
) -> Result<(), Error> {
    let interval = Duration::from_secs(twin.config.event_sweep_secs);
    every(interval, stopped, || async {
        let max_age = i64::try_from(twin.config.event_max_age_secs).unwrap_or(i64::MAX);
        match twin
            .db
            .sweep_events(cars::now().saturating_sub(max_age))
            .await
        {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "events past their age removed"),
            Err(e) => tracing::warn!("event sweep failed; the next one tries again: {e}"),
        }
    })
    .await;
    Ok(())
}

/// Collect chunks and indexes of the chunk store that nothing needs, every `gc_interval_secs`.
pub(crate) async fn collect_chunks(
    twin: Arc<Twin>,
    stopped: impl Future<Output = ()>,
) -> Result<(), Error> {
    let interval = Duration::from_secs(twin.config.gc_interval_secs);
    every(interval, stopped, || async {
        match collect(&twin).await {
            Ok(removed) if removed.chunks > 0 => {
                tracing::info!(
                    chunks = removed.chunks,
                    bytes = removed.bytes_on_disk,
                    "chunk store: unreferenced chunks removed"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("chunk store gc failed; the next one tries again: {e}"),
        }
    })
    .await;
    Ok(())
}

/// One gc round. The index of every registered release stays, with its chunks; an index no
/// release names goes once it is older than the grace period (`release push` uploads the
/// indexes, then the release), and so do chunks no remaining index names. Nothing younger than
/// the grace period goes: an upload in progress has chunks no index names yet, and chunks
/// `POST /api/v1/chunks/missing` said the twin has are refreshed when it says so.
async fn collect(twin: &Arc<Twin>) -> Result<StoreStats, Error> {
    // Exclusive: no upload or release registration runs while the roots are decided and
    // the garbage removed.
    let exclusive = twin.store_gc.clone().write_owned().await;
    let released = twin.db.release_indexes().await?;
    let chunks = twin.config.chunks_path();
    let twin = twin.clone();
    tokio::task::spawn_blocking(move || {
        let _exclusive = exclusive;
        let grace = Duration::from_secs(twin.config.gc_grace_secs);
        let removed = collect_blocking(&twin, &released, grace)?;
        let freed = twin.artifacts.forget_collected();
        if freed > 0 {
            tracing::info!(freed, "delta cache: pairs whose index is gone removed");
        }
        Ok(removed)
    })
    .await
    .map_err(|e| Error::Config {
        path: chunks,
        why: format!("the chunk store gc panicked: {e}"),
    })?
}

fn collect_blocking(
    twin: &Twin,
    released: &HashSet<String>,
    grace: Duration,
) -> Result<StoreStats, Error> {
    let store = twin.artifacts.store();
    let mut roots = HashSet::new();
    for hex in released {
        let id: Digest = hex.parse().map_err(|_| Error::Config {
            path: store.location().into(),
            why: format!("a registered release names {hex:?}, not a chunk index digest"),
        })?;
        if !store.has_index(&id) {
            // Collecting now could take chunks the release still names; an operator decides.
            return Err(Error::Config {
                path: store.location().into(),
                why: format!(
                    "chunk index {id} of a registered release is missing; gc skipped until it is uploaded again (`cardeploy release push`)"
                ),
            });
        }
        roots.insert(id);
    }
    let now = SystemTime::now();
    for (name, id) in store.kept()? {
        if roots.contains(&id) {
            continue;
        }
        let age = store
            .index_modified(&id)
            .ok()
            .map_or(Duration::MAX, |t| now.duration_since(t).unwrap_or_default());
        if age >= grace {
            store.unkeep(&name)?;
        }
    }
    let kept: HashSet<Digest> = store.kept()?.into_iter().map(|(_, id)| id).collect();
    for id in roots.difference(&kept) {
        store.keep(&id.hex(), id)?;
    }
    Ok(store.gc_older_than(twin.config.max_artifact_bytes, grace)?)
}
