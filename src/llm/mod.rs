//! LLM awareness (SPEC §7), landing in slices. Today: `llm = true` routes read the model from
//! JSON request bodies and enforce each key's `models` allow-list (request.rs), and read the
//! usage of every response, JSON or SSE (usage.rs over sse.rs), into the audit record and
//! metrics. With `usage.database`, every `llm` request is also a row in the SQLite ledger (ledger.rs) that
//! `portcullis usage` reads. Not yet: budgets and reservations; `[usage]`, `[budgets]` and a key's `budget` are still refused by the
//! config loader as unknown keys, so no operator can believe a budget is enforced when it is not.

pub mod budget;
pub mod ledger;
pub mod request;
pub mod sse;
pub mod usage;
