//! LLM awareness (SPEC §7), landing in slices. Today: `llm = true` routes read the model from
//! JSON request bodies and enforce each key's `models` allow-list (request.rs), and the
//! incremental SSE scanner that usage extraction will run on (sse.rs). Not yet: usage ledger,
//! budgets, reservations; `[usage]`, `[budgets]` and a key's `budget` are still refused by the
//! config loader as unknown keys, so no operator can believe a budget is enforced when it is not.

pub mod request;
pub mod sse;
