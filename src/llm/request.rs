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

    /// As written in the config: the name, or the prefix with its `*`.
    pub fn as_written(&self) -> String {
        match self {
            ModelPattern::Exact(m) => m.clone(),
            ModelPattern::Prefix(p) => format!("{p}*"),
        }
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Exact(m) => m == model,
            ModelPattern::Prefix(p) => model.starts_with(p.as_str()),
        }
    }
}

/// What the gateway needs from a request body, read in one parse.
#[derive(Debug, Default, PartialEq)]
pub struct Inspected {
    pub model: Option<String>,
    /// OpenRouter's `models`: fallbacks the upstream may route to when `model` fails.
    pub fallbacks: Vec<String>,
    pub stream: bool,
    /// The most completion tokens one choice may have (SPEC §7 "Reservations"): the largest of
    /// `max_tokens`, `max_completion_tokens` and `max_output_tokens`; `None` when it names none.
    pub completion_limit: Option<u64>,
    /// How many choices it asks for: `n` or `best_of`, whichever is larger, at least 1.
    pub choices: u64,
    /// A limit field that is present but not a non-negative integer: 400 where a budget applies.
    pub bad_limit: Option<&'static str>,
}

/// The fields that bound how many tokens a request may produce.
const LIMIT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];
const MULTIPLIERS: [&str; 2] = ["n", "best_of"];

/// A parsed request body, kept so that stream-usage injection does not parse it again.
pub struct Parsed {
    value: serde_json::Value,
    pub inspected: Inspected,
}

/// Parses `body` as JSON. `None` when it is not JSON — or JSON a Python upstream would accept
/// and serde refuses (NaN, a BOM, a lone surrogate): forwarded unchanged unless an allow-list or a
/// budget needs to read it, where it is 400.
pub fn parse(body: &[u8]) -> Option<Parsed> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let inspected = inspect_value(&value);
    Some(Parsed { value, inspected })
}

fn inspect_value(v: &serde_json::Value) -> Inspected {
    let mut bad_limit = None;
    let mut field = |k: &'static str| match v.get(k) {
        None | Some(serde_json::Value::Null) => None,
        Some(n) => match n.as_u64() {
            Some(n) => Some(n),
            None => {
                bad_limit.get_or_insert(k);
                None
            }
        },
    };
    let limit = LIMIT_FIELDS.into_iter().filter_map(&mut field).max();
    let times = MULTIPLIERS
        .into_iter()
        .filter_map(&mut field)
        .max()
        .unwrap_or(1)
        .max(1);
    Inspected {
        model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
        fallbacks: v
            .get("models")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .map(|m| m.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default(),
        stream: v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false),
        completion_limit: limit,
        choices: times,
        bad_limit,
    }
}

impl Parsed {
    /// SPEC §7 `inject_stream_usage`: a streamed chat/completions request that did not ask for
    /// `stream_options.include_usage` gets it added. Returns the rewritten body, or `None` when
    /// the request is not a stream, already asks for usage, or is not in the chat/completions
    /// shape (`messages` or `prompt`; the Responses API's `input` and Anthropic's Messages always
    /// report usage and may refuse an unknown `stream_options`): then it is forwarded as sent.
    pub fn inject_include_usage(mut self) -> Option<Vec<u8>> {
        let obj = self.value.as_object_mut()?;
        if obj.get("stream").and_then(|s| s.as_bool()) != Some(true) {
            return None;
        }
        let chat_shape = (obj.contains_key("messages") || obj.contains_key("prompt"))
            && !obj.contains_key("input")
            && !obj.contains_key("anthropic_version");
        if !chat_shape {
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
        serde_json::to_vec(&self.value).ok()
    }
}

/// Applies a key's allow-list: 403 `model_not_allowed` when the model is missing or not listed,
/// or when any of OpenRouter's fallback `models` is not (the upstream may route to any of them).
pub fn check_models(allowed: &[ModelPattern], ins: &Inspected) -> Result<(), GatewayError> {
    let listed = |m: &str| allowed.iter().any(|p| p.matches(m));
    match &ins.model {
        Some(m) if listed(m) && ins.fallbacks.iter().all(|f| listed(f)) => Ok(()),
        // OpenRouter accepts `models` alone: its first entry is then the model.
        None if !ins.fallbacks.is_empty() && ins.fallbacks.iter().all(|f| listed(f)) => Ok(()),
        _ => Err(GatewayError::ModelNotAllowed),
    }
}

/// The model a WebSocket handshake names (SPEC §7: its `model` query parameter), decoded as a
/// form value. `Err` when it is named twice (an upstream may read the other one) or does not
/// decode: an allow-list cannot vouch for what it cannot read.
pub fn model_from_query(query: Option<&str>) -> Result<Option<String>, GatewayError> {
    let mut found = None;
    for v in query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("model="))
    {
        if found.is_some() {
            return Err(GatewayError::BadRequest);
        }
        found = Some(form_decode(v).ok_or(GatewayError::BadRequest)?);
    }
    Ok(found)
}

