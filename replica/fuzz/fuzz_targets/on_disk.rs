//! Fuzzes every format the replica daemon parses from its data directory at start
//! (volume records, manifests, layer headers, meta entries, dirty maps, in-sync
//! records): a damaged or hostile file must give an error, never a panic, and what a
//! parser accepts must re-encode to the same value. The first byte picks the format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_replica::fuzzing::{on_disk, OnDisk};

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, bytes)) = data.split_first() {
        on_disk(OnDisk::from_selector(selector), bytes);
    }
});
