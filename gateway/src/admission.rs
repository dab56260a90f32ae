//! Admission control before any crypto: per-source token buckets, the bounded fair queue to
//! the crypto workers, the global crypto budget, drop counters and the audit-line limiter.
//!
//! Owns the pure policy of who gets crypto work when the gateway is flooded (DESIGN §3 step
//! 3). Time is passed in (monotonic milliseconds), nothing here reads a clock, opens a socket
//! or does crypto, so every rule is unit-tested. Must not decide on knocks (pipeline.rs) or
//! own threads (daemon.rs).
//!
//! The policy, in the order the capture thread applies it:
//! 1. `packet::precheck` (size, version, type, gateway key id): garbage dies here for the
//!    price of a few comparisons.
//! 2. [`SourceTable::admit`]: one [`TokenBucket`] per source (an IPv4 address, or an IPv6
//!    /64, since one host owns a whole /64). The table is bounded (least recently seen
//!    source evicted first), so spoofed sources cost memory only up to the capacity.
//! 3. [`FairQueue::push`]: a bounded queue served round-robin per source. When it is full,
//!    the loser is always the *noisiest* source: its oldest queued item goes, or the
//!    newcomer if the newcomer's own source is (one of) the noisiest. A source with one
//!    packet in the queue is never displaced by a flooder with many.
//! 4. The crypto workers take a token from the global [`TokenBucket`] (opens per second)
//!    before each open; while it is empty they wait and the queue above absorbs the burst.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

/// A token bucket: `rate_per_sec` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`. A zero `burst` is taken as 1 (a bucket that can never
    /// pay would refuse everything).
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: u64) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate_per_sec: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        // A clock that goes backwards earns nothing (and does not move `last_ms` back).
        if now_ms > self.last_ms {
            let earned = (now_ms - self.last_ms) as f64 * self.rate_per_sec / 1000.0;
            self.tokens = (self.tokens + earned).min(self.burst);
            self.last_ms = now_ms;
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Milliseconds until a token is available (0 if one is available now; `u64::MAX` for a
    /// zero rate with an empty bucket).
    pub fn wait_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            0
        } else if self.rate_per_sec <= 0.0 {
            u64::MAX
        } else {
            ((1.0 - self.tokens) * 1000.0 / self.rate_per_sec).ceil() as u64
        }
    }

    /// True when the bucket is full (the source has been quiet long enough to forget).
    fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.tokens >= self.burst
    }
}

/// The unit a per-source limit applies to: an IPv4 address, or the /64 of an IPv6 address
/// (IPv4-mapped IPv6 addresses count as IPv4).
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

/// Per-source token buckets, at most `capacity` sources (least recently seen evicted).
///
/// The buckets live in one slab with an intrusive recency list (most recent at the head):
/// a known source is found, charged and moved to the head without allocating, and a new
/// source takes a freed slot or the least recently seen one's (issue 7: no allocation per
/// packet once the table is at its size).
#[derive(Debug)]
pub struct SourceTable {
    capacity: usize,
    rate_per_sec: u32,
    burst: u32,
    /// source -> slot in `slots`
    index: HashMap<IpAddr, u32>,
    slots: Vec<SourceSlot>,
    /// Most and least recently seen slots (`NONE` when empty).
    head: u32,
    tail: u32,
    evicted: u64,
}

#[derive(Debug)]
struct SourceSlot {
    key: IpAddr,
    bucket: TokenBucket,
    /// Toward the head (more recent) and the tail (less recent).
    newer: u32,
    older: u32,
}

/// "No slot" in the recency list.
const NONE: u32 = u32::MAX;

impl SourceTable {
    pub fn new(capacity: usize, rate_per_sec: u32, burst: u32) -> SourceTable {
        SourceTable {
            // Slot numbers are u32 and NONE is reserved.
            capacity: capacity.clamp(1, (NONE - 1) as usize),
            rate_per_sec,
            burst,
            index: HashMap::new(),
            slots: Vec::new(),
            head: NONE,
            tail: NONE,
            evicted: 0,
        }
    }

