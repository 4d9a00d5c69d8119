//! The OpenAPI document served at `/openapi.json`: poem-openapi's, completed with what its
//! derives cannot say.
//!
//! - **Unknown fields.** Every JSON request body refuses fields it does not know
//!   (`deny_unknown_fields`, against mass assignment), but the derive does not declare it: each
//!   request body schema gets `additionalProperties: false`, so clients and fuzzers know.
//! - **Links.** The operations that create something (a track, an upload, an account) link to
//!   the operations that take its id, with the id read from the answer
//!   (`$response.body#/id`), so client generators and stateful testers can follow them.
//!
//! - **What the middleware answers.** Every operation documents the errors that the layers
//!   around the handlers can give it, whether or not its handler can: 429 from the rate
//!   limiter (all but the operational routes), 401 where it takes credentials, and 413 and
//!   408 where it takes a body (see [`crate::body`]).
//!
//! The same document gives the middleware its route templates and their methods (metrics
//! labels, and the `Allow` header of a 405).

use serde_json::{Map, Value, json};

/// Which creator's answer feeds which routes: (method, path of the creator, prefix of the
/// paths whose `{id}` is the created id).
const CREATORS: [(&str, &str, &str); 4] = [
    ("post", "/v1/tracks", "/v1/tracks/{id}"),
    ("post", "/v1/uploads", "/v1/uploads/{id}"),
    ("post", "/v1/uploads/{id}/complete", "/v1/tracks/{id}"),
    ("post", "/v1/auth/register", "/v1/admin/users/{id}"),
];

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The completed document.
pub fn complete(spec: &str) -> Value {
    let mut document: Value = serde_json::from_str(spec).unwrap_or_else(|_| json!({}));
    close_request_bodies(&mut document);
    add_links(&mut document);
    add_middleware_errors(&mut document);
    document
}

/// The routes the rate limiter leaves alone (see `throttle`).
const UNTHROTTLED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

fn add_middleware_errors(document: &mut Value) {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json; charset=utf-8": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        })
    };
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            let Some(operation) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            let credentials = operation.get("security").and_then(Value::as_array).is_some_and(|s| !s.is_empty());
            let body = operation.contains_key("requestBody");
            let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut add = |status: &str, description: &str| {
                responses.entry(status.to_owned()).or_insert_with(|| error(description));
            };
            if !UNTHROTTLED.contains(&path.as_str()) {
                add("429", "Too many requests from this address (`Retry-After` says when to try again).");
            }
            if credentials {
                add("401", "Authentication is required, or the token is invalid or expired.");
            }
            if body {
                add("413", "The body is larger than the configured maximum.");
                add("408", "The body did not arrive in time.");
            }
        }
    }
}

/// The schemas named by request bodies: `additionalProperties: false`, and their optional
/// fields nullable (`null` is taken as left out).
fn close_request_bodies(document: &mut Value) {
    let mut names = Vec::new();
    for item in document.get("paths").and_then(Value::as_object).into_iter().flat_map(Map::values) {
        for method in METHODS {
            let schema =
                item.pointer(&format!("/{method}/requestBody/content/application~1json; charset=utf-8/schema"));
            let reference = schema.and_then(|schema| schema.get("$ref")).and_then(Value::as_str);
            if let Some(name) = reference.and_then(|reference| reference.strip_prefix("#/components/schemas/")) {
                names.push(name.to_owned());
            }
        }
    }
    for name in names {
        if let Some(schema) =
            document.pointer_mut(&format!("/components/schemas/{name}")).and_then(Value::as_object_mut)
        {
            schema.insert("additionalProperties".into(), Value::Bool(false));
            let required: Vec<String> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|names| names.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default();
            // An optional field sent as `null` is taken as left out (the edit routes' "absent
            // fields stay as they are"): the document says so.
            let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
                continue;
            };
            for (field, property) in properties.iter_mut() {
                let Some(property) = property.as_object_mut().filter(|_| !required.contains(field)) else {
                    continue;
                };
                if let Some(reference) = property.remove("$ref") {
                    property.insert("allOf".into(), json!([{"$ref": reference}]));
                }
                property.insert("nullable".into(), Value::Bool(true));
            }
        }
    }
}

/// A JSON pointer to `/paths/{path}/{method}`, as a URI fragment.
fn operation_ref(path: &str, method: &str) -> String {
    let escaped = path.replace('~', "~0").replace('/', "~1").replace('{', "%7B").replace('}', "%7D");
    format!("#/paths/{escaped}/{method}")
}

