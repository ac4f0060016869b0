//! `GET /api/v1/openapi.json`: the OpenAPI 3 document of the REST API, kept
//! next to the handlers it describes (tests run schemathesis against it).

use axum::Json;
use serde_json::{Value, json};

pub async fn document() -> Json<Value> {
    Json(spec())
}

fn error() -> Value {
    json!({ "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(schema: Value) -> Value {
    json!({ "description": "OK", "content": { "application/json": { "schema": schema } } })
}

fn errors(mut responses: Value, codes: &[&str]) -> Value {
    for c in codes {
        responses[*c] = error();
    }
    responses
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
    let mut cases_params = paging();
    cases_params.push(param(
        "state",
        "query",
        json!({ "type": "string", "enum": case_states }),
        false,
    ));
    let mut outbox_params = paging();
    outbox_params.push(param(
        "state",
        "query",
        json!({ "type": "string", "enum": ["pending", "sent", "dead"] }),
        false,
    ));
    outbox_params.push(param(
        "destination",
        "query",
        json!({ "type": "string" }),
        false,
    ));
    let time = json!({ "type": "string", "format": "date-time" });
    let audit_params = vec![
        param("event", "query", json!({ "type": "string" }), false),
        param("since", "query", time.clone(), false),
        param("until", "query", time, false),
        param("case_id", "query", json!({ "type": "string" }), false),
        param(
            "association_id",
            "query",
            json!({ "type": "string" }),
            false,
        ),
        param(
            "after_seq",
            "query",
            json!({ "type": "integer", "minimum": 0 }),
            false,
        ),
        param(
            "limit",
            "query",
            json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
            false,
        ),
    ];
    let case_id = param("id", "path", json!({ "type": "string" }), true);
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
        "/api/v1/cases": { "get": { "summary": "Cases, newest first", "parameters": cases_params,
            "responses": errors(json!({ "200": ok(page("Case")) }), READ) } },
        "/api/v1/cases/{id}": { "get": { "summary": "One case: members by modality, timeline, result, outputs and their delivery",
            "parameters": [case_id.clone()],
            "responses": errors(json!({ "200": ok(json!({ "$ref": "#/components/schemas/CaseDetail" })) }), &["400", "401", "404", "503"]) } },
        "/api/v1/cases/{id}/actions": { "post": { "summary": "Run, hold or release a case (operator)",
            "parameters": [case_id.clone()],
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object", "additionalProperties": false, "required": ["action"],
                "properties": { "action": { "type": "string", "enum": ["run", "hold", "release"] } } } } } },
            "responses": errors(json!({ "200": ok(json!({ "type": "object", "required": ["id", "from", "to"],
                "properties": { "id": { "type": "string" }, "from": { "type": "string" }, "to": { "type": "string" } } })) }),
                &["400", "401", "403", "404", "409", "413", "415", "503"]) } },
        "/api/v1/cases/{id}/outputs/{sop}/png": { "get": { "summary": "A heatmap secondary capture as PNG",
            "parameters": [case_id, param("sop", "path", json!({ "type": "string" }), true)],
            "responses": errors(json!({ "200": { "description": "PNG", "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } } }),
                &["400", "401", "404", "503"]) } },
        "/api/v1/outbox": { "get": { "summary": "Result deliveries", "parameters": outbox_params,
            "responses": errors(json!({ "200": ok(page("Delivery")) }), READ) } },
        "/api/v1/outbox/{id}/retry": { "post": { "summary": "Make a dead or waiting delivery due now (operator)",
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
              "required": ["members", "timeline", "outputs"], "properties": {
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
