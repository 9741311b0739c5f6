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
