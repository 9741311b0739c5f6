//! Config errors name the file, line:column and key path, and exit 1; a good config prints a
//! summary without secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::check;

const ROUTE: &str =
    "[[routes]]\nname = \"api\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:8000\"\n";

/// Runs `check` and asserts exit 1 and that stderr holds every fragment.
fn refused(config: &str, env: &[(&str, &str)], fragments: &[&str]) {
    let (code, _out, err) = check(config, env);
    assert_eq!(
        code, 1,
        "config should be refused:\n{config}\nstderr: {err}"
    );
    assert!(err.contains("portcullis.toml"), "file not named: {err}");
    for f in fragments {
        assert!(err.contains(f), "missing {f:?} in: {err}");
    }
}

#[test]
fn unknown_key_is_an_error_with_line_and_column() {
    refused(
        &format!("[server]\nlisten = \"127.0.0.1:0\"\nper_ipp = \"10/min\"\n{ROUTE}"),
        &[],
        &["portcullis.toml:3:1", "server", "unknown field `per_ipp`"],
    );
}

#[test]
fn misspelt_route_limit_is_an_error() {
    refused(
        &format!("{ROUTE}per_ipp = \"10/min\"\n"),
        &[],
        &["routes[0]", "unknown field `per_ipp`"],
    );
}

#[test]
fn invalid_upstream_url_names_its_key_path() {
    refused(
        &format!("{ROUTE}[[routes]]\nname = \"b\"\npath = \"/b/\"\nupstream = \"ftp://x\"\n"),
        &[],
        &["portcullis.toml:8:12", "routes[1].upstream: invalid URL"],
    );
}

#[test]
fn zero_rate_is_refused() {
    refused(
        &format!("{ROUTE}per_ip = \"0/min\"\n"),
        &[],
        &["routes[0].per_ip", "use \"off\""],
    );
}

#[test]
fn duplicate_route_names_are_refused() {
    refused(
        &format!("{ROUTE}{}", ROUTE.replace("/v1/", "/v2/")),
        &[],
        &["routes[1].name: duplicate route name \"api\""],
    );
}

#[test]
fn unresolved_secret_names_the_variable_never_a_value() {
    let cfg = format!(
        "{ROUTE}[routes.upstream_headers]\nauthorization = \"Bearer ${{NOT_SET_ANYWHERE_42}}\"\n"
    );
    refused(
        &cfg,
        &[],
        &[
            "routes[0].upstream_headers.authorization",
            "NOT_SET_ANYWHERE_42",
        ],
    );
}

