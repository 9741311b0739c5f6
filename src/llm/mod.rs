//! LLM awareness (SPEC §7). `llm = true` routes read the model and `max_tokens` from JSON
//! request bodies and enforce each key's `models` allow-list (request.rs); read the usage of every
//! response, JSON or SSE (usage.rs over sse.rs), into the audit record and metrics; hold every
//! request to its key's and the gateway's budgets, with reservations (budget.rs), and charge it
//! by how its exchange ended (meter.rs); and, with
//! `usage.database`, record one row per request in the SQLite ledger (ledger.rs) that
//! `portcullis usage` reads and the budget book is rebuilt from at startup.

pub mod admit;
pub mod budget;
pub mod ledger;
pub mod meter;
pub mod request;
pub mod sse;
pub mod usage;

/// Completion tokens a request that names no limit reserves against budgets
/// (`usage.default_completion_reservation`).
pub const DEFAULT_COMPLETION_RESERVATION: u64 = 1024;