    /// True if `src` may have one more packet go on to the crypto queue at `now_ms`.
    pub fn admit(&mut self, src: IpAddr, now_ms: u64) -> bool {
        let key = source_key(src);
        if let Some(&slot) = self.index.get(&key) {
            self.unlink(slot);
            self.push_head(slot);
            return self.slots[slot as usize].bucket.try_take(now_ms);
        }
        let mut bucket = TokenBucket::new(self.rate_per_sec, self.burst, now_ms);
        let ok = bucket.try_take(now_ms);
        let fresh = SourceSlot {
            key,
            bucket,
            newer: NONE,
            older: NONE,
        };
        let slot = if self.slots.len() < self.capacity {
            self.slots.push(fresh);
            (self.slots.len() - 1) as u32
        } else {
            let slot = self.evict_one(now_ms);
            self.slots[slot as usize] = fresh;
            slot
        };
        self.index.insert(key, slot);
        self.push_head(slot);
        ok
    }

    /// Evicts the least recently seen source and returns its (unlinked) slot. A source
    /// whose bucket is not full yet would come back with a full one: that is the price of
    /// bounded memory, paid by whoever floods with the most distinct addresses, and bounded
    /// by the global budget. Only called on a full table (so the tail exists).
    fn evict_one(&mut self, now_ms: u64) -> u32 {
        let slot = self.tail;
        self.unlink(slot);
        let old = &mut self.slots[slot as usize];
        self.index.remove(&old.key);
        if !old.bucket.is_full(now_ms) {
            self.evicted += 1;
        }
        slot
    }

    fn unlink(&mut self, slot: u32) {
        let (newer, older) = {
            let s = &self.slots[slot as usize];
            (s.newer, s.older)
        };
        match newer {
            NONE => self.head = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NONE => self.tail = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    fn push_head(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let s = &mut self.slots[slot as usize];
            s.newer = NONE;
            s.older = old_head;
        }
        match old_head {
            NONE => self.tail = slot,
            h => self.slots[h as usize].newer = slot,
        }
        self.head = slot;
    }

    /// Sources currently tracked.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Sources evicted while their bucket was still partly spent.
    pub fn evicted_active(&self) -> u64 {
        self.evicted
    }
}

/// What [`FairQueue::push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed<T> {
    /// Queued, nothing dropped.
    Queued,
    /// The queue was full and the newcomer's source is the noisiest: the newcomer is dropped
    /// (handed back).
    DroppedNewcomer(T),
    /// The queue was full: the oldest item of the noisiest source was dropped (handed back)
    /// and the newcomer queued.
    DroppedOldest(IpAddr, T),
}

/// A bounded queue served round-robin by source; when full, the noisiest source loses.
#[derive(Debug)]
pub struct FairQueue<T> {
    capacity: usize,
    len: usize,
    per_source: HashMap<IpAddr, VecDeque<T>>,
    /// Sources with queued items, in service order.
    ring: VecDeque<IpAddr>,
    /// (queued count, source) for every source with queued items.
    counts: BTreeSet<(usize, IpAddr)>,
    /// Emptied per-source queues kept for the next source (at most [`SPARE_QUEUES`]): a
    /// knock from a source with nothing queued, the common case, allocates no queue.
    spare: Vec<VecDeque<T>>,
}

