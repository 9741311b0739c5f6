//! LLM awareness (SPEC §7), landing in slices. Today: the incremental SSE scanner that usage
//! extraction will run on. Not yet wired into the pipeline: `llm`, `[usage]`, `[budgets]`,
//! `models` and `budget` are still refused by the config loader as unknown keys, so no operator
//! can believe a budget is enforced when it is not.

pub mod sse;
