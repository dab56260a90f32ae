//! Bounded replay cache for knocks, keyed by (device id, nonce).
//!
//! Owns: remembering which (device, nonce) pairs were accepted, for how long, and the
//! eviction policy that keeps memory bounded without ever letting a replay through.
//!
//! Must not touch: the clock (the caller passes `now_ms`), files (persistence across a
//! restart is the gateway's job), signatures or policy. Call it only for knocks whose
//! signature verified and whose timestamp passed [`crate::packet::check_freshness`]:
//! otherwise an attacker could fill it with forged entries.
//!
//! # Why this is sound
//!
//! An entry for a knock with timestamp `ts` lives until `ts + window_ms`. The gateway
//! accepts a knock only if `|now - ts| <= max_skew`, so with `window_ms >= max_skew_ms`
//! any copy of that knock arriving after `ts + window_ms` is already refused as stale:
//! forgetting the entry then is safe. The cache does not rely on the caller for this:
//! it refuses by itself any knock with `ts + window_ms < now` (it could not remember it
//! long enough), and it uses the highest `now_ms` it has ever been given, so a clock
//! stepping backwards cannot resurrect a forgotten timestamp.
//!
//! When the cache is full of unexpired entries, it evicts the entry with the oldest
//! timestamp and raises a *floor* to that timestamp: every later knock with
//! `ts <= floor` is refused as [`OpenError::Replay`]. The evicted knock's replays all
//! carry `ts <= floor`, so they stay refused although the entry is gone. If the new
//! knock itself is the oldest candidate, it is the one refused (it could not be
//! remembered). The price of a flood is that honest knocks with old-ish timestamps are
//! refused until the clock moves past the floor (within one `window_ms` the floor stops
//! mattering, because those timestamps are stale anyway); the cache never grows past
//! `capacity` and never accepts a replay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use crate::keys::DeviceId;
use crate::packet::OpenError;

type Key = (DeviceId, [u8; 16]);

/// Below this many slots the index is never shrunk.
const SHRINK_ABOVE: usize = 4096;

/// Bounded (capacity) replay cache; entries expire at `timestamp + window`.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    capacity: usize,
    window_ms: u64,
    /// Membership by (device, nonce).
    seen: HashSet<Key>,
    /// Same entries as a min-heap by timestamp (expiry order, since the window is
    /// constant). A heap in one vector, not a B-tree: once it has grown to the number of
    /// live entries, inserting and expiring allocate nothing (issue 7).
    by_time: BinaryHeap<Reverse<(u64, DeviceId, [u8; 16])>>,
    /// Knocks with `timestamp_ms <= floor` are refused (set by capacity eviction).
    floor: Option<u64>,
    /// Highest `now_ms` seen so far.
    high_water_ms: u64,
}

impl ReplayCache {
    /// A cache holding at most `capacity` entries (at least 1), each kept for
    /// `window_ms` after its timestamp. Use `window_ms >= max_skew_ms`.
    pub fn new(capacity: usize, window_ms: u64) -> Self {
        ReplayCache {
            capacity: capacity.max(1),
            window_ms,
            seen: HashSet::new(),
            by_time: BinaryHeap::new(),
            floor: None,
            high_water_ms: 0,
        }
    }

    /// Refuse a (device, nonce) already seen (or not rememberable); otherwise remember it.
    ///
    /// Errors: [`OpenError::Replay`] for a duplicate, a timestamp at or below the eviction
    /// floor, or a new knock that is the oldest candidate of a full cache;
    /// [`OpenError::Stale`] when `timestamp_ms + window_ms` is already in the past.
    pub fn check_and_insert(
        &mut self,
        device: DeviceId,
        nonce: [u8; 16],
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), OpenError> {
        let now = now_ms.max(self.high_water_ms);
        self.high_water_ms = now;

        if self.floor.is_some_and(|f| timestamp_ms <= f) {
            return Err(OpenError::Replay);
        }
        if timestamp_ms.saturating_add(self.window_ms) < now {
            let skew = i128::from(timestamp_ms) - i128::from(now);
            return Err(OpenError::Stale {
                skew_ms: i64::try_from(skew).unwrap_or(i64::MIN),
            });
        }
        self.expire(now);
        let key = (device, nonce);
        if self.seen.contains(&key) {
            return Err(OpenError::Replay);
        }
        if self.seen.len() >= self.capacity {
            let oldest = self.by_time.peek().map(|Reverse(e)| *e);
            match oldest {
                Some(oldest) if oldest.0 < timestamp_ms => {
                    self.by_time.pop();
                    self.seen.remove(&(oldest.1, oldest.2));
                    self.floor = Some(self.floor.map_or(oldest.0, |f| f.max(oldest.0)));
                }
                // The new knock is the oldest (or ties with it): it cannot be remembered
                // without forgetting something at least as new, so refuse it.
                _ => return Err(OpenError::Replay),
            }
        }
        self.seen.insert(key);
        self.by_time.push(Reverse((timestamp_ms, device, nonce)));
        Ok(())
    }

