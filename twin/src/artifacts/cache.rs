//! The delta cache: the frames the twin made for one (target, base) pair, by position, so that
//! the CPU a delta costs is spent once per pair and not once per car.
//!
//! ```text
//! deltas/<target index>.<base index>/<position>.<grade>   a transit frame, or "W"
//! ```
//!
//! in the chunk store's [`Blobs`] (`<data_dir>/chunks/` by default, or the object storage the
//! twin instances share).
//!
//! The key is everything a frame depends on. A delta frame depends on the base's bytes (named by
//! the base index) and a context frame on the target's bytes just before the chunk (named by the
//! target index and the position), so one chunk at the same place in two targets has two
//! entries. "W" records that a whole frame from the chunk store was best, without copying it.
//!
//! The grade says how hard the twin tried ([`Grade`]): `full` entries were made at the configured
//! level and are final; `trial` entries were made on demand where a cheap trial decided against
//! the configured level, and making the pair's deltas ahead replaces them with `full` ones.
//!
//! Entries are written whole or not at all (not durably: a lost entry is made again), and the
//! caller checks every frame it reads by decoding it ([`super::window`]); a bad one is
//! [`DeltaCache::discard`]ed and made again, never served. The cache has a size cap: when it
//! grows past it, whole pairs are removed, least recently used first. Pairs whose target or base
//! index is gone are removed by [`DeltaCache::retain`]. Nothing here is needed for correctness:
//! a lost entry only costs the CPU to make it again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use cardeploy_chunks::Digest;
use cardeploy_chunks::blobs::Blobs;

/// Where the cache's entries are among the store's objects.
const PREFIX: &str = "deltas/";

/// What is cached for one position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// The stored whole frame is the smallest; serve it from the chunk store.
    Whole,
    /// An encoded transit frame (a delta or a context frame).
    Frame(Vec<u8>),
}

const WHOLE: &[u8] = b"W";

/// How an entry was made, which says whether making it again could give fewer bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grade {
    /// Every candidate was made at the configured level: final.
    Full,
    /// Made on demand, where a cheap trial kept the configured level from being tried; making
    /// it ahead, at the configured level, may find a smaller frame.
    Trial,
}

impl Grade {
    const ALL: [Grade; 2] = [Grade::Full, Grade::Trial];

    fn suffix(self) -> &'static str {
        match self {
            Grade::Full => "full",
            Grade::Trial => "trial",
        }
    }
}

/// Whether `name` is an entry's file name: `<position>.<grade>`.
fn is_entry_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(position, grade)| {
        position.parse::<u32>().is_ok() && Grade::ALL.iter().any(|g| g.suffix() == grade)
    })
}

/// One cached frame: the chunk at `position` of `target`, for a car that holds `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub target: Digest,
    pub base: Digest,
    pub position: u32,
}

#[derive(Debug, Default)]
struct Pair {
    bytes: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Accounts {
    pairs: HashMap<(Digest, Digest), Pair>,
    total: u64,
    clock: u64,
}

#[derive(Debug)]
pub(crate) struct DeltaCache {
    blobs: Arc<dyn Blobs>,
    cap: u64,
    accounts: Mutex<Accounts>,
}

fn parse_pair(name: &str) -> Option<(Digest, Digest)> {
    let (target, base) = name.split_once('.')?;
    Some((target.parse().ok()?, base.parse().ok()?))
}

impl DeltaCache {
    /// Open the cache in `blobs`, removing what is not an entry: anything an older layout left
    /// behind.
    pub fn open(blobs: Arc<dyn Blobs>, cap: u64) -> std::io::Result<Self> {
        let mut accounts = Accounts::default();
        for listed in blobs.list(PREFIX)? {
            let rest = &listed.key[PREFIX.len()..];
            // Entries of the layout before grades (`<position>` alone) go too: they were made
            // on demand, and cannot say whether a cheap trial cut them short.
            let pair = rest
                .split_once('/')
                .filter(|(_, name)| is_entry_name(name))
                .and_then(|(pair, _)| parse_pair(pair));
            let Some(pair) = pair else {
                if let Err(e) = blobs.delete(&listed.key) {
                    tracing::warn!("delta cache: could not remove {}: {e}", listed.key);
                }
                continue;
            };
            accounts.total += listed.size;
            accounts.pairs.entry(pair).or_default().bytes += listed.size;
        }
        let cache = Self {
            blobs,
            cap,
            accounts: Mutex::new(accounts),
        };
        cache.evict(None);
        Ok(cache)
    }

