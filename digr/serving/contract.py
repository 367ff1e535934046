"""The HTTP contract in OpenAPI terms: request bodies as JSON Schema and every status code each
route can answer, built from the endpoint's own limits (`ServeConfig`).

The handlers read raw bodies and check them with `digr.serving.core` / `digr.serving.events`
(one-line errors that name the field, with the request id); these schemas say the same rules
for clients and for schemathesis, which the test suite runs against /openapi.json: a body
valid here is accepted, one invalid here gets a 4xx. Keep the two in step.
"""

from __future__ import annotations

from typing import Any

from digr.serving.core import INT64, ITEM_FIELDS, MAX_USER_ID, ServeConfig
from digr.serving.events import FEEDBACK_EVENTS

_ERROR = {"type": "object", "properties": {"request_id": {"type": "string"}, "error": {"type": "string"}},
          "required": ["request_id", "error"]}


def _responses(codes: dict[int, str]) -> dict[str, Any]:
    out = {}
    for code, text in codes.items():
        body = {"type": "object"} if code < 400 else _ERROR
        out[str(code)] = {"description": text, "content": {"application/json": {"schema": body}}}
    return out


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def operations(cfg: ServeConfig) -> dict[tuple[str, str], dict[str, Any]]:
    """{(path, method): {"requestBody"?, "responses"}} for every route of the gateway."""
    auth = {401: "missing or wrong bearer token (when the endpoint has one)"}
    item_id = {"type": "string", "maxLength": cfg.max_id_length}
    recommend = {
        "type": "object", "additionalProperties": False, "required": ["history"],
        "properties": {
            "history": {"type": "array", "maxItems": cfg.max_request_items,
                        "items": {"anyOf": [item_id, {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]}]},
                        "description": "item ids, oldest first; may be empty (cold start)"},
            "k": {"type": "integer", "minimum": 1, "maximum": cfg.max_k},
            "user_id": {"type": ["string", "null"], "maxLength": MAX_USER_ID},
            "exclude_seen": {"type": "boolean"},
        },
    }
    item = {"type": "object", "additionalProperties": False, "required": ["item_id", "title"],
            "properties": {f: {"type": ["string", "null"], "maxLength": n} for f, n in ITEM_FIELDS.items()}}
    item["properties"]["item_id"] = {"type": "string", "minLength": 1, "maxLength": ITEM_FIELDS["item_id"]}
    item["properties"]["title"] = {"type": "string", "pattern": r"\S", "maxLength": ITEM_FIELDS["title"]}
    items = {"type": "object", "additionalProperties": False, "required": ["items"],
             "properties": {"items": {"type": "array", "minItems": 1, "maxItems": cfg.max_add_items, "items": item}}}
    feedback = {"type": "object", "additionalProperties": False, "required": ["request_id", "item", "event"],
                "properties": {"request_id": {"type": "string", "minLength": 1}, "item": {"type": "string", "minLength": 1},
                               "event": {"type": "string", "enum": list(FEEDBACK_EVENTS)},
                               "time": {"type": ["number", "null"], "description": "seconds since the epoch; default now"}}}
    bad = {400: "a field is wrong (the message names it)", 413: "body over max_body_bytes",
           422: "a field has the wrong type (the message names it)"}
    return {
        ("/healthz", "get"): {"responses": _responses({200: "the gateway process answers"})},
        ("/readyz", "get"): {"responses": _responses({200: "every variant's model answers",
                                                      503: "a model is not loaded or does not answer"})},
        ("/recommend", "post"): {"requestBody": _json_body(recommend), "responses": _responses(
            {200: "the top-k items of the user's variant", **bad, **auth,
             503: "the model is not ready, or overloaded (shed at once, with Retry-After): retry later",
             500: "internal error"})},
        ("/items", "post"): {"requestBody": _json_body(items), "responses": _responses(
            {200: "the items were added, with their SIDs", **bad, **auth,
             409: "an item_id exists already, or no SID suffix is left for a collision",
             503: "the catalogue kept changing or the model is not ready: retry later", 500: "internal error"})},
        ("/feedback", "post"): {"requestBody": _json_body(feedback), "responses": _responses(
            {200: "the event was logged", **bad, **auth, 404: "this endpoint collects no feedback (no events_dir)"})},
    }


def apply(openapi: dict[str, Any], cfg: ServeConfig) -> dict[str, Any]:
    """Fill FastAPI's generated schema (routes that read raw bodies) with the contract above."""
    for (path, method), spec in operations(cfg).items():
        op = openapi.get("paths", {}).get(path, {}).get(method)
        if op is not None:
            op.update(spec)
    return openapi