    /// Drop entries whose expiry (`timestamp + window`) is before `now`.
    fn expire(&mut self, now: u64) {
        while let Some(&Reverse(first)) = self.by_time.peek() {
            if first.0.saturating_add(self.window_ms) >= now {
                break;
            }
            self.by_time.pop();
            self.seen.remove(&(first.1, first.2));
        }
        // After a burst, give most of the room back (rare: only when the live entries
        // fall below a quarter of it).
        if self.by_time.capacity() > SHRINK_ABOVE
            && self.by_time.len() < self.by_time.capacity() / 4
        {
            self.by_time.shrink_to(self.by_time.len() * 2);
            self.seen.shrink_to(self.seen.len() * 2);
        }
    }

    /// Number of remembered entries.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The eviction floor: knocks with `timestamp_ms <= floor` are refused. `None` until the
    /// cache first had to evict an unexpired entry (or [`ReplayCache::raise_floor`] was called).
    pub fn floor(&self) -> Option<u64> {
        self.floor
    }

    /// Refuse every knock with `timestamp_ms <= floor` from now on (never lowers the floor).
    /// Used when restoring persisted state, and when state was lost: then the floor must
    /// cover every timestamp the lost entries could have had.
    pub fn raise_floor(&mut self, floor: u64) {
        self.floor = Some(self.floor.map_or(floor, |f| f.max(floor)));
    }

    /// Highest `now_ms` seen so far (0 before the first call).
    pub fn high_water_ms(&self) -> u64 {
        self.high_water_ms
    }

    /// Raise the high-water mark to `now_ms` (never lowers it), as if a knock had been
    /// checked at that time. Used when restoring persisted state.
    pub fn observe(&mut self, now_ms: u64) {
        self.high_water_ms = self.high_water_ms.max(now_ms);
    }