    fn accounts(&self) -> MutexGuard<'_, Accounts> {
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(target: &Digest, base: &Digest) -> String {
        format!("{PREFIX}{}.{}/", target.hex(), base.hex())
    }

    fn path(key: &Key, grade: Grade) -> String {
        format!(
            "{}{}.{}",
            Self::dir(&key.target, &key.base),
            key.position,
            grade.suffix()
        )
    }

    fn touch(&self, key: &Key) {
        let mut accounts = self.accounts();
        accounts.clock += 1;
        let clock = accounts.clock;
        accounts
            .pairs
            .entry((key.target, key.base))
            .or_default()
            .used = clock;
    }

    /// The entry for `key`, if one is cached, and its grade (a `full` one first). The caller
    /// verifies a frame before serving it.
    pub fn get(&self, key: &Key) -> Option<(Entry, Grade)> {
        let (bytes, grade) = Grade::ALL
            .iter()
            .find_map(|&g| Some((self.blobs.get(&Self::path(key, g)).ok()??, g)))?;
        self.touch(key);
        let entry = if bytes == WHOLE {
            Entry::Whole
        } else {
            Entry::Frame(bytes)
        };
        Some((entry, grade))
    }

    /// Whether a final (`full`) entry is cached for `key`.
    pub fn has_full(&self, key: &Key) -> bool {
        matches!(self.blobs.stat(&Self::path(key, Grade::Full)), Ok(Some(_)))
    }

    /// Cache `entry` for `key` with its `grade`, replacing any older one of that grade; a `full`
    /// entry also replaces a `trial` one.
    pub fn put(
        &self,
        key: &Key,
        entry: &Entry,
        grade: Grade,
    ) -> Result<(), cardeploy_chunks::Error> {
        let bytes = match entry {
            Entry::Whole => WHOLE,
            Entry::Frame(frame) => frame.as_slice(),
        };
        let path = Self::path(key, grade);
        let replaced = self.len(&path);
        // Not durable: an entry lost to a power cut is made again, and every frame is checked
        // before it is served; a torn one never is, a put is whole or nothing.
        self.blobs
            .put(&path, bytes, false)
            .map_err(|source| cardeploy_chunks::Error::Io {
                what: "cannot write",
                path: PathBuf::from(format!("{}/{path}", self.blobs.location())),
                source,
            })?;
        {
            let mut accounts = self.accounts();
            accounts.clock += 1;
            let clock = accounts.clock;
            let pair = accounts.pairs.entry((key.target, key.base)).or_default();
            pair.bytes = (pair.bytes + bytes.len() as u64).saturating_sub(replaced);
            pair.used = clock;
            accounts.total = (accounts.total + bytes.len() as u64).saturating_sub(replaced);
        }
        if grade == Grade::Full {
            self.remove(&Self::path(key, Grade::Trial), key);
        }
        self.evict(Some((key.target, key.base)));
        Ok(())
    }

    /// Remove an entry found bad, of either grade; the caller makes it again.
    pub fn discard(&self, key: &Key) {
        for grade in Grade::ALL {
            self.remove(&Self::path(key, grade), key);
        }
    }

    /// The size of the entry at `path`; 0 when there is none.
    fn len(&self, path: &str) -> u64 {
        self.blobs
            .stat(path)
            .ok()
            .flatten()
            .map_or(0, |stat| stat.size)
    }

