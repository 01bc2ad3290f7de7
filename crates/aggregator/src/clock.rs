//! Wall-clock time in the units the window store uses.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current UTC second since the Unix epoch.
pub(crate) fn now_second() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