/// How many emptied per-source queues [`FairQueue`] keeps for reuse.
const SPARE_QUEUES: usize = 64;

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> FairQueue<T> {
        FairQueue {
            capacity: capacity.max(1),
            len: 0,
            per_source: HashMap::new(),
            ring: VecDeque::new(),
            counts: BTreeSet::new(),
            spare: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn count(&self, key: &IpAddr) -> usize {
        self.per_source.get(key).map_or(0, VecDeque::len)
    }

    /// Forgets `key`'s (empty) queue, keeping it for reuse.
    fn retire_queue(&mut self, key: IpAddr) {
        if let Some(queue) = self.per_source.remove(&key) {
            if self.spare.len() < SPARE_QUEUES {
                self.spare.push(queue);
            }
        }
    }

    fn set_count(&mut self, key: IpAddr, old: usize, new: usize) {
        if old > 0 {
            self.counts.remove(&(old, key));
        }
        if new > 0 {
            self.counts.insert((new, key));
        }
    }

    /// Queues `item` from `src`, dropping from the noisiest source if full.
    pub fn push(&mut self, src: IpAddr, item: T) -> Pushed<T> {
        let key = source_key(src);
        let mut outcome = Pushed::Queued;
        if self.len >= self.capacity {
            let mine = self.count(&key);
            let Some(&(most, noisiest)) = self.counts.last() else {
                return Pushed::DroppedNewcomer(item);
            };
            if mine >= most {
                return Pushed::DroppedNewcomer(item);
            }
            let Some(dropped) = self.pop_from(noisiest) else {
                return Pushed::DroppedNewcomer(item);
            };
            outcome = Pushed::DroppedOldest(noisiest, dropped);
        }
        let old = self.count(&key);
        let spare = &mut self.spare;
        let queue = self
            .per_source
            .entry(key)
            .or_insert_with(|| spare.pop().unwrap_or_default());
        queue.push_back(item);
        if old == 0 {
            self.ring.push_back(key);
        }
        self.set_count(key, old, old + 1);
        self.len += 1;
        outcome
    }

    /// Removes the oldest item of `key` (keeps its place in the ring if items remain).
    fn pop_from(&mut self, key: IpAddr) -> Option<T> {
        let queue = self.per_source.get_mut(&key)?;
        let item = queue.pop_front()?;
        let left = queue.len();
        if left == 0 {
            self.retire_queue(key);
            self.ring.retain(|k| *k != key);
        }
        self.set_count(key, left + 1, left);
        self.len -= 1;
        Some(item)
    }

    /// The next item: the oldest of the source whose turn it is.
    pub fn pop(&mut self) -> Option<(IpAddr, T)> {
        let key = self.ring.pop_front()?;
        let queue = self.per_source.get_mut(&key)?;
        let item = queue.pop_front()?;
        let left = queue.len();
        if left == 0 {
            self.retire_queue(key);
        } else {
            self.ring.push_back(key);
        }
        self.set_count(key, left + 1, left);
        self.len -= 1;
        Some((key, item))
    }
}

/// Datagram buffers handed from the capture thread to the crypto workers and back, so a
/// queued knock costs no allocation once the pool holds as many buffers as are in flight.
/// Keeps at most [`DatagramPool::KEEP`] spare buffers (a flood's burst is given back).
#[derive(Debug, Default)]
pub struct DatagramPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl DatagramPool {
    /// Spare buffers kept at most (each sized for the largest packet: ~1.2 MB in all).
    pub const KEEP: usize = 1024;

    /// A buffer holding a copy of `bytes` (a spare one when there is one).
    pub fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        let spare = lock_ignoring_poison(&self.spare).pop();
        let mut buf = spare.unwrap_or_else(|| {
            Vec::with_capacity(postern_protocol::packet::MAX_PACKET_LEN.max(bytes.len()))
        });
        buf.clear();
        buf.extend_from_slice(bytes);
        buf
    }

    /// Takes `buf` back for reuse (dropped when the pool is full).
    pub fn give_back(&self, buf: Vec<u8>) {
        let mut spare = lock_ignoring_poison(&self.spare);
        if spare.len() < Self::KEEP {
            spare.push(buf);
        }
    }
}

/// Locks `m`; a panic elsewhere while it was held does not stop the gateway (the data is
/// counters and queues, valid at every point).
pub(crate) fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Drop and decision counters by reason, shared by the capture thread, the workers and the
/// decision thread.
#[derive(Debug, Default)]
pub struct Counters {
    map: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub fn add(&self, name: &'static str, n: u64) {
        *lock_ignoring_poison(&self.map).entry(name).or_insert(0) += n;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        lock_ignoring_poison(&self.map).clone()
    }
}

/// At most `per_sec` audit lines per second for unauthenticated drops; counts the rest.
#[derive(Debug)]
pub struct LineLimiter {
    per_sec: u32,
    window_start_ms: u64,
    used: u32,
    suppressed_since_line: u64,
    suppressed_total: u64,
}

