"""The OpenAPI 3.1 document of `vitnp serve` (GET /openapi.json): every route, body, parameter, header and
error shape of vitnp.server, written out here once."""

from __future__ import annotations

OPENAPI_VERSION = "3.1.0"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, retry_after: bool = False) -> dict:
    headers = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
    if retry_after:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    return _json(_ref("Error"), description, headers)


def _ok(schema: dict, description: str) -> dict:
    return _json(schema, description, {"x-request-id": {"$ref": "#/components/headers/RequestId"}})


SCHEMAS = {
    "Prediction": {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
    },
    "Predictions": {
        "type": "array", "items": _ref("Prediction"),
        "description": "The top_k labels of one image, best first.",
    },
    "ClassifyRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {
                "description": "A base64-encoded image (a data: URL prefix is allowed), or a list of them "
                               "(answered with a list of lists).  `image` is accepted in its place.",
                "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
            },
            "parameters": {
                "type": "object",
                "properties": {
                    "top_k": {"type": "integer", "minimum": 1, "default": 5,
                              "description": "labels per image (more than the model has: all of them)"},
                    "function_to_apply": {"type": "string", "enum": ["softmax", "sigmoid", "none", "default"],
                                          "description": "score function (default: the model's)"},
                },
                "description": "Wins over the same parameters in the query string; others are ignored.",
            },
            "options": {
                "type": "object",
                "properties": {
                    "wait_for_model": {"type": "boolean", "description": "as the x-wait-for-model header "
                                                                           "(the header wins)"},
                    "use_cache": {"type": "boolean", "description": "as the x-use-cache header (the header wins)"},
                },
            },
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong, for people"},
            "estimated_time": {"type": "number",
                               "description": "503 for a model still loading: seconds until it should be ready"},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Readiness": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ready", "unavailable"]},
                       "reason": {"type": "string", "description": "what is not ready (loading, draining, ...)"}},
    },
    "Model": {
        "type": "object",
        "required": ["model_id", "status"],
        "properties": {"model_id": {"type": "string"}, "status": {"type": "string", "enum": ["loaded", "loading"]},
                       "aliases": {"type": "array", "items": {"type": "string"}},
                       "default": {"type": "boolean"}},
        "additionalProperties": True,
    },
    "Info": {
        "type": "object",
        "description": "Models (ids, revision, precision, backend, ISA), batching and limit settings and the "
                       "vitnp version; what huggingface_hub's InferenceClient.get_endpoint_info returns.",
        "additionalProperties": True,
    },
    "Root": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                              "docs": {"type": "string"}},
             "additionalProperties": True},
}

CLASSIFY_PARAMETERS = [
    {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
     "description": "labels per image (a JSON body's parameters.top_k wins)"},
    {"name": "function_to_apply", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["softmax", "sigmoid", "none", "default"]},
     "description": "score function (a JSON body's parameters.function_to_apply wins)"},
    {"name": "x-wait-for-model", "in": "header", "required": False, "schema": {"type": "string",
                                                                             "enum": ["true", "false"]},
     "description": "absent or true: a request for a model that is loading waits for it (up to the server's "
                    "load timeout); false: it gets 503 with estimated_time at once"},
    {"name": "x-use-cache", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["true", "false"]},
     "description": "false: compute even when the result is cached (default true)"},
    {"$ref": "#/components/parameters/RequestId"},
]

