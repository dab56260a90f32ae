//! Entering a network namespace from a thread: the one place in the lab that calls into libc.
//!
//! Owns: `setns(CLONE_NEWNET)` on a fresh, dedicated thread, so that sockets the closure
//! creates live in the named namespace (`/var/run/netns/NAME`). The calling thread and every
//! other thread of the test process stay in their own namespace.
//! Must not touch: namespaces it did not get by name, other namespace kinds (mount, user, pid),
//! or any thread other than the one it spawns.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Path of a namespace created with `ip netns add NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Moves the *current thread* into the network namespace `name`.
///
/// Only called at the start of a thread that [`run_in`] or [`spawn_in_thread`] created for
/// this purpose, so no other code ever observes the switch.
fn enter(name: &str) {
    let path = netns_path(name);
    let file = File::open(&path).unwrap_or_else(|e| {
        panic!(
            "cannot open network namespace {}: {e} (was it deleted?)",
            path.display()
        )
    });
    // SAFETY: `setns` is called with a file descriptor that stays open for the whole call
    // (`file` is dropped only after it returns) and refers to a network namespace file under
    // /var/run/netns. CLONE_NEWNET only changes the network namespace of the calling thread,
    // which is a fresh thread dedicated to the closure, so no Rust object observes a changed
    // invariant: sockets opened before the call keep their namespace, later ones get the new one.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!(
            "setns({}, CLONE_NEWNET) failed: {} (run as root)",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    drop(file);
}

/// Runs `f` on a fresh thread inside the network namespace `ns` and returns its result.
/// A panic in `f` is re-raised in the caller. The closure may borrow from the caller.
pub fn run_in<F, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns:{ns}"))
            .spawn_scoped(scope, || {
                enter(ns);
                f()
            })
            .expect("spawn a thread for run_in");
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Starts `f` on a detached (joinable) thread inside the network namespace `ns`.
pub fn spawn_in_thread<F, T>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns:{ns}"))
        .spawn(move || {
            enter(&ns);
            f()
        })
        .expect("spawn a thread for spawn_in_thread")
}