    fn remove(&self, path: &str, key: &Key) {
        let len = self.len(path);
        if len > 0 && self.blobs.delete(path).is_ok() {
            let mut accounts = self.accounts();
            accounts.total = accounts.total.saturating_sub(len);
            if let Some(pair) = accounts.pairs.get_mut(&(key.target, key.base)) {
                pair.bytes = pair.bytes.saturating_sub(len);
            }
        }
    }

    /// Remove every pair whose target or base `keep` does not name (their index is gone).
    /// Returns the bytes removed.
    pub fn retain(&self, keep: impl Fn(&Digest) -> bool) -> u64 {
        let doomed: Vec<(Digest, Digest)> = self
            .accounts()
            .pairs
            .keys()
            .filter(|(target, base)| !keep(target) || !keep(base))
            .copied()
            .collect();
        doomed.iter().map(|pair| self.remove_pair(pair)).sum()
    }

    fn remove_pair(&self, pair: &(Digest, Digest)) -> u64 {
        let dir = Self::dir(&pair.0, &pair.1);
        let removed = self
            .blobs
            .list(&dir)
            .and_then(|entries| entries.iter().try_for_each(|e| self.blobs.delete(&e.key)));
        if let Err(e) = removed {
            tracing::warn!("delta cache: could not remove {dir}: {e}");
            return 0;
        }
        let mut accounts = self.accounts();
        let bytes = accounts.pairs.remove(pair).map_or(0, |p| p.bytes);
        accounts.total = accounts.total.saturating_sub(bytes);
        bytes
    }

    /// Keep the cache under its cap: remove least recently used pairs, never `current` (the pair
    /// being filled right now; alone it may exceed the cap, and removing it would only make the
    /// same work again).
    fn evict(&self, current: Option<(Digest, Digest)>) {
        loop {
            let victim = {
                let accounts = self.accounts();
                if accounts.total <= self.cap {
                    return;
                }
                accounts
                    .pairs
                    .iter()
                    .filter(|(pair, _)| Some(**pair) != current)
                    .min_by_key(|(_, p)| p.used)
                    .map(|(pair, _)| *pair)
            };
            let Some(victim) = victim else { return };
            let freed = self.remove_pair(&victim);
            tracing::info!(target = %victim.0, base = %victim.1, freed, "delta cache over its cap: removed the least recently used pair");
        }
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        self.accounts().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(dir: &tempfile::TempDir) -> Arc<dyn Blobs> {
        Arc::new(cardeploy_chunks::blobs::FsBlobs::open(dir.path()).unwrap())
    }

    fn key(target: u8, base: u8, position: u32) -> Key {
        Key {
            target: Digest::of(&[target]),
            base: Digest::of(&[base]),
            position,
        }
    }

    #[test]
    fn entries_round_trip_and_one_chunk_in_two_targets_has_two_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DeltaCache::open(blobs(&dir), 1 << 20).unwrap();
        cache
            .put(
                &key(1, 9, 4),
                &Entry::Frame(b"for T1".to_vec()),
                Grade::Full,
            )
            .unwrap();
        cache
            .put(
                &key(2, 9, 4),
                &Entry::Frame(b"for T2".to_vec()),
                Grade::Full,
            )
            .unwrap();
        cache
            .put(&key(1, 9, 5), &Entry::Whole, Grade::Full)
            .unwrap();
        assert_eq!(
            cache.get(&key(1, 9, 4)).map(|(e, _)| e),
            Some(Entry::Frame(b"for T1".to_vec()))
        );
        assert_eq!(
            cache.get(&key(2, 9, 4)).map(|(e, _)| e),
            Some(Entry::Frame(b"for T2".to_vec()))
        );
        assert_eq!(cache.get(&key(1, 9, 5)), Some((Entry::Whole, Grade::Full)));
        assert_eq!(cache.get(&key(1, 8, 4)), None);
        assert_eq!(cache.bytes(), 13);
        cache.discard(&key(1, 9, 4));
        assert_eq!(cache.get(&key(1, 9, 4)), None);
        assert_eq!(cache.bytes(), 7);
    }