impl LineLimiter {
    pub fn new(per_sec: u32) -> LineLimiter {
        LineLimiter {
            per_sec,
            window_start_ms: 0,
            used: 0,
            suppressed_since_line: 0,
            suppressed_total: 0,
        }
    }

    /// `Some(n)` if a line may be written now, `n` lines having been suppressed since the
    /// last written one; `None` if this line is suppressed.
    pub fn allow(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms >= self.window_start_ms.saturating_add(1000) || now_ms < self.window_start_ms {
            self.window_start_ms = now_ms;
            self.used = 0;
        }
        if self.used < self.per_sec {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed_since_line))
        } else {
            self.suppressed_since_line += 1;
            self.suppressed_total += 1;
            None
        }
    }

    /// Lines suppressed since start.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal address")
    }

    #[test]
    fn bucket_spends_burst_then_refills_at_rate() {
        let mut b = TokenBucket::new(10, 3, 1000);
        assert!(b.try_take(1000) && b.try_take(1000) && b.try_take(1000));
        assert!(!b.try_take(1000));
        assert_eq!(b.wait_ms(1000), 100);
        assert!(!b.try_take(1099));
        assert!(b.try_take(1100));
        // A long pause refills only up to the burst.
        let taken = (0..10).filter(|_| b.try_take(100_000)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn bucket_ignores_a_clock_going_backwards() {
        let mut b = TokenBucket::new(1000, 1, 5000);
        assert!(b.try_take(5000));
        assert!(!b.try_take(4000), "going back in time earns nothing");
        assert!(!b.try_take(5000));
        assert!(b.try_take(5001));
    }

    #[test]
    fn zero_rate_bucket_never_refills() {
        let mut b = TokenBucket::new(0, 0, 0);
        assert!(b.try_take(0));
        assert!(!b.try_take(1_000_000));
        assert_eq!(b.wait_ms(1_000_000), u64::MAX);
    }

    #[test]
    fn sources_are_limited_independently() {
        let mut t = SourceTable::new(100, 1, 2);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(t.admit(a, 0) && t.admit(a, 0));
        assert!(!t.admit(a, 0), "a's burst is spent");
        assert!(t.admit(b, 0), "b is not punished for a's flood");
        assert!(t.admit(a, 1000), "a earned one token in a second");
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let mut t = SourceTable::new(100, 1, 1);
        assert!(t.admit(ip("2001:db8:1:2::1"), 0));
        assert!(!t.admit(ip("2001:db8:1:2:ffff::9"), 0), "same /64");
        assert!(t.admit(ip("2001:db8:1:3::1"), 0), "another /64");
        assert!(t.admit(ip("::ffff:10.0.0.1"), 0));
        assert!(!t.admit(ip("10.0.0.1"), 0), "mapped v4 is the v4 source");
    }

    #[test]
    fn source_table_evicts_exactly_like_a_plain_lru() {
        // Reference model: sources, most recent first.
        let mut model: Vec<IpAddr> = Vec::new();
        let mut t = SourceTable::new(10, 1, 1);
        let mut x: u32 = 12345;
        for step in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let src = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, (x >> 16) as u8 % 40));
            let known = model.iter().position(|s| *s == src);
            let expected = match known {
                Some(i) => {
                    model.remove(i);
                    false // spent: rate 1/s, burst 1, time frozen
                }
                None => {
                    model.truncate(9);
                    true
                }
            };
            model.insert(0, src);
            assert_eq!(t.admit(src, 0), expected, "step {step}");
            let mut tracked: Vec<IpAddr> = t.index.keys().copied().collect();
            let mut want = model.clone();
            tracked.sort();
            want.sort();
            assert_eq!(tracked, want, "step {step}");
        }
    }

    #[test]
    fn source_table_memory_is_bounded_lru() {
        let mut t = SourceTable::new(3, 1, 1);
        let (a, b, c, d) = (
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            ip("10.0.0.3"),
            ip("10.0.0.4"),
        );
        for s in [a, b, c] {
            assert!(t.admit(s, 0));
        }
        assert!(!t.admit(a, 0), "a used again: most recent now");
        assert!(t.admit(d, 0), "d evicts b, the least recently seen");
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted_active(), 1);
        assert!(!t.admit(a, 0), "a is still tracked (spent)");
        assert!(!t.admit(c, 0), "c is still tracked (spent)");
        // 10k spoofed sources never grow the table past its capacity.
        for i in 0..10_000u32 {
            t.admit(IpAddr::V4(i.into()), 1);
            assert!(t.len() <= 3);
        }
    }

    #[test]
    fn queue_serves_sources_round_robin() {
        let mut q = FairQueue::new(10);
        let (f, v) = (ip("10.0.0.66"), ip("10.0.0.7"));
        for i in 0..5 {
            assert_eq!(q.push(f, i), Pushed::Queued);
        }
        assert_eq!(q.push(v, 100), Pushed::Queued);
        assert_eq!(q.pop(), Some((f, 0)));
        assert_eq!(q.pop(), Some((v, 100)), "the quiet source is served second");
        assert_eq!(q.pop(), Some((f, 1)));
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn full_queue_drops_from_the_noisiest_source() {
        let mut q = FairQueue::new(4);
        let (f, v, w) = (ip("10.0.0.66"), ip("10.0.0.7"), ip("10.0.0.8"));
        for i in 0..4 {
            assert_eq!(q.push(f, i), Pushed::Queued);
        }
        // The flooder's next packet is the one that goes.
        assert_eq!(q.push(f, 4), Pushed::DroppedNewcomer(4));
        // A valid knock displaces the flooder's oldest item.
        assert_eq!(q.push(v, 100), Pushed::DroppedOldest(f, 0));
        assert_eq!(q.push(w, 200), Pushed::DroppedOldest(f, 1));
        assert_eq!(q.len(), 4);
        // Queue: f{2,3} v{100} w{200}. v again: f is still noisiest (2 > 1).
        assert_eq!(q.push(v, 101), Pushed::DroppedOldest(f, 2));
        // Now f{3} v{100,101} w{200}: v is the noisiest, its own newcomer goes.
        assert_eq!(q.push(v, 102), Pushed::DroppedNewcomer(102));
        let mut got: Vec<(IpAddr, i32)> = std::iter::from_fn(|| q.pop()).collect();
        got.sort();
        let mut want = vec![(f, 3), (v, 100), (v, 101), (w, 200)];
        want.sort();
        assert_eq!(got, want);
        assert!(q.is_empty());
    }

    #[test]
    fn flood_cannot_starve_a_single_valid_item() {
        // Property: whatever a flooder pushes, a source with one queued item keeps it.
        let mut q = FairQueue::new(64);
        let valid = ip("192.0.2.1");
        assert_eq!(q.push(valid, u32::MAX), Pushed::Queued);
        for i in 0..100_000u32 {
            // Flood from 8 sources.
            let src = IpAddr::V4((0x0a00_0000 + (i % 8)).into());
            if let Pushed::DroppedOldest(s, _) = q.push(src, i) {
                assert_ne!(s, valid);
            }
            assert!(q.len() <= 64);
        }
        let served: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert!(served.contains(&(valid, u32::MAX)));
    }

    #[test]
    fn line_limiter_caps_lines_per_second_and_counts_the_rest() {
        let mut l = LineLimiter::new(2);
        assert_eq!(l.allow(1000), Some(0));
        assert_eq!(l.allow(1500), Some(0));
        assert_eq!(l.allow(1600), None);
        assert_eq!(l.allow(1999), None);
        assert_eq!(
            l.allow(2000),
            Some(2),
            "the next line says 2 were suppressed"
        );
        assert_eq!(l.allow(2001), Some(0));
        assert_eq!(l.suppressed_total(), 2);
    }

    #[test]
    fn counters_add_up() {
        let c = Counters::default();
        c.add("decrypt", 2);
        c.add("decrypt", 3);
        c.add("rate_limited", 1);
        let s = c.snapshot();
        assert_eq!(s.get("decrypt"), Some(&5));
        assert_eq!(s.get("rate_limited"), Some(&1));
    }
}