    /// How long after its timestamp an entry is remembered.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The remembered entries `(device, nonce, timestamp_ms)`, oldest first (sorted on
    /// each call: for persisting, not for the knock path).
    pub fn entries(&self) -> impl Iterator<Item = (DeviceId, [u8; 16], u64)> + '_ {
        let mut sorted: Vec<(u64, DeviceId, [u8; 16])> =
            self.by_time.iter().map(|Reverse(e)| *e).collect();
        sorted.sort_unstable();
        sorted.into_iter().map(|(ts, d, n)| (d, n, ts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: DeviceId = DeviceId([1u8; 16]);
    const DEV2: DeviceId = DeviceId([2u8; 16]);

    fn n(i: u8) -> [u8; 16] {
        [i; 16]
    }

    #[test]
    fn duplicate_refused() {
        let mut c = ReplayCache::new(10, 30_000);
        assert_eq!(c.check_and_insert(DEV, n(1), 1000, 1000), Ok(()));
        assert_eq!(
            c.check_and_insert(DEV, n(1), 1000, 1001),
            Err(OpenError::Replay)
        );
        // same nonce for another device is a different key
        assert_eq!(c.check_and_insert(DEV2, n(1), 1000, 1001), Ok(()));
        // same device, other nonce
        assert_eq!(c.check_and_insert(DEV, n(2), 1000, 1001), Ok(()));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn expiry() {
        let mut c = ReplayCache::new(10, 30_000);
        c.check_and_insert(DEV, n(1), 1000, 1000).expect("first");
        // exactly at expiry (ts + window == now) still remembered
        assert_eq!(
            c.check_and_insert(DEV, n(1), 1000, 31_000),
            Err(OpenError::Replay)
        );
        // one ms later: too old for the cache to vouch for -> stale, and the entry is purged
        assert!(matches!(
            c.check_and_insert(DEV, n(1), 1000, 31_001),
            Err(OpenError::Stale { .. })
        ));
        c.check_and_insert(DEV, n(2), 31_001, 31_001)
            .expect("fresh");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn clock_going_backwards_cannot_resurrect() {
        let mut c = ReplayCache::new(10, 30_000);
        c.check_and_insert(DEV, n(1), 1000, 1000).expect("first");
        c.check_and_insert(DEV, n(2), 40_000, 40_000)
            .expect("purges n(1)");
        assert_eq!(c.len(), 1);
        // caller's clock steps back: the cache still uses its high-water mark
        assert!(c.check_and_insert(DEV, n(1), 1000, 1000).is_err());
    }

    #[test]
    fn capacity_bound_and_floor() {
        let mut c = ReplayCache::new(3, 1_000_000);
        for i in 0..3u8 {
            c.check_and_insert(DEV, n(i), 100 + u64::from(i), 200)
                .expect("fill");
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.floor(), None);
        // full: a newer knock evicts the oldest (ts 100) and raises the floor to 100
        c.check_and_insert(DEV, n(10), 150, 200)
            .expect("evicts oldest");
        assert_eq!(c.len(), 3);
        assert_eq!(c.floor(), Some(100));
        // the evicted knock's replay is still refused
        assert_eq!(
            c.check_and_insert(DEV, n(0), 100, 201),
            Err(OpenError::Replay)
        );
        // anything at or below the floor is refused
        assert_eq!(
            c.check_and_insert(DEV, n(99), 100, 201),
            Err(OpenError::Replay)
        );
        // a new knock older than everything in a full cache is refused (cannot be remembered)
        assert_eq!(
            c.check_and_insert(DEV, n(98), 101, 201),
            Err(OpenError::Replay)
        );
        assert_eq!(c.len(), 3);
        // remembered entries still refused
        assert_eq!(
            c.check_and_insert(DEV, n(10), 150, 201),
            Err(OpenError::Replay)
        );
        // flood: bound holds and no replay of any accepted knock ever passes
        let mut accepted = Vec::new();
        for i in 0..200u64 {
            let nonce = [(i % 251) as u8; 16];
            let dev = DeviceId([(i / 251) as u8 + 3; 16]);
            if c.check_and_insert(dev, nonce, 1000 + i, 1000 + i).is_ok() {
                accepted.push((dev, nonce, 1000 + i));
            }
            assert!(c.len() <= 3);
        }
        assert_eq!(accepted.len(), 200);
        for (dev, nonce, ts) in accepted {
            assert!(c.check_and_insert(dev, nonce, ts, 1300).is_err());
        }
    }

    #[test]
    fn restored_state_refuses_what_it_refused_before() {
        let mut live = ReplayCache::new(10, 30_000);
        live.check_and_insert(DEV, n(1), 50_000, 50_000)
            .expect("first");
        // Restore into a fresh cache: high water, floor and entries.
        let mut back = ReplayCache::new(10, 30_000);
        back.observe(live.high_water_ms());
        back.raise_floor(40_000);
        for (d, nonce, ts) in live.entries() {
            back.check_and_insert(d, nonce, ts, live.high_water_ms())
                .expect("restore");
        }
        assert_eq!(back.floor(), Some(40_000));
        back.raise_floor(10);
        assert_eq!(back.floor(), Some(40_000), "the floor never goes down");
        assert_eq!(
            back.check_and_insert(DEV, n(1), 50_000, 1),
            Err(OpenError::Replay),
            "restored entry, clock stepped back"
        );
        assert_eq!(
            back.check_and_insert(DEV, n(2), 40_000, 50_000),
            Err(OpenError::Replay),
            "at the floor"
        );
        assert_eq!(back.check_and_insert(DEV, n(3), 40_001, 50_000), Ok(()));
        assert_eq!(back.window_ms(), 30_000);
    }

    #[test]
    fn capacity_zero_is_one() {
        let mut c = ReplayCache::new(0, 1000);
        assert_eq!(c.capacity(), 1);
        c.check_and_insert(DEV, n(1), 10, 10).expect("one entry");
        assert_eq!(
            c.check_and_insert(DEV, n(1), 10, 10),
            Err(OpenError::Replay)
        );
        assert!(!c.is_empty());
    }
}
