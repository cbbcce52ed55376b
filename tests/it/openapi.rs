//! The OpenAPI document: the committed copy matches the code, it is served without credentials
//! and printed by `edgegate openapi`, and it covers every route of the contract that the router
//! serves, with the contract's credentials as security requirements.

use std::path::Path;

use edgegate::routes::openapi::document_json;
use serde_json::Value;

use crate::process::{edgegate, output};
use crate::support::{in_ci, spawn_app};
use crate::test_db;

const REGENERATE: &str = "regenerate it with `cargo run -- openapi > docs/openapi.json`";
const SECRET_KEY: &str = "sb_secret_openapi_test_key_0123456789";

fn generated() -> Value {
    serde_json::from_str(&document_json()).expect("the document is JSON")
}

/// One row of the contract's route table: methods, path and the credentials column.
struct ContractRoute {
    methods: Vec<String>,
    path: String,
    credentials: String,
}

/// The route table of `../shared/CONTRACT.md`, or `None` (after a notice) when it is absent;
/// under `CI=true` a missing file fails the test.
fn contract_routes() -> Option<Vec<ContractRoute>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/CONTRACT.md");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if !in_ci() => {
            crate::support::skipped(&format!("{} is not readable ({err})", path.display()));
            return None;
        }
        Err(err) => panic!("CI=true and {} is not readable: {err}", path.display()),
    };
    let routes: Vec<ContractRoute> = text
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let route = cells.next()?.replace('`', "");
            let credentials = cells.next()?.replace('`', "");
            let (methods, path) = route.split_once(' ')?;
            let methods: Vec<String> = methods.split('/').map(str::to_owned).collect();
            let is_method =
                |m: &String| ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str());
            (path.starts_with('/') && methods.iter().all(is_method)).then(|| ContractRoute {
                methods,
                path: path.to_owned(),
                credentials,
            })
        })
        .collect();
    assert!(
        routes.len() >= 10,
        "the contract's route table was not found"
    );
    Some(routes)
}

#[tokio::test]
async fn the_committed_document_is_what_the_code_generates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{} is not readable ({err}); {REGENERATE}", path.display()));
    assert!(
        committed == document_json(),
        "docs/openapi.json differs from the document the code generates; {REGENERATE}"
    );
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_contract_security_schemes() {
    let document = generated();
    assert_eq!(document["openapi"], "3.1.0");
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["bearer"]["bearerFormat"], "JWT");
    for (name, header) in [
        ("apikey", "apikey"),
        ("stripe_signature", "Stripe-Signature"),
        ("twilio_signature", "X-Twilio-Signature"),
    ] {
        assert_eq!(schemes[name]["type"], "apiKey", "{name}");
        assert_eq!(schemes[name]["in"], "header", "{name}");
        assert_eq!(schemes[name]["name"], header, "{name}");
    }
    let error = &document["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["code", "message"]));
}

/// Every route of the contract that the router serves is documented with the contract's
/// credentials, a success body and its error codes; every documented operation is served.
#[tokio::test]
async fn every_served_route_of_the_contract_is_documented() {
    let Some(routes) = contract_routes() else {
        return;
    };
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    let document = generated();
    let paths = document["paths"].as_object().expect("paths");
    let mut documented = 0;
    for route in &routes {
        for method in &route.methods {
            let answer = server
                .client
                .request(method.parse().unwrap(), server.url(&route.path))
                .send()
                .await
                .expect("request");
            let served = !matches!(answer.status().as_u16(), 404 | 405);
            let operation = &document["paths"][&route.path][method.to_lowercase()];
            if !served {
                assert!(
                    operation.is_null(),
                    "{method} {} is documented but not served",
                    route.path
                );
                eprintln!("not served on this branch yet: {method} {}", route.path);
                continue;
            }
            documented += 1;
            let label = format!("{method} {}", route.path);
            assert!(
                operation.is_object(),
                "{label} is served but not in the document; add it to ApiDoc's paths"
            );
            let security: Vec<String> = operation["security"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .flat_map(|requirement| requirement.as_object().unwrap().keys().cloned())
                        .collect()
                })
                .unwrap_or_default();
            let expected: &[&str] = match route.credentials.as_str() {
                "user" | "secret" => &["bearer", "apikey"],
                "signature Stripe-Signature" => &["stripe_signature"],
                "signature X-Twilio-Signature" => &["twilio_signature"],
                "none" => &[],
                other => panic!("{label}: unknown credentials {other:?} in the contract"),
            };
            assert_eq!(security, expected, "{label}: security requirements");
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{label}: no success response"
            );
            for (status, response) in responses {
                let schema = &response["content"]["application/json"]["schema"];
                // readyz's 503 is the error body plus the checks, a schema of its own.
                if !status.starts_with(['4', '5'])
                    || schema["$ref"] == "#/components/schemas/NotReady"
                {
                    continue;
                }
                assert_eq!(
                    schema["allOf"][0]["$ref"], "#/components/schemas/ErrorBody",
                    "{label} {status}: the error body"
                );
                let codes = schema["allOf"][1]["properties"]["code"]["enum"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{label} {status}: no codes listed"));
                assert!(!codes.is_empty(), "{label} {status}: no codes listed");
            }
            if route.credentials == "user" || route.credentials == "secret" {
                assert!(responses.contains_key("401"), "{label}: 401 not documented");
            }
            if route.credentials == "secret" {
                assert!(responses.contains_key("403"), "{label}: 403 not documented");
            }
        }
    }
    let operations: usize = paths
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        operations, documented,
        "the document has operations that are not in the contract's route table"
    );
}