/// A link name (`^[a-zA-Z0-9.\-_]+$`) for `method path`.
fn link_name(path: &str, method: &str) -> String {
    let words: Vec<&str> =
        path.split(|c: char| !c.is_ascii_alphanumeric()).filter(|word| !word.is_empty() && *word != "v1").collect();
    format!("{method}_{}", words.join("_"))
}

fn add_links(document: &mut Value) {
    let paths: Vec<(String, Vec<&'static str>)> = document
        .get("paths")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|paths| paths.iter())
        .map(|(path, item)| (path.clone(), METHODS.into_iter().filter(|method| item.get(*method).is_some()).collect()))
        .collect();
    for (creator_method, creator_path, prefix) in CREATORS {
        let mut links = Map::new();
        for (path, methods) in &paths {
            if path == prefix || path.starts_with(&format!("{prefix}/")) {
                for method in methods {
                    links.insert(
                        link_name(path, method),
                        json!({
                            "operationRef": operation_ref(path, method),
                            "parameters": {"id": "$response.body#/id"},
                        }),
                    );
                }
            }
        }
        let Some(responses) = document
            .pointer_mut(&format!("/paths/{}/{creator_method}/responses", creator_path.replace('/', "~1")))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for (status, response) in responses.iter_mut() {
            if status.starts_with('2') && response.get("content").is_some() {
                response["links"] = Value::Object(links.clone());
            }
        }
    }
}

/// Each path template of the document with its methods (upper case).
pub fn routes(document: &Value) -> Vec<(String, Vec<String>)> {
    document
        .get("paths")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|paths| paths.iter())
        .map(|(path, item)| {
            let methods =
                METHODS.into_iter().filter(|method| item.get(*method).is_some()).map(str::to_ascii_uppercase).collect();
            (path.clone(), methods)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        complete(
            &json!({
                "paths": {
                    "/v1/tracks": {
                        "post": {"responses": {"202": {"description": "queued", "content": {}}, "400": {"description": "bad"}}},
                        "get": {"responses": {"200": {"description": "page"}}},
                    },
                    "/v1/tracks/{id}": {
                        "get": {"responses": {}, "security": [{"BearerToken": []}]},
                        "patch": {
                            "requestBody": {"content": {"application/json; charset=utf-8": {"schema": {"$ref": "#/components/schemas/TrackEdit"}}}},
                            "responses": {},
                        },
                    },
                    "/v1/tracks/{id}/status": {"get": {"responses": {}}},
                    "/v1/tracksx/{id}": {"get": {"responses": {}}},
                },
                "components": {"schemas": {"TrackEdit": {"type": "object"}, "TrackView": {"type": "object"}}},
            })
            .to_string(),
        )
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_in_the_document_too() {
        let document = sample();
        assert_eq!(document.pointer("/components/schemas/TrackEdit/additionalProperties"), Some(&Value::Bool(false)));
        assert_eq!(document.pointer("/components/schemas/TrackView/additionalProperties"), None);
    }

    #[test]
    fn creators_link_to_the_routes_of_what_they_created() {
        let document = sample();
        let links = document.pointer("/paths/~1v1~1tracks/post/responses/202/links").expect("links");
        let names: Vec<&String> = links.as_object().expect("object").keys().collect();
        assert_eq!(names, ["get_tracks_id", "get_tracks_id_status", "patch_tracks_id"]);
        assert_eq!(links["get_tracks_id_status"]["operationRef"], "#/paths/~1v1~1tracks~1%7Bid%7D~1status/get");
        assert_eq!(links["get_tracks_id_status"]["parameters"]["id"], "$response.body#/id");
        // Errors and bodiless answers get none.
        assert!(document.pointer("/paths/~1v1~1tracks/post/responses/400/links").is_none());
    }

    #[test]
    fn what_the_middleware_answers_is_documented() {
        let document = sample();
        let statuses = |pointer: &str| -> Vec<String> {
            document.pointer(pointer).and_then(Value::as_object).expect(pointer).keys().cloned().collect()
        };
        assert_eq!(statuses("/paths/~1v1~1tracks~1{id}/get/responses"), ["401", "429"]);
        assert_eq!(statuses("/paths/~1v1~1tracks~1{id}/patch/responses"), ["408", "413", "429"]);
        assert_eq!(statuses("/paths/~1v1~1tracks/post/responses"), ["202", "400", "429"]);
    }

    #[test]
    fn routes_list_their_methods() {
        let routes = routes(&sample());
        let tracks = routes.iter().find(|(path, _)| path == "/v1/tracks").expect("route");
        assert_eq!(tracks.1, ["GET", "POST"]);
    }
}
