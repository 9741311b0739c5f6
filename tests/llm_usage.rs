//! SPEC §7 usage in the audit log: from a JSON response, from the last SSE event that carries
//! it, and recorded as `none` when the upstream reports nothing; bounded `model` metric label.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_usage-key-0123456789abcdefghijklmnopqrstuv";

/// POSTs `body` as JSON (with `key` as bearer, if any) and returns the response text.
async fn post_text(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> String {
    let mut req = c.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn usage_from_json_and_streams_reaches_the_audit_record() {
    let up = upstream().await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{}[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        key_block(
            "phone",
            KEY,
            "models = [\"openai/gpt-4o-mini\", \"anthropic/*\"]"
        ),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let ask = |body: serde_json::Value| c.post(&url).bearer_auth(KEY).json(&body).send();

    // JSON response.
    let r = ask(serde_json::json!({"model": "openai/gpt-4o-mini", "messages": []}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    // Stream with include_usage: the client still sees its usage event, byte for byte.
    let asks_usage = serde_json::json!({"model": "anthropic/claude-x", "stream": true, "stream_options": {"include_usage": true}});
    let direct = post_text(
        &c,
        &format!("{}/v1/chat/completions", up.url()),
        None,
        &asks_usage,
    )
    .await;
    assert!(direct.contains("\"usage\""));
    assert_eq!(post_text(&c, &url, Some(KEY), &asks_usage).await, direct);
    // Stream without usage: recorded as such, never guessed.
    let r = ask(serde_json::json!({"model": "anthropic/claude-x", "stream": true}))
        .await
        .unwrap();
    let _ = r.text().await.unwrap();

    let recs = gw.wait_requests(3).await;
    assert_eq!(recs[0]["model"], "openai/gpt-4o-mini");
    assert_eq!(
        (
            recs[0]["prompt_tokens"].as_u64(),
            recs[0]["completion_tokens"].as_u64()
        ),
        (Some(11), Some(5))
    );
    assert_eq!(recs[0]["usage_source"], "upstream");
    assert_eq!(recs[0]["cost_usd"], serde_json::Value::Null);
    assert_eq!(recs[0]["cost_source"], serde_json::Value::Null);

    assert_eq!(recs[1]["model"], "anthropic/claude-x");
    assert_eq!(
        (
            recs[1]["prompt_tokens"].as_u64(),
            recs[1]["completion_tokens"].as_u64()
        ),
        (Some(21), Some(3))
    );
    assert_eq!(recs[1]["cost_usd"], 0.00042);
    assert_eq!(recs[1]["cost_source"], "upstream");

    assert_eq!(recs[2]["usage_source"], "none");
    assert_eq!(recs[2]["prompt_tokens"], serde_json::Value::Null);

    // Metrics: exact allow-list names are labels; anything else is "other".
    let text = gw.metrics_text().await;
    for needle in [
        "portcullis_llm_tokens_total{route=\"bridge\",key_id=\"phone\",model=\"openai/gpt-4o-mini\",kind=\"prompt\"} 11",
        "portcullis_llm_tokens_total{route=\"bridge\",key_id=\"phone\",model=\"other\",kind=\"completion\"} 3",
        "portcullis_llm_cost_usd_total{key_id=\"phone\"} 0.00042",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[tokio::test]
async fn injected_stream_usage_is_counted_and_invisible_to_the_client() {
    let up = upstream().await;
    let config = format!(
        "{}[usage]\ninject_stream_usage = true\n[usage.prices.\"openai/gpt-4o-mini\"]\ninput = 0.15\noutput = 0.60\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        key_block("phone", KEY, ""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let stream_req =
        serde_json::json!({"model": "anthropic/claude-x", "stream": true, "messages": []});
    // What the client would get from the upstream directly for the request it sent.
    let direct = post_text(
        &c,
        &format!("{}/v1/chat/completions", up.url()),
        None,
        &stream_req,
    )
    .await;
    assert!(!direct.contains("usage"));
    let via = post_text(&c, &gw.url("/v1/chat/completions"), Some(KEY), &stream_req).await;
    assert_eq!(via, direct, "the client sees exactly what it asked for");
    // The upstream was asked for usage on the gateway's behalf.
    let seen = up.seen();
    assert_eq!(seen.len(), 2);

    // A JSON answer without a cost, for a priced model: cost from [usage.prices].
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"model": "openai/gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    let _ = r.text().await.unwrap();

    let recs = gw.wait_requests(2).await;
    assert_eq!(recs[0]["usage_source"], "upstream", "{}", recs[0]);
    assert_eq!(
        (
            recs[0]["prompt_tokens"].as_u64(),
            recs[0]["completion_tokens"].as_u64()
        ),
        (Some(21), Some(3))
    );
    assert_eq!(recs[0]["cost_source"], "upstream");
    assert_eq!(recs[1]["cost_source"], "prices");
    let cost = recs[1]["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (11.0 * 0.15 + 5.0 * 0.60) / 1e6).abs() < 1e-12,
        "{cost}"
    );
}