#[test]
fn public_plaintext_listener_is_refused_without_tls() {
    refused(
        &format!("[server]\nlisten = \"0.0.0.0:8080\"\n{ROUTE}"),
        &[],
        &[
            "portcullis.toml:2:10",
            "server.listen",
            "allow_plaintext_public",
        ],
    );
    let (code, _, err) = check(
        &format!("[server]\nlisten = \"0.0.0.0:8080\"\nallow_plaintext_public = true\n{ROUTE}"),
        &[],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_units_are_refused() {
    refused(
        &format!("[server]\nheader_timeout = \"10\"\n{ROUTE}"),
        &[],
        &["server.header_timeout", "invalid duration"],
    );
    refused(
        &format!("[server]\nmax_body = \"10 parsecs\"\n{ROUTE}"),
        &[],
        &["server.max_body", "invalid size"],
    );
    refused(
        &format!("[limits]\nper_ip = \"10/fortnight\"\n{ROUTE}"),
        &[],
        &["limits.per_ip", "unknown unit"],
    );
}

#[test]
fn bad_cidr_is_refused() {
    refused(
        &format!("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.300/8\"]\n{ROUTE}"),
        &[],
        &["server.trusted_proxies[1]", "invalid CIDR"],
    );
}

#[test]
fn malformed_key_hash_and_unknown_key_route_are_refused() {
    refused(
        &format!("{ROUTE}[[keys]]\nid = \"phone\"\nhash = \"md5:abc\"\n"),
        &[],
        &["keys[0].hash", "sha256:"],
    );
    let hash = format!("sha256:{}", "ab".repeat(32));
    refused(
        &format!("{ROUTE}[[keys]]\nid = \"phone\"\nhash = \"{hash}\"\nroutes = [\"nope\"]\n"),
        &[],
        &["keys[0].routes[0]", "no route named \"nope\""],
    );
}

#[test]
fn cors_wildcard_with_credentials_is_refused() {
    refused(
        &format!("[cors]\nallowed_origins = [\"*\"]\nallow_credentials = true\n{ROUTE}"),
        &[],
        &["cors.allowed_origins", "allow_credentials"],
    );
}

#[test]
fn toml_syntax_error_points_at_the_line() {
    refused(
        &format!("[server]\nlisten = \"127.0.0.1:0\n{ROUTE}"),
        &[],
        &["portcullis.toml:2:"],
    );
}

#[test]
fn env_override_error_names_the_variable() {
    refused(
        ROUTE,
        &[("PORTCULLIS_SERVER__HEADER_TIMEOUT", "soon")],
        &["server.header_timeout", "PORTCULLIS_SERVER__HEADER_TIMEOUT"],
    );
    let (code, out, err) = check(ROUTE, &[("PORTCULLIS_SERVER__LISTEN", "127.0.0.1:9443")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("127.0.0.1:9443"), "{out}");
}

#[test]
fn env_override_of_a_string_field_stays_a_string_and_values_are_never_echoed() {
    // A numeric-looking token is still a token (it used to be refused as an integer, and the
    // error printed it).
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\n{ROUTE}");
    let (code, out, err) = check(&admin, &[("PORTCULLIS_ADMIN__TOKEN", "123456")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("123456") && !err.contains("123456"),
        "{out}{err}"
    );
    // Numbers still override numbers.
    let (code, _, err) = check(ROUTE, &[("PORTCULLIS_SERVER__MAX_CONNECTIONS", "64")]);
    assert_eq!(code, 0, "{err}");
    // A bad value is named by its variable, never shown.
    for (var, value) in [
        ("PORTCULLIS_SERVER__HEADER_TIMEOUT", "hunter2-secret"),
        ("PORTCULLIS_SERVER__MAX_CONNECTIONS", "\"hunter2-secret\""),
        ("PORTCULLIS_SERVER__LISTEN", "hunter2-secret"),
    ] {
        let (code, _, err) = check(ROUTE, &[(var, value)]);
        assert_eq!(code, 1, "{var}: {err}");
        assert!(err.contains(var), "{err}");
        assert!(!err.contains("hunter2"), "value echoed: {err}");
    }
}

#[test]
fn missing_certificate_file_is_refused() {
    refused(
        &format!(
            "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n{ROUTE}"
        ),
        &[],
        &["tls.cert"],
    );
}

#[test]
fn no_routes_is_refused() {
    refused(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &[],
        &["routes", "at least one"],
    );
}

#[test]
fn good_config_prints_a_summary_without_secrets() {
    let hash = format!("sha256:{}", "cd".repeat(32));
    let cfg = format!(
        "{ROUTE}[routes.upstream_headers]\nauthorization = \"Bearer ${{UP}}\"\n[[keys]]\nid = \"phone\"\nhash = \"{hash}\"\n"
    );
    let (code, out, err) = check(&cfg, &[("UP", "sk-very-secret-value")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("api") && out.contains("phone") && out.contains("http://127.0.0.1:8000"),
        "{out}"
    );
    assert!(!out.contains("sk-very-secret-value") && !err.contains("sk-very-secret-value"));
    assert!(!out.contains(&hash));
}

#[test]
fn secrets_resolve_from_a_file_and_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("UP"), "from-credentials\n").unwrap();
    let file = dir.path().join("up.txt");
    std::fs::write(&file, "from-file\n").unwrap();
    let cfg = format!("{ROUTE}[routes.upstream_headers]\nauthorization = \"Bearer ${{UP}}\"\n");
    let (code, _, err) = check(
        &cfg,
        &[("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap())],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check(&cfg, &[("UP_FILE", file.to_str().unwrap())]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn admin_token_resolving_to_empty_is_refused() {
    refused(
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"${{ADMIN_T}}\"\n{ROUTE}"),
        &[("ADMIN_T", "")],
        &["admin.token", "empty"],
    );
}

#[test]
fn secret_references_resolve_in_value_strings() {
    let hash = format!("sha256:{}", "ef".repeat(32));
    let cfg = "[server]\nlisten = \"${LISTEN}\"\ntrusted_proxies = [\"${PROXY}\"]\n\
         [[keys]]\nid = \"phone\"\nhash = \"${PHONE_HASH}\"\nexpires = \"${PHONE_EXPIRES}\"\n\
         [[routes]]\nname = \"api\"\npath = \"/v1/\"\nhost = \"${API_HOST}\"\nupstream = \"http://${UP_ADDR}\"\n";
    let env = [
        ("LISTEN", "127.0.0.1:9555"),
        ("PROXY", "10.0.0.0/8"),
        ("PHONE_HASH", hash.as_str()),
        ("PHONE_EXPIRES", "2030-01-01T00:00:00Z"),
        ("API_HOST", "api.example"),
        ("UP_ADDR", "127.0.0.1:8000"),
    ];
    let (code, out, err) = check(cfg, &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("127.0.0.1:9555") && out.contains("host=api.example") && out.contains("phone"),
        "{out}"
    );
    // A reference that resolves to nothing valid names the field, not the value.
    let (code, _, err) = check(
        cfg,
        &[
            ("PROXY", "not-a-cidr"),
            ("LISTEN", "127.0.0.1:0"),
            ("PHONE_HASH", "x"),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("server.trusted_proxies[0]"), "{err}");
}

#[test]
fn budgets_need_a_ledger_and_sane_caps() {
    // A budget without a ledger would be reset by every restart: refused, naming where it is.
    refused(
        &format!("[budgets]\ncost_per_day = 5.0\n{ROUTE}"),
        &[],
        &["budgets", "need [usage] with a database"],
    );
    refused(
        &format!("[usage]\ninject_stream_usage = true\n[budgets]\ntokens_per_week = 5\n{ROUTE}"),
        &[],
        &["budgets", "need [usage] with a database"],
    );
    refused(
        &format!("[usage]\ndatabase = \"/tmp/x.db\"\n[budgets]\ncost_per_day = -1.0\n{ROUTE}"),
        &[],
        &["budgets.cost_per_day", "non-negative"],
    );
    refused(
        &format!("[usage]\ndatabase = \"/tmp/x.db\"\n[budgets]\ncost_per_hour = 1.0\n{ROUTE}"),
        &[],
        &["cost_per_hour"],
    );
    refused(
        &format!("[usage]\ndefault_completion_reservation = -5\n{ROUTE}"),
        &[],
        &["default_completion_reservation"],
    );
    refused(
        &format!("[usage.prices.\"m\"]\ninput = -1.0\noutput = 0.5\n{ROUTE}"),
        &[],
        &["usage.prices.m", "non-negative"],
    );
}
