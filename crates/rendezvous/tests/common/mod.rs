//! Shared pieces of the store tests: a store opened through the fault
//! backends of `messenger_testkit::redb_fault`.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use messenger_rendezvous::store::{Store, StoreError, StoreOptions, bodies_dir};
pub use messenger_testkit::redb_fault::{Fault, FaultBackend};

/// A store on the database file `path` through fault backends sharing
/// `fault`, bodies in [`bodies_dir`] of `path`.
pub fn open_faulty(
    path: &Path,
    fault: &Arc<Fault>,
    options: StoreOptions,
) -> Result<Store, StoreError> {
    let bodies = bodies_dir(path);
    let path: PathBuf = path.to_owned();
    let fault = Arc::clone(fault);
    Store::open_with_backend(
        move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            FaultBackend::new(file, Arc::clone(&fault))
        },
        &bodies,
        options,
    )
}
