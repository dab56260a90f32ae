//! The knock intake: the capture thread and the crypto workers, up to an authenticated
//! knock (or a drop) handed to the decision thread.
//!
//! Owns the threads and their plumbing: the capture thread runs the cheap checks
//! (`packet::precheck`, the per-source token bucket) and feeds the bounded fair queue
//! (admission.rs holds the policy); the crypto workers take a token from the global crypto
//! budget, decrypt and verify ([`Opener::authenticate`]), and send the outcome to the
//! decision thread over a bounded channel. Also owns the drop counters and the rate limit
//! on per-packet drop lines. Must not touch the firewall, the replay cache or the session
//! table: those stay on the one decision thread (daemon.rs).

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postern_protocol::packet;
use serde_json::{json, Value};

use crate::admission::{
    lock_ignoring_poison as lock, Counters, DatagramPool, FairQueue, LineLimiter, Pushed,
    SourceTable, TokenBucket,
};
use crate::audit::{AuditLog, KnockExtra};
use crate::capture::{Capture, Peer, BUFFER_LEN};
use crate::clock::Clock;
use crate::pipeline::{Authenticated, Decision, Opener};
use crate::sync::SharedView;

/// Verified results waiting for the decision thread, at most (see `Intake::start`).
const MAX_RESULTS_BUFFERED: usize = 1024;

/// The admission knobs (config fields of the same names, see docs/operations.md).
#[derive(Debug, Clone, Copy)]
pub struct IntakeLimits {
    pub per_source_rate: u32,
    pub per_source_burst: u32,
    pub source_table_size: usize,
    pub crypto_queue: usize,
    pub crypto_budget: u32,
    pub crypto_workers: usize,
    pub drop_lines_per_sec: u32,
}

/// One datagram's way out of the intake.
#[derive(Debug)]
pub struct Outcome {
    pub src: IpAddr,
    /// Source port and destination address of the datagram (for a reply).
    pub peer: Peer,
    /// When the capture thread received it (for latency figures).
    pub received: Instant,
    /// Authenticated, or dropped by the crypto stage.
    pub result: Result<Authenticated, Decision>,
}

struct Item {
    /// The sender's own address (the queue is keyed by its /64 for IPv6).
    src: IpAddr,
    peer: Peer,
    datagram: Vec<u8>,
    received: Instant,
}

struct Shared {
    queue: Mutex<FairQueue<Item>>,
    /// The queued datagrams' buffers, reused (no allocation per packet).
    datagrams: DatagramPool,
    ready: Condvar,
    budget: Mutex<TokenBucket>,
    counters: Arc<Counters>,
    lines: Mutex<LineLimiter>,
    sources: AtomicUsize,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    audit: Arc<AuditLog>,
    clock: Clock,
}

impl Shared {
    fn mono_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts an unauthenticated drop and writes its audit line unless rate-limited.
    fn drop_line(&self, src: IpAddr, reason: &'static str) {
        self.counters.add(reason, 1);
        let allowed = lock(&self.lines).allow(self.mono_ms());
        if let Some(suppressed) = allowed {
            let extra = KnockExtra {
                suppressed: (suppressed > 0).then_some(suppressed),
                ..KnockExtra::default()
            };
            self.audit
                .knock_with(self.clock.now_ms(), src, &Decision::Drop { reason }, extra);
        }
    }
}

