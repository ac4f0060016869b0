//! `GET /api/v1/openapi.json`: the OpenAPI 3 document of the REST API, kept
//! next to the handlers it describes (tests run schemathesis against it).

use axum::Json;
use serde_json::{Value, json};

use super::auth::Viewer;

/// The document, to signed-in users only, as every endpoint but health:
/// it names the node's operations and, through the outputs' routes, what
/// it holds.
pub async fn document(_: Viewer) -> Json<Value> {
    Json(spec())
}

fn error() -> Value {
    json!({ "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(schema: Value) -> Value {
    json!({ "description": "OK", "content": { "application/json": { "schema": schema } } })
}

/// OpenAPI links from a list to the operations on its first item: what
/// lets a stateful client (schemathesis) reach the per-item endpoints.
fn links(mut response: Value, links: Value) -> Value {
    response["links"] = links;
    response
}

fn errors(mut responses: Value, codes: &[&str]) -> Value {
    for c in codes {
        responses[*c] = error();
    }
    responses
}

/// A free-text parameter: any string without NUL, which the node refuses in
/// URLs (see `count_and_harden`).
fn text() -> Value {
    json!({ "type": "string", "pattern": "^[^\\u0000]*$" })
}

fn param(name: &str, location: &str, schema: Value, required: bool) -> Value {
    json!({ "name": name, "in": location, "required": required, "schema": schema })
}

fn paging() -> Vec<Value> {
    vec![
        param(
            "limit",
            "query",
            json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
            false,
        ),
        param(
            "offset",
            "query",
            json!({ "type": "integer", "minimum": 0, "maximum": 2147483647 }),
            false,
        ),
    ]
}

fn page(item: &str) -> Value {
    json!({ "type": "object", "required": ["items", "limit", "offset"], "properties": {
        "items": { "type": "array", "items": { "$ref": format!("#/components/schemas/{item}") } },
        "limit": { "type": "integer" }, "offset": { "type": "integer" } } })
}

const READ: &[&str] = &["400", "401", "503"];

/// STOW-RS (PS3.18 10.5): the request and the DICOM JSON response.
fn stow(with_study: bool) -> Value {
    let response = |d: &str| {
        json!({ "description": d, "content": { "application/dicom+json": { "schema": {
            "$ref": "#/components/schemas/StowResponse" } } } })
    };
    let mut op = json!({
        "summary": if with_study {
            "Store instances of one study by STOW-RS (stow or operator role); an instance of another study fails (0xA900)"
        } else {
            "Store instances by STOW-RS (stow or operator role): each through ingest, durable and indexed before the answer"
        },
        "requestBody": { "required": true, "content": {
            "multipart/related; type=\"application/dicom\"": { "schema": { "type": "string", "format": "binary" } } } },
        "responses": errors(json!({
            "200": response("Every instance stored (duplicates included: the first copy is kept)"),
            "202": response("Some instances stored, the others in FailedSOPSequence"),
            "409": response("No instance stored: FailedSOPSequence gives each FailureReason")
        }), &["400", "401", "403", "408", "413", "415", "503"])
    });
    if with_study {
        op["parameters"] = json!([param("study", "path", json!({ "type": "string" }), true)]);
    }
    op
}

/// The document.
pub fn spec() -> Value {
    let case_states: Vec<&str> = crate::db::CaseState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    // An empty value means "no filter" (the pages' forms send their empty
    // fields), so the schema admits it beside RFC 3339 times.
    let time = json!({ "anyOf": [
        { "type": "string", "format": "date-time" },
        { "type": "string", "maxLength": 0 }
    ] });
    let mut cases_params = paging();
    cases_params.push(param(
        "state",
        "query",
        json!({ "type": "string", "enum": case_states }),
        false,
    ));
    cases_params.push(param("since", "query", time.clone(), false));
    cases_params.push(param("until", "query", time.clone(), false));
    let mut outbox_params = paging();
    outbox_params.push(param(
        "state",
        "query",
        json!({ "type": "string", "enum": ["pending", "sent", "dead"] }),
        false,
    ));
    outbox_params.push(param("destination", "query", text(), false));
    let audit_params = vec![
        param("event", "query", text(), false),
        param("since", "query", time.clone(), false),
        param("until", "query", time, false),
        param("case_id", "query", text(), false),
        param("association_id", "query", text(), false),
        param("node", "query", text(), false),
        param(
            "after_seq",
            "query",
            json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": i64::MAX }),
            false,
        ),
        param(
            "limit",
            "query",
            json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
            false,
        ),
    ];
    let case_id = param("id", "path", text(), true);
    json!({
      "openapi": "3.0.3",
      "info": { "title": "her2map node API", "version": env!("CARGO_PKG_VERSION"),
                "description": "The administrator's API of a her2map DICOM node. Every call needs Authorization: Bearer TOKEN; viewers read, operators also act." },
      "security": [{ "bearer": [] }],
      "paths": {
        "/api/v1/status": { "get": { "summary": "Node status, readiness and counts",
            "responses": errors(json!({ "200": ok(json!({ "type": "object", "required": ["version", "ready", "checks", "counts"] })) }), READ) } },
        "/api/v1/associations": { "get": { "summary": "Recent associations, newest first", "parameters": paging(),
            "responses": errors(json!({ "200": ok(page("Association")) }), READ) } },
        "/api/v1/cases": { "get": { "summary": "Cases, newest first (filters: state, opened since / until)", "parameters": cases_params,
            "responses": errors(json!({ "200": links(ok(page("Case")), json!({
                "GetCase": { "operationId": "getCase", "parameters": { "id": "$response.body#/items/0/id" } },
                "ActOnCase": { "operationId": "caseAction", "parameters": { "id": "$response.body#/items/0/id" } } })) }), READ) } },
        "/api/v1/cases/{id}": { "get": { "operationId": "getCase", "summary": "One case: members by modality, timeline, result, outputs and their delivery",
            "parameters": [case_id.clone()],
            "responses": errors(json!({ "200": links(ok(json!({ "$ref": "#/components/schemas/CaseDetail" })), json!({
                "OutputPng": { "operationId": "outputPng", "parameters": {
                    "id": "$response.body#/id", "sop": "$response.body#/heatmaps/0" } } })) }),
                &["400", "401", "404", "503"]) } },
        "/api/v1/cases/{id}/actions": { "post": { "operationId": "caseAction", "summary": "Run, hold or release a case (operator)",
            "parameters": [case_id.clone()],
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object", "additionalProperties": false, "required": ["action"],
                "properties": { "action": { "type": "string", "enum": ["run", "hold", "release"] } } } } } },
            "responses": errors(json!({ "200": ok(json!({ "type": "object", "required": ["id", "from", "to"],
                "properties": { "id": { "type": "string" }, "from": { "type": "string" }, "to": { "type": "string" } } })) }),
                &["400", "401", "403", "404", "409", "413", "415", "422", "503"]) } },
        "/api/v1/cases/{id}/outputs/{sop}/png": { "get": { "operationId": "outputPng", "summary": "A heatmap secondary capture as PNG",
            "parameters": [case_id, param("sop", "path", text(), true)],
            "responses": errors(json!({ "200": { "description": "PNG", "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } } }),
                &["400", "401", "404", "503"]) } },
        "/api/v1/outbox": { "get": { "summary": "Result deliveries", "parameters": outbox_params,
            "responses": errors(json!({ "200": links(ok(page("Delivery")), json!({
                "RetryDelivery": { "operationId": "retryDelivery", "parameters": { "id": "$response.body#/items/0/id" } } })) }), READ) } },
        "/api/v1/outbox/{id}/retry": { "post": { "operationId": "retryDelivery", "summary": "Make a dead or waiting delivery due now (operator)",
            "parameters": [param("id", "path", json!({ "type": "integer", "format": "int64" }), true)],
            "responses": errors(json!({ "200": ok(json!({ "type": "object", "required": ["id", "state"] })) }),
                &["400", "401", "403", "404", "503"]) } },
        "/api/v1/audit": { "get": { "summary": "Audit events, oldest first, with keyset paging (after_seq)", "parameters": audit_params,
            "responses": errors(json!({ "200": ok(json!({ "type": "object", "required": ["items", "limit"], "properties": {
                "items": { "type": "array", "items": { "$ref": "#/components/schemas/AuditEvent" } },
                "limit": { "type": "integer" }, "next_after_seq": { "type": "integer", "nullable": true } } })) }), READ) } },
        "/dicom-web/studies": { "post": stow(false) },
        "/dicom-web/studies/{study}": { "post": stow(true) },
        "/api/v1/openapi.json": { "get": { "summary": "This document",
            "responses": errors(json!({ "200": ok(json!({ "type": "object" })) }), &["401"]) } }
      },
      "components": {
        "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        "schemas": {
          "Error": { "type": "object", "required": ["error", "message"],
                     "properties": { "error": { "type": "string" }, "message": { "type": "string" } } },
          "Association": { "type": "object", "required": ["id", "calling_ae", "called_ae", "peer", "opened_at"], "properties": {
              "id": { "type": "string" }, "calling_ae": { "type": "string" }, "called_ae": { "type": "string" },
              "peer": { "type": "string" }, "opened_at": { "type": "string" },
              "closed_at": { "type": "string", "nullable": true }, "outcome": { "type": "string", "nullable": true },
              "stored": { "type": "integer" }, "failed": { "type": "integer" }, "bytes": { "type": "integer" } } },
          "Case": { "type": "object", "required": ["id", "state", "revision", "present", "missing", "instances"], "properties": {
              "id": { "type": "string" }, "patient_key": { "type": "string" }, "state": { "type": "string", "enum": case_states },
              "revision": { "type": "integer" }, "reason": { "type": "string" },
              "present": { "type": "array", "items": { "type": "string" } },
              "missing": { "type": "array", "items": { "type": "string" } },
              "lesion_side": { "type": "string", "nullable": true }, "instances": { "type": "integer" },
              "ready_at": { "type": "string", "nullable": true }, "max_wait_at": { "type": "string", "nullable": true } } },
          "CaseDetail": { "allOf": [ { "$ref": "#/components/schemas/Case" }, { "type": "object",
              "required": ["members", "timeline", "outputs", "heatmaps"], "properties": {
              "heatmaps": { "type": "array", "items": { "type": "string" } },
              "members": { "type": "object", "additionalProperties": { "type": "array", "items": { "type": "object" } } },
              "timeline": { "type": "array", "items": { "type": "object", "required": ["time", "kind", "what"] } },
              "result": { "type": "object", "nullable": true },
              "outputs": { "type": "array", "items": { "type": "object", "required": ["sop_instance_uid", "kind", "deliveries"] } },
              "patient": { "type": "object" } } } ] },
          "Delivery": { "type": "object", "required": ["id", "sop_instance_uid", "destination", "state", "attempts"], "properties": {
              "id": { "type": "integer" }, "sop_instance_uid": { "type": "string" }, "destination": { "type": "string" },
              "state": { "type": "string", "enum": ["pending", "sent", "dead"] }, "attempts": { "type": "integer" },
              "last_status": { "type": "string" }, "next_attempt_at": { "type": "string" }, "case_id": { "type": "string" },
              "kind": { "type": "string" } } },
          "StowResponse": { "type": "object", "description": "PS3.18 10.5.3, DICOM JSON: 00081190 Retrieve URL, 00081199 Referenced SOP Sequence, 00081198 Failed SOP Sequence (00081150, 00081155, 00081197 Failure Reason)",
              "properties": { "00081190": { "type": "object" }, "00081199": { "type": "object" }, "00081198": { "type": "object" } } },
          "AuditEvent": { "type": "object", "required": ["seq", "time", "event"], "properties": {
              "seq": { "type": "integer" }, "time": { "type": "string" }, "event": { "type": "string" } } }
        }
      }
    })
}
