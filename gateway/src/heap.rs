//! How the gateway's heap gives memory back after the big, rare allocations of a
//! registry load.
//!
//! Owns three calls: [`configure`] at start, [`in_scratch_arena`] for the parse and delta
//! work of a load, and [`release_free_memory`] after a snapshot or delta is applied.
//! A load allocates several times the registry's size for a moment (the JSON line, the
//! parsed records, a delta's JSON tree, the old and the new view). glibc's defaults keep
//! most of that: its mmap threshold rises to the size of the largest block freed (up to
//! 32 MiB), so later multi-megabyte buffers land in the arenas, and freed arena pages stay
//! resident. Measured at 100,000 devices (BENCHMARKS.md), a trim after each load in both
//! cases: 163.7 MB resident with glibc's default threshold, 79.8 MB with a fixed 128 KiB
//! one. Must not be called on the knock path (`release_free_memory` walks every arena:
//! 5.4 ms after a 100,000-device load, `examples/view_memory.rs`).

/// Blocks of at least this size are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Fixes the allocator's mmap threshold at [`MMAP_THRESHOLD`] (glibc; nothing
/// elsewhere). Call once at start, before the threads are spawned.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes allocator parameters; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// Asks the allocator to give free pages back to the kernel (`malloc_trim(0)` on glibc;
/// nothing elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointer and only reorganizes the allocator's own free
    // lists; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops `garbage` (e.g. a loaded snapshot's records, allocated by [`in_scratch_arena`])
/// on a short-lived helper thread, which most likely gets the scratch arena back (glibc
/// hands a new thread the arena a thread released last), and shrinks that arena after.
pub fn drop_in_scratch_arena<T: Send>(garbage: T) {
    in_scratch_arena(move || drop(garbage));
}

/// Makes glibc shrink the calling thread's arena (a non-main arena's free top is not
/// returned by `malloc_trim`: only a free of a block of at least 64 KiB shrinks it, and a
/// load's last frees may all be small). Measured at 100,000 devices with both vCPUs kept
/// busy by other processes (`POSTERN_BENCH_LOAD_ONLY=1 scripts/bench --only memory`):
/// without it 4 loads of 10 left a 48-50 MB arena heap resident, whose contents were stale
/// snapshot records and malloc_trim did not release (VmRSS 84-88 MB instead of 38 MB);
/// with it 0 of 13.
fn trim_this_threads_arena() {
    // Above the consolidation threshold (64 KiB), below the mmap threshold: carved from
    // the arena, and its free runs the arena's trim.
    let block = vec![1u8; 96 * 1024];
    std::hint::black_box(&block);
    drop(block);
}

/// Runs `work` on a short-lived helper thread and returns its result. glibc gives each
/// thread its own arena, so the transient garbage of a registry load (hundreds of
/// thousands of small strings and JSON nodes) lands in an arena that holds nothing
/// long-lived; once freed, [`release_free_memory`] can give all of it back. Done on the
/// calling thread, the same garbage would be interleaved with the view built next to it,
/// and the view's few small blocks would keep whole pages of freed garbage resident
/// (measured: ~15 MB at 100,000 devices, BENCHMARKS.md). Falls back to running `work` here
/// if no thread can be spawned.
pub fn in_scratch_arena<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    let work = std::sync::Mutex::new(Some(work));
    let done = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("registry-load".into())
            .spawn_scoped(scope, || {
                let w = work.lock().ok().and_then(|mut w| w.take());
                let out = w.map(|w| w());
                trim_this_threads_arena();
                out
            });
        match spawned.map(|h| h.join()) {
            Ok(Ok(out)) => out,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => None, // no thread: run it here
        }
    });
    if let Some(out) = done {
        return out;
    }
    match work
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(w) => w(),
        None => unreachable!("the work is taken only by a helper that returned its result"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_work_runs_on_another_thread_and_returns_its_result() {
        let here = std::thread::current().id();
        let (there, value) = in_scratch_arena(|| (std::thread::current().id(), vec![7u8; 3]));
        assert_ne!(there, here, "the work ran on a helper thread");
        assert_eq!(value, vec![7, 7, 7]);
        release_free_memory();
    }

    #[test]
    fn a_panic_in_scratch_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| in_scratch_arena(|| panic!("boom")));
        assert!(caught.is_err());
    }
}
