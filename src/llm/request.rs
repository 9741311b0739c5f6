//! Reading an OpenAI-style request body (SPEC §7 "Requests"): the model it names, and whether a
//! key's `models` allow-list admits it. The body is already capped by the route's `max_body`.

use crate::error::GatewayError;

/// One entry of a key's `models` list: an exact name, or a prefix written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPattern {
    Exact(String),
    Prefix(String),
}

impl ModelPattern {
    pub fn parse(s: &str) -> Result<ModelPattern, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a model name cannot be empty".into());
        }
        match s.strip_suffix('*') {
            Some(p) if p.contains('*') => Err(format!("{s:?}: only a trailing * is allowed")),
            Some(p) => Ok(ModelPattern::Prefix(p.to_owned())),
            None if s.contains('*') => Err(format!("{s:?}: only a trailing * is allowed")),
            None => Ok(ModelPattern::Exact(s.to_owned())),
        }
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Exact(m) => m == model,
            ModelPattern::Prefix(p) => model.starts_with(p.as_str()),
        }
    }
}

/// What the gateway needs from a request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`: what a reservation holds for the completion.
    pub max_tokens: Option<u64>,
}

/// Parses `body` as JSON. `None` when it is not JSON (forwarded unchanged unless a key's
/// allow-list needs the model).
pub fn inspect(body: &[u8]) -> Option<Inspected> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(Inspected {
        model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
        stream: v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false),
        max_tokens: ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|m| m.as_u64())),
    })
}

/// SPEC §7 `inject_stream_usage`: a streamed request that did not ask for
/// `stream_options.include_usage` gets it added. Returns the rewritten body, or `None` when the
/// request is not a stream or already asks for usage (then it is forwarded as sent).
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    if obj.get("stream").and_then(|s| s.as_bool()) != Some(true) {
        return None;
    }
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    let opts = opts.as_object_mut()?;
    if opts.get("include_usage").and_then(|u| u.as_bool()) == Some(true) {
        return None;
    }
    opts.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok()
}

/// Applies a key's allow-list to a request body: 400 when the body is not JSON, 403
/// `model_not_allowed` when the model is missing or not listed.
pub fn check_models(allowed: &[ModelPattern], body: &[u8]) -> Result<Inspected, GatewayError> {
    let ins = inspect(body).ok_or(GatewayError::BadRequest)?;
    match &ins.model {
        Some(m) if allowed.iter().any(|p| p.matches(m)) => Ok(ins),
        _ => Err(GatewayError::ModelNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> Vec<ModelPattern> {
        list.iter()
            .map(|s| ModelPattern::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn allow_lists_with_exact_names_and_prefixes() {
        let allowed = pats(&["openai/gpt-4o-mini", "anthropic/*"]);
        let body = |m: &str| format!("{{\"model\":\"{m}\",\"messages\":[]}}");
        assert!(check_models(&allowed, body("openai/gpt-4o-mini").as_bytes()).is_ok());
        assert!(check_models(&allowed, body("anthropic/claude-3.5-sonnet").as_bytes()).is_ok());
        for m in [
            "openai/gpt-4o",
            "openai/gpt-4o-mini-2",
            "anthropicx/y",
            "ANTHROPIC/x",
            "",
        ] {
            assert_eq!(
                check_models(&allowed, body(m).as_bytes()),
                Err(GatewayError::ModelNotAllowed),
                "{m}"
            );
        }
        assert_eq!(
            check_models(&allowed, b"{\"messages\":[]}"),
            Err(GatewayError::ModelNotAllowed)
        );
        assert_eq!(
            check_models(&allowed, b"{\"model\":42}"),
            Err(GatewayError::ModelNotAllowed)
        );
        assert_eq!(
            check_models(&allowed, b"not json"),
            Err(GatewayError::BadRequest)
        );
        let ins = check_models(&allowed, b"{\"model\":\"anthropic/x\",\"stream\":true}").unwrap();
        assert!(ins.stream);
    }

    #[test]
    fn injection_only_where_the_client_did_not_ask() {
        let out = inject_include_usage(br#"{"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = inject_include_usage(br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                v["stream_options"]["x"].as_u64(),
                v["stream_options"]["include_usage"].as_bool()
            ),
            (Some(1), Some(true))
        );
        assert!(
            inject_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        assert!(inject_include_usage(br#"{"stream":false}"#).is_none());
        assert!(inject_include_usage(br#"{"model":"m"}"#).is_none());
        assert!(inject_include_usage(b"[1,2]").is_none());
        assert!(inject_include_usage(b"nope").is_none());
    }

    #[test]
    fn patterns() {
        assert!(ModelPattern::parse("a*b").is_err());
        assert!(ModelPattern::parse("*a*").is_err());
        assert!(ModelPattern::parse(" ").is_err());
        assert_eq!(
            ModelPattern::parse("*").unwrap(),
            ModelPattern::Prefix(String::new())
        );
    }
}
