//! Shared test support: the real gateway binary on an ephemeral port, real upstream servers
//! (hyper and tungstenite apps), certificates made with rcgen, and the audit log as JSON.
//!
//! One module per concern, all re-exported here, so that a test's `use support::*;` reaches
//! every helper: `gateway` (the binary, its output and audit records), `upstream` (the
//! servers behind it), `pki` (TLS), `raw` (raw HTTP/1.1 requests and answers), `redis` (a real
//! redis-server for `[cluster]`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod gateway;
mod pki;
mod raw;
mod redis;
mod resp;
mod upstream;

// Every test binary compiles this tree but uses only some of it: a re-export that one binary
// does not use is not a mistake.
#[allow(unused_imports)]
pub use {gateway::*, pki::*, raw::*, redis::*, upstream::*};

/// The bound on every wait in the tests: a line, a response, an exit.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits (bounded by `within`) until `pred` gives a value for what `rx` watches; woken on every
/// change. `None` when the time ran out or the sender is gone.
pub async fn wait_watch<V, T>(
    rx: &mut tokio::sync::watch::Receiver<V>,
    within: std::time::Duration,
    mut pred: impl FnMut(&V) -> Option<T>,
) -> Option<T> {
    let mut out = None;
    let r = tokio::time::timeout(
        within,
        rx.wait_for(|v| {
            out = pred(v);
            out.is_some()
        }),
    )
    .await;
    match r {
        Ok(Ok(_)) => out,
        _ => None,
    }
}