/// The running intake threads. Dropping it stops them (after the shared stop flag is set).
pub struct Intake {
    shared: Arc<Shared>,
    results: Receiver<Outcome>,
    capture_error: Arc<Mutex<Option<io::Error>>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// Starts the capture thread and `limits.crypto_workers` workers.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        capture: Capture,
        opener: Opener,
        view: SharedView,
        clock: Clock,
        audit: Arc<AuditLog>,
        counters: Arc<Counters>,
        stop: Arc<AtomicBool>,
        limits: IntakeLimits,
    ) -> io::Result<Intake> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(FairQueue::new(limits.crypto_queue)),
            datagrams: DatagramPool::default(),
            ready: Condvar::new(),
            budget: Mutex::new(TokenBucket::new(
                limits.crypto_budget,
                // A tenth of a second of budget may be spent at once.
                (limits.crypto_budget / 10).max(1),
                0,
            )),
            counters,
            lines: Mutex::new(LineLimiter::new(limits.drop_lines_per_sec)),
            sources: AtomicUsize::new(0),
            epoch: Instant::now(),
            stop,
            audit,
            clock,
        });
        // Knocks wait in the fair queue (bounded by `crypto_queue`, dropped fairly when
        // full); verified results only need a small buffer to the decision thread: a full
        // one makes the crypto workers wait, which backs up into the fair queue. Each slot
        // is ~250 bytes, allocated up front (`crypto_queue = 100000` here cost 25 MB).
        let (tx, results) = mpsc::sync_channel(limits.crypto_queue.clamp(16, MAX_RESULTS_BUFFERED));
        let capture_error = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        {
            let shared = Arc::clone(&shared);
            let error = Arc::clone(&capture_error);
            let key_id = opener.key_id();
            threads.push(
                std::thread::Builder::new()
                    .name("capture".into())
                    .spawn(move || capture_loop(capture, key_id, &shared, &error, limits))?,
            );
        }
        for i in 0..limits.crypto_workers.max(1) {
            let shared = Arc::clone(&shared);
            let opener = opener.clone();
            let view = Arc::clone(&view);
            let tx = tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("crypto-{i}"))
                    .spawn(move || worker_loop(&opener, &view, &shared, &tx))?,
            );
        }
        Ok(Intake {
            shared,
            results,
            capture_error,
            threads,
        })
    }

    /// The next outcome, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Outcome> {
        self.results.recv_timeout(timeout).ok()
    }

    /// The capture thread's fatal error, if it stopped on one.
    pub fn take_capture_error(&self) -> Option<io::Error> {
        lock(&self.capture_error).take()
    }

    /// Counts a decision; writes its audit line (drops are rate-limited, authenticated
    /// decisions always get their own line).
    pub fn record(&self, ts_ms: u64, src: IpAddr, decision: &Decision) {
        self.record_with(ts_ms, src, decision, KnockExtra::default());
    }

    /// [`Intake::record`] with extra fields on an authenticated decision's line (e.g.
    /// `reply`); drop lines never carry them.
    pub fn record_with(&self, ts_ms: u64, src: IpAddr, decision: &Decision, extra: KnockExtra) {
        match decision {
            Decision::Drop { reason } => self.shared.drop_line(src, reason),
            _ => {
                self.shared.counters.add(decision.verdict(), 1);
                self.shared.audit.knock_with(ts_ms, src, decision, extra);
            }
        }
    }

    /// The `stats` audit event's fields.
    pub fn stats(&self) -> Value {
        json!({
            "counters": self.shared.counters.snapshot(),
            "queued_now": lock(&self.shared.queue).len(),
            "sources_tracked": self.shared.sources.load(Ordering::Relaxed),
            "drop_lines_suppressed": lock(&self.shared.lines).suppressed_total(),
        })
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ready.notify_all();
        // Workers blocked on a full result channel wake when it is dropped; drain it first.
        while self.results.try_recv().is_ok() {}
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn capture_loop(
    mut capture: Capture,
    key_id: postern_protocol::keys::GatewayKeyId,
    shared: &Shared,
    error: &Mutex<Option<io::Error>>,
    limits: IntakeLimits,
) {
    let mut sources = SourceTable::new(
        limits.source_table_size,
        limits.per_source_rate,
        limits.per_source_burst,
    );
    let mut buf = vec![0u8; BUFFER_LEN];
    while !shared.stop.load(Ordering::Relaxed) {
        let (peer, datagram) = match capture.recv(&mut buf) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                *lock(error) = Some(e);
                shared.stop.store(true, Ordering::SeqCst);
                shared.ready.notify_all();
                return;
            }
        };
        let src = peer.src;
        if let Err(e) = packet::precheck(datagram, key_id) {
            shared.drop_line(src, e.reason());
            continue;
        }
        let admitted = sources.admit(src, shared.mono_ms());
        shared.sources.store(sources.len(), Ordering::Relaxed);
        if !admitted {
            shared.drop_line(src, "rate_limited");
            continue;
        }
        let item = Item {
            src,
            peer,
            datagram: shared.datagrams.copy_of(datagram),
            received: Instant::now(),
        };
        let pushed = lock(&shared.queue).push(src, item);
        shared.ready.notify_one();
        match pushed {
            Pushed::Queued => {}
            Pushed::DroppedNewcomer(item) => {
                shared.datagrams.give_back(item.datagram);
                shared.drop_line(src, "queue_full");
            }
            Pushed::DroppedOldest(from, item) => {
                shared.datagrams.give_back(item.datagram);
                shared.drop_line(from, "queue_full");
            }
        }
    }
}

fn worker_loop(opener: &Opener, view: &SharedView, shared: &Shared, tx: &SyncSender<Outcome>) {
    loop {
        let next = {
            let mut queue = lock(&shared.queue);
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(next) = queue.pop() {
                    break next;
                }
                queue = match shared.ready.wait_timeout(queue, Duration::from_millis(100)) {
                    Ok((q, _)) => q,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
        };
        // The global crypto budget: wait for a token (the queue absorbs the burst meanwhile).
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let wait = {
                let mut budget = lock(&shared.budget);
                let now = shared.mono_ms();
                if budget.try_take(now) {
                    0
                } else {
                    budget.wait_ms(now).clamp(1, 50)
                }
            };
            if wait == 0 {
                break;
            }
            shared.counters.add("budget_waits", 1);
            std::thread::sleep(Duration::from_millis(wait));
        }
        let (_, item) = next;
        let current = view.load();
        let result = opener.authenticate(current.as_deref(), &item.datagram, shared.clock.now_ms());
        shared.datagrams.give_back(item.datagram);
        let outcome = Outcome {
            src: item.src,
            peer: item.peer,
            received: item.received,
            result,
        };
        if tx.send(outcome).is_err() {
            return;
        }
    }
}
