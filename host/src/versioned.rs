//! A value shared across threads and replaced whole (the topology, the plugin set), with a
//! version beside it: a reader compares the version (one atomic load) before it loads the
//! value (`arc_swap`'s protocol, with atomics of its own), and keeps what it loaded while the
//! version holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

/// See the module documentation.
pub struct Versioned<T> {
    current: ArcSwap<T>,
    version: AtomicU64,
}

impl<T> Versioned<T> {
    /// Starts with `value` at `version`.
    pub fn new(value: T, version: u64) -> Versioned<T> {
        Versioned {
            current: ArcSwap::from_pointee(value),
            version: AtomicU64::new(version),
        }
    }

    /// The version of the current value (cheap: compare before loading).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Replaces the value; its version is published after it, so a reader that sees the new
    /// version loads the new value.
    pub fn store(&self, value: T, version: u64) {
        self.current.store(Arc::new(value));
        self.version.store(version, Ordering::Release);
    }
}