#[tokio::test]
async fn get_openapi_json_needs_no_credentials_and_matches_the_command() {
    let db = test_db!();
    let (server, _) = spawn_app(
        &db,
        &[(
            "SUPABASE_SECRET_KEYS",
            &format!("{{\"default\":\"{SECRET_KEY}\"}}"),
        )],
    )
    .await;
    let answer = server.get("/openapi.json").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served: Value = answer.json().await.expect("JSON");
    assert_eq!(served, generated());

    let dir = tempfile::tempdir().unwrap();
    let printed = output(edgegate(dir.path(), &[]).arg("openapi"));
    assert!(printed.status.success(), "{printed:?}");
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), document_json());
}

/// What a generated client or a request validator reads off the document: send-sms's optional
/// `idempotency_key` is optional there too, and every error a route can answer is listed (a
/// database outage while reserving an SMS is 503 `NOT_READY`; a same-second webhook event whose
/// object Stripe does not give back is 502; send-sms's 502 may carry `Retry-After`).
#[test]
fn the_document_lists_what_send_sms_and_the_webhook_take_and_answer() {
    let document = generated();
    let request = &document["components"]["schemas"]["SendSmsRequest"];
    assert_eq!(
        request["required"],
        serde_json::json!(["to", "body"]),
        "{request}"
    );
    let codes = |path: &str, status: &str| -> Vec<String> {
        error_codes(&document["paths"][path]["post"]["responses"][status])
    };
    assert!(codes("/functions/v1/send-sms", "503").contains(&"NOT_READY".to_owned()));
    assert_eq!(
        codes("/functions/v1/stripe-webhook", "502"),
        ["UPSTREAM_UNAVAILABLE"]
    );
    // Twilio's wait, when it throttles for longer than a send takes.
    let retry_after = |path: &str| {
        document["paths"][path]["post"]["responses"]["502"]["headers"]["Retry-After"].is_object()
    };
    assert!(retry_after("/functions/v1/send-sms"));
    assert!(!retry_after("/functions/v1/stripe-webhook"));
}

/// What every path answers whatever its own route does is declared on each operation: 405
/// `METHOD_NOT_ALLOWED` with `Allow` (a method it does not take), 413 `PAYLOAD_TOO_LARGE` (a
/// declared `Content-Length` over the service-wide limit, even on a `GET`); and a 503 that can be
/// `NOT_READY` because the bodies in flight are at their budget declares its `Retry-After`.
#[test]
fn every_operation_declares_the_answers_every_path_can_give() {
    let document = generated();
    let codes = error_codes;
    let mut busy = 0;
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let label = format!("{method} {path}");
            let responses = &operation["responses"];
            assert_eq!(
                codes(&responses["405"]),
                ["METHOD_NOT_ALLOWED"],
                "{label}: 405"
            );
            assert!(
                responses["405"]["headers"]["Allow"].is_object(),
                "{label}: 405 without Allow"
            );
            assert!(
                codes(&responses["413"]).contains(&"PAYLOAD_TOO_LARGE".to_owned()),
                "{label}: 413"
            );
            if codes(&responses["503"]).contains(&"NOT_READY".to_owned()) {
                busy += 1;
                assert!(
                    responses["503"]["headers"]["Retry-After"].is_object(),
                    "{label}: 503 NOT_READY without Retry-After"
                );
            }
        }
    }
    assert!(busy >= 4, "the routes that read a body list 503 NOT_READY");
}

/// Every operation has an operationId of its own, as OpenAPI requires (generators name client
/// methods after it): `jwt-test`'s GET and POST, one handler, shared `jwt_test`, and validators
/// refused the document.
#[test]
fn every_operation_id_is_unique() {
    let document = generated();
    let mut seen = std::collections::BTreeMap::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let label = format!("{method} {path}");
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{label} has no operationId"));
            if let Some(first) = seen.insert(id.to_owned(), label.clone()) {
                panic!("operationId {id:?} of {label} is also that of {first}");
            }
        }
    }
    assert!(seen.len() >= 13, "{seen:?}");
}

/// The error codes a declared answer lists (none when it lists no `code` enum).
fn error_codes(response: &Value) -> Vec<String> {
    response["content"]["application/json"]["schema"]["allOf"][1]["properties"]["code"]["enum"]
        .as_array()
        .map(|codes| {
            codes
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}
