//! `GET /openapi.json` and the docs page at `/docs`: the API described by the router itself.
//! Every handler carries its `#[utoipa::path]` (statuses, request and reply types), and
//! [`crate::api`] registers them with utoipa-axum, which both routes them and collects the
//! document: nothing here can drift from what is served. `ingest/openapi.json` is the document
//! committed (a test keeps it current); a schemathesis run against the live stack
//! (deploy/local/api-check, run by .ci/run) checks that the server does what it says.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_scalar::{Scalar, Servable};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        for name in ["api_key", "operator"] {
            c.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// What the document says besides its paths (those come from the router).
#[derive(OpenApi)]
#[openapi(
    info(title = "Credits pipeline API", version = "1", description = "Usage events, prepaid credit pools, ledger."),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The document, as the router collects it.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::api().split_for_parts().1
}

/// The document as served, built once.
pub fn json() -> &'static str {
    static DOC: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| document().to_pretty_json().unwrap_or_else(|_| "{}".to_owned()));
    &DOC
}

pub async fn serve() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json())
}

/// `GET /docs`: the document rendered by Scalar.
pub fn docs<S: Clone + Send + Sync + 'static>(doc: utoipa::openapi::OpenApi) -> axum::Router<S> {
    Scalar::with_url("/docs", doc).into()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

    /// `ingest/openapi.json` is the document the router builds. To update it:
    /// `UPDATE_OPENAPI=1 cargo nextest run --release -p ingest --lib openapi` (then commit it).
    #[test]
    fn the_committed_document_is_current() {
        let now = format!("{}\n", json());
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &now).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == now,
            "ingest/openapi.json is not the document the router builds (the API changed). Update it with \
             `UPDATE_OPENAPI=1 cargo nextest run --release -p ingest --lib openapi` and commit it."
        );
    }

    /// The schema `s` names (following `$ref`s).
    fn resolve<'a>(doc: &'a Value, s: &'a Value) -> &'a Value {
        match s["$ref"].as_str() {
            Some(r) => resolve(
                doc,
                &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")],
            ),
            None => s,
        }
    }

    /// Every object schema reachable from `s` that says nothing of its fields: no
    /// properties, additionalProperties, $ref or composition.
    fn untyped(doc: &Value, s: &Value, at: String, seen: &mut Vec<String>, out: &mut Vec<String>) {
        if let Some(r) = s["$ref"].as_str() {
            if seen.iter().any(|x| x == r) {
                return;
            }
            seen.push(r.to_owned());
            return untyped(doc, resolve(doc, s), format!("{at} -> {r}"), seen, out);
        }
        let Some(o) = s.as_object() else { return };
        let composed = ["allOf", "oneOf", "anyOf"];
        let is_object = match &s["type"] {
            Value::String(t) => t == "object",
            Value::Array(ts) => ts.iter().any(|t| t == "object"),
            _ => false,
        };
        let typed = ["properties", "additionalProperties", "$ref"]
            .iter()
            .chain(composed.iter())
            .any(|k| o.contains_key(*k));
        let says_no_type = !["type", "enum", "const"].iter().any(|k| o.contains_key(*k));
        if (is_object || says_no_type) && !typed {
            out.push(at.clone());
        }
        for (k, v) in o {
            match k.as_str() {
                "properties" => {
                    for (name, p) in v.as_object().into_iter().flatten() {
                        untyped(doc, p, format!("{at}.{name}"), seen, out);
                    }
                }
                "items" => untyped(doc, v, format!("{at}[]"), seen, out),
                // `{}` is any value under any key (a free-form map): typed as such.
                "additionalProperties" if v.as_object().is_some_and(|m| !m.is_empty()) => {
                    untyped(doc, v, format!("{at}{{}}"), seen, out);
                }
                k if composed.contains(&k) => {
                    for (i, p) in v.as_array().into_iter().flatten().enumerate() {
                        untyped(doc, p, format!("{at}<{k}{i}>"), seen, out);
                    }
                }
                _ => {}
            }
        }
    }

    /// Every request body and every success (2xx) reply body has a typed schema, down to the
    /// fields: no bare `{"type": "object"}` (or `{}`) anywhere in them.
    #[test]
    fn every_request_and_success_body_is_typed() {
        let doc: Value = serde_json::from_str(json()).unwrap();
        let mut out = Vec::new();
        let mut operations = 0;
        let mut with_body = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let here = format!("{} {path}", method.to_uppercase());
                if let Some(c) = op["requestBody"]["content"].as_object() {
                    for (ct, m) in c {
                        untyped(
                            &doc,
                            &m["schema"],
                            format!("{here} request {ct}"),
                            &mut Vec::new(),
                            &mut out,
                        );
                    }
                }
                for (status, r) in op["responses"].as_object().unwrap() {
                    if !status.starts_with('2') {
                        continue;
                    }
                    match r["content"].as_object() {
                        Some(c) => {
                            with_body += 1;
                            for (ct, m) in c {
                                let at = format!("{here} {status} {ct}");
                                if m["schema"].is_null() {
                                    out.push(at.clone());
                                }
                                untyped(&doc, &m["schema"], at, &mut Vec::new(), &mut out);
                            }
                        }
                        None => assert_eq!(status, "204", "{here}: a {status} reply without a body"),
                    }
                }
            }
        }
        assert!(operations >= 43, "{operations} operations");
        assert!(with_body >= 40, "{with_body} success replies with a body");
        assert!(
            out.is_empty(),
            "untyped object schemas in request or success bodies: {out:#?}"
        );
    }

    #[test]
    fn the_document_names_its_schemas_and_security() {
        let doc: Value = serde_json::from_str(json()).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        assert!(doc["components"]["schemas"]["Error"].is_object());
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
        let post = &doc["paths"]["/v1/events"]["post"];
        assert!(post["responses"]["429"].is_object() && post["responses"]["202"].is_object());
        // Every operation says who may call it.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["security"].is_array(), "{method} {path} has no security");
            }
        }
    }

    /// `/docs` is an HTML page that carries the document.
    #[tokio::test]
    async fn the_docs_page_serves_the_document() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
            listener,
            docs::<()>(document()),
        )));
        let r = reqwest::get(format!("http://{addr}/docs")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        let html = r.text().await.unwrap();
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(html.contains("Credits pipeline API") && html.contains("/v1/credits/grants"));
    }

    /// The checker finds what it is for.
    #[test]
    fn a_bare_object_is_caught() {
        let doc = serde_json::json!({"components": {"schemas": {"A": {"type": "object", "properties": {
            "x": {"type": ["object", "null"]}, "y": {"type": "object", "additionalProperties": {}}}}}}});
        let mut out = Vec::new();
        untyped(
            &doc,
            &serde_json::json!({"$ref": "#/components/schemas/A"}),
            "t".into(),
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(out, vec!["t -> #/components/schemas/A.x".to_owned()]);
    }
}