    #[test]
    fn the_least_recently_used_pair_goes_when_the_cap_is_passed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DeltaCache::open(blobs(&dir), 250).unwrap();
        cache
            .put(&key(1, 9, 0), &Entry::Frame(vec![1; 100]), Grade::Full)
            .unwrap();
        cache
            .put(&key(2, 9, 0), &Entry::Frame(vec![2; 100]), Grade::Full)
            .unwrap();
        // Pair 1 is used again, so pair 2 is the older one when pair 3 arrives.
        assert!(cache.get(&key(1, 9, 0)).is_some());
        cache
            .put(&key(3, 9, 0), &Entry::Frame(vec![3; 100]), Grade::Full)
            .unwrap();
        assert!(cache.bytes() <= 250, "{}", cache.bytes());
        assert!(cache.get(&key(2, 9, 0)).is_none());
        assert!(cache.get(&key(1, 9, 0)).is_some());
        assert!(cache.get(&key(3, 9, 0)).is_some());
    }

    #[test]
    fn opening_counts_what_is_there_and_removes_leftovers_and_the_old_layout() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DeltaCache::open(blobs(&dir), 1 << 20).unwrap();
            cache
                .put(&key(1, 9, 0), &Entry::Frame(vec![1; 10]), Grade::Full)
                .unwrap();
        }
        let pair = dir.path().join("deltas").join(format!(
            "{}.{}",
            Digest::of(&[1]).hex(),
            Digest::of(&[9]).hex()
        ));
        std::fs::write(dir.path().join("tmp").join(".0.1.2.tmp"), b"torn").unwrap();
        // An entry of the layout before grades: made on demand, maybe cut short by the trial.
        std::fs::write(pair.join("7"), b"ungraded").unwrap();
        let old = dir
            .path()
            .join("deltas")
            .join(Digest::of(b"old base").hex());
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join(Digest::of(b"chunk").hex()), b"old frame").unwrap();
        let cache = DeltaCache::open(blobs(&dir), 1 << 20).unwrap();
        assert_eq!(cache.bytes(), 10);
        assert!(!old.join(Digest::of(b"chunk").hex()).exists());
        assert!(!dir.path().join("tmp").join(".0.1.2.tmp").exists());
        assert!(!pair.join("7").exists());
    }

    #[test]
    fn a_full_entry_replaces_a_trial_one_and_is_read_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DeltaCache::open(blobs(&dir), 1 << 20).unwrap();
        cache
            .put(&key(1, 9, 0), &Entry::Frame(vec![1; 30]), Grade::Trial)
            .unwrap();
        assert!(!cache.has_full(&key(1, 9, 0)));
        assert_eq!(
            cache.get(&key(1, 9, 0)),
            Some((Entry::Frame(vec![1; 30]), Grade::Trial))
        );
        cache
            .put(&key(1, 9, 0), &Entry::Frame(vec![2; 10]), Grade::Full)
            .unwrap();
        assert!(cache.has_full(&key(1, 9, 0)));
        assert_eq!(
            cache.get(&key(1, 9, 0)),
            Some((Entry::Frame(vec![2; 10]), Grade::Full))
        );
        // The trial entry is gone from disk and from the accounts.
        assert_eq!(cache.bytes(), 10);
        cache.discard(&key(1, 9, 0));
        assert_eq!(cache.get(&key(1, 9, 0)), None);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn pairs_whose_index_is_gone_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DeltaCache::open(blobs(&dir), 1 << 20).unwrap();
        cache
            .put(&key(1, 9, 0), &Entry::Frame(vec![1; 10]), Grade::Full)
            .unwrap();
        cache
            .put(&key(2, 9, 0), &Entry::Frame(vec![2; 20]), Grade::Full)
            .unwrap();
        let gone = Digest::of(&[2]);
        assert_eq!(cache.retain(|d| *d != gone), 20);
        assert!(cache.get(&key(2, 9, 0)).is_none());
        assert!(cache.get(&key(1, 9, 0)).is_some());
    }
}