CLASSIFY_BODY = {
    "required": True,
    "description": "The raw image bytes (any Content-Type: a body that is not valid JSON is the image), or JSON.",
    "content": {
        "application/json": {"schema": _ref("ClassifyRequest")},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

CLASSIFY_RESPONSES = {
    "200": _json(
        {"oneOf": [_ref("Predictions"), {"type": "array", "items": _ref("Predictions")}]},
        "The labels of the image, or a list of them for a list of inputs",
        {"x-request-id": {"$ref": "#/components/headers/RequestId"},
         "x-compute-time": {"description": "seconds spent on the request in the service",
                            "schema": {"type": "string"}},
         "x-compute-type": {"description": "always cpu", "schema": {"type": "string"}},
         "x-cache": {"description": "hit, miss, or partial (a list of inputs, some cached)",
                     "schema": {"type": "string", "enum": ["hit", "miss", "partial"]}}}),
    "400": _error("Not an image, bad base64, bad parameter, JSON nested too deep or a number too long, or a "
                  "model that exists but cannot be served"),
    "401": _error("Missing or wrong token (when the server requires one)"),
    "404": _error("No such model"),
    "408": _error("The body was not received within the server's body timeout"),
    "413": _error("The body is larger than the server's limit"),
    "429": _error("The model's queue is full", retry_after=True),
    "500": _error("A bug: details are in the server log"),
    "503": _error("The model is loading (estimated_time), the request's deadline passed while it was queued, "
                  "or the server is at its connection limit", retry_after=True),
}


def _classify(summary: str, operation_id: str, with_model: bool) -> dict:
    parameters = list(CLASSIFY_PARAMETERS)
    if with_model:
        parameters.insert(0, {"$ref": "#/components/parameters/ModelId"})
    return {"post": {"summary": summary, "operationId": operation_id, "tags": ["classification"],
                     "parameters": parameters, "requestBody": CLASSIFY_BODY, "responses": CLASSIFY_RESPONSES}}


def _get(summary: str, responses: dict, operation_id: str, tag: str, secured: bool = False) -> dict:
    operation = {"summary": summary, "operationId": operation_id, "tags": [tag],
                 "parameters": [{"$ref": "#/components/parameters/RequestId"}], "responses": responses}
    if not secured:
        operation["security"] = []
    else:
        operation["responses"] = {**responses, "401": _error("Missing or wrong token (when the server requires one)")}
    return {"get": operation}


def document(version: str) -> dict:
    """The OpenAPI document of a vitnp server of this version."""
    paths = {
        "/": {**_classify("Classify with the default model (the first --model)", "classify_default",
                        with_model=False),
              **_get("What this server is, and where its documentation is",
                     {"200": _ok(_ref("Root"), "Name, version and the server's routes")}, "root", "operations")},
        "/models/{model_id}": _classify("Classify with a model by id or alias (Hub ids contain a slash)",
                                        "classify", with_model=True),
        "/hf-inference/models/{model_id}": _classify("The same, under the Hugging Face router's path",
                                                     "classify_router_path", with_model=True),
        "/health": _get("Liveness (the same as /health/live)", {"200": _ok(_ref("Health"), "The process serves")},
                        "health", "operations"),
        "/health/live": _get("Liveness: the process serves HTTP", {"200": _ok(_ref("Health"), "Alive")},
                             "live", "operations"),
        "/health/ready": _get(
            "Readiness: every --model loaded and the engine answering; 503 while loading or draining",
            {"200": _ok(_ref("Readiness"), "Ready for traffic"),
             "503": _json(_ref("Readiness"), "Not ready: loading, or draining after SIGTERM")},
            "ready", "operations"),
        "/models": _get("The models served and loading",
                        {"200": _ok({"type": "array", "items": _ref("Model")}, "One entry per model")},
                        "models", "operations", secured=True),
        "/info": _get("Models, settings and version (huggingface_hub's get_endpoint_info)",
                      {"200": _ok(_ref("Info"), "Server information")}, "info", "operations", secured=True),
        "/metrics": _get("Prometheus metrics (text exposition format)",
                         {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}},
                                  "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}}}},
                         "metrics", "operations", secured=True),
        "/openapi.json": _get("This document", {"200": _ok({"type": "object"}, "The OpenAPI document")},
                              "openapi", "operations"),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "vitnp",
            "version": version,
            "description": "ViT / DeiT image classification over HTTP, speaking the Hugging Face Inference API "
                           "image-classification protocol.  Every response carries x-request-id (the client's, "
                           "or a new one).  When the server has a token, classification, /models, /info and "
                           "/metrics need 'Authorization: Bearer <token>'.",
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server was started with a token"}},
            "parameters": {
                "ModelId": {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "a served model's id or alias, e.g. google/vit-base-patch16-224 "
                                           "(its slash is part of the path), or with --load-on-demand a Hub id "
                                           "or bundled:<name> to load"},
                "RequestId": {"name": "x-request-id", "in": "header", "required": False,
                              "schema": {"type": "string", "maxLength": 128},
                              "description": "echoed on the response and in the server's log lines for this "
                                             "request (1-128 printable ASCII characters; else a new id is made)"},
            },
            "headers": {
                "RequestId": {"description": "the request's id", "schema": {"type": "string"}},
                "RetryAfter": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}},
            },
        },
    }