fn form_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
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
        let check = |b: &[u8]| match parse(b) {
            Some(p) => check_models(&allowed, &p.inspected).map(|()| p.inspected),
            None => Err(GatewayError::BadRequest),
        };
        assert!(check(body("openai/gpt-4o-mini").as_bytes()).is_ok());
        assert!(check(body("anthropic/claude-3.5-sonnet").as_bytes()).is_ok());
        for m in [
            "openai/gpt-4o",
            "openai/gpt-4o-mini-2",
            "anthropicx/y",
            "ANTHROPIC/x",
            "",
        ] {
            assert_eq!(
                check(body(m).as_bytes()),
                Err(GatewayError::ModelNotAllowed),
                "{m}"
            );
        }
        assert_eq!(
            check(b"{\"messages\":[]}"),
            Err(GatewayError::ModelNotAllowed)
        );
        assert_eq!(check(b"{\"model\":42}"), Err(GatewayError::ModelNotAllowed));
        assert_eq!(check(b"not json"), Err(GatewayError::BadRequest));
        let ins = check(b"{\"model\":\"anthropic/x\",\"stream\":true}").unwrap();
        assert!(ins.stream);
    }

    fn inj(b: &[u8]) -> Option<Vec<u8>> {
        parse(b)?.inject_include_usage()
    }

    #[test]
    fn injection_only_where_the_client_did_not_ask() {
        let out = inj(br#"{"model":"m","messages":[],"stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = inj(br#"{"prompt":"p","stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                v["stream_options"]["x"].as_u64(),
                v["stream_options"]["include_usage"].as_bool()
            ),
            (Some(1), Some(true))
        );
        assert!(inj(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(inj(br#"{"stream":false}"#).is_none());
        assert!(inj(br#"{"model":"m"}"#).is_none());
        assert!(inj(b"[1,2]").is_none());
        assert!(inj(b"nope").is_none());
        // Only the chat/completions shape: the Responses API (`input`) and Anthropic's Messages
        // on Bedrock/Vertex (`anthropic_version`) always report usage and may refuse the field.
        assert!(inj(br#"{"model":"m","input":"hi","stream":true}"#).is_none());
        assert!(
            inj(br#"{"anthropic_version":"vertex-2023-10-16","messages":[],"stream":true}"#)
                .is_none()
        );
    }

    #[test]
    fn the_reservation_covers_the_worst_case() {
        let limit = |b: &str| {
            let i = parse(b.as_bytes()).unwrap().inspected;
            (i.completion_limit.map(|l| l * i.choices), i.bad_limit)
        };
        assert_eq!(limit(r#"{"max_tokens":10}"#), (Some(10), None));
        assert_eq!(
            limit(r#"{"max_tokens":1,"max_completion_tokens":16000}"#),
            (Some(16000), None)
        );
        assert_eq!(
            limit(r#"{"max_output_tokens":300,"max_tokens":20}"#),
            (Some(300), None)
        );
        assert_eq!(limit(r#"{"max_tokens":10,"n":4}"#), (Some(40), None));
        assert_eq!(
            limit(r#"{"max_tokens":10,"best_of":3,"n":2}"#),
            (Some(30), None)
        );
        assert_eq!(limit(r#"{"max_tokens":10,"n":0}"#), (Some(10), None));
        assert_eq!(limit(r#"{"n":4}"#), (None, None));
        assert_eq!(parse(br#"{"n":4}"#).unwrap().inspected.choices, 4);
        assert_eq!(limit(r#"{"max_tokens":null}"#), (None, None));
        for bad in [
            r#"{"max_tokens":"16000"}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":1.5}"#,
            r#"{"max_completion_tokens":true}"#,
            r#"{"max_tokens":10,"n":"4"}"#,
        ] {
            assert!(limit(bad).1.is_some(), "{bad}");
        }
    }

    #[test]
    fn fallback_models_are_each_held_to_the_allow_list() {
        let allowed = pats(&["openai/*"]);
        let check = |b: &str| check_models(&allowed, &parse(b.as_bytes()).unwrap().inspected);
        assert!(check(r#"{"model":"openai/a","models":["openai/b"]}"#).is_ok());
        assert!(check(r#"{"models":["openai/a","openai/b"]}"#).is_ok());
        for b in [
            r#"{"model":"openai/a","models":["openai/b","anthropic/c"]}"#,
            r#"{"models":["anthropic/c"]}"#,
            r#"{"model":"openai/a","models":[42]}"#,
            r#"{"models":[]}"#,
        ] {
            assert_eq!(check(b), Err(GatewayError::ModelNotAllowed), "{b}");
        }
    }

    #[test]
    fn bodies_serde_refuses_are_not_parsed() {
        for b in [
            &br#"{"model":"m","temperature":NaN}"#[..],
            b"\xef\xbb\xbf{\"model\":\"m\"}",
            br#"{"model":"\ud800"}"#,
        ] {
            assert!(parse(b).is_none(), "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn handshake_models_from_the_query() {
        assert_eq!(model_from_query(None), Ok(None));
        assert_eq!(model_from_query(Some("a=1")), Ok(None));
        assert_eq!(
            model_from_query(Some("a=1&model=openai%2Fgpt-4o+x")),
            Ok(Some("openai/gpt-4o x".into()))
        );
        assert!(model_from_query(Some("model=a&model=b")).is_err());
        assert!(model_from_query(Some("model=%zz")).is_err());
        assert!(model_from_query(Some("model=%4")).is_err());
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
