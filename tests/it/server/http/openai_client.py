"""Runs calls through the official `openai` Python package for tests/http.

Reads a plan from stdin:
    {"base_url": URL, "ca": PEM path or null,
     "calls": [{"endpoint": "chat" | "completions" | "models" | "model",
                "key": API key, "params": {...}, "extra_body": {...}}]}
and prints one JSON result per call, in order, as a list:
    {"status": 200 | HTTP status, "error": the error object, "retry_after",
     "text", "finish", "usage", "logprobs", "chunks", "ids", "tool_calls"}.
A streamed answer's tool calls are reassembled from their deltas, as the
SDK's users do: by index, the id and name from the first, the arguments
concatenated.
Assertions live in the Rust test; this only speaks the client library.
"""

import json
import ssl
import sys

import openai


def client(plan, key):
    http_client = None
    if plan.get("ca"):
        http_client = openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=plan["ca"])
        )
    return openai.OpenAI(
        base_url=plan["base_url"],
        api_key=key,
        max_retries=0,
        timeout=120,
        http_client=http_client,
    )


def dump(value):
    return None if value is None else value.model_dump()


def run(plan, call):
    c = client(plan, call.get("key") or "none")
    endpoint = call["endpoint"]
    params = call.get("params", {})
    extra = {"extra_body": call["extra_body"]} if call.get("extra_body") else {}
    if endpoint.startswith("file"):
        return file_call(c, endpoint, params)
    if endpoint == "models":
        return {"status": 200, "ids": [m.id for m in c.models.list()]}
    if endpoint == "model":
        m = c.models.retrieve(params["id"])
        return {"status": 200, "ids": [m.id], "version": getattr(m, "version", None)}
    create = c.chat.completions.create if endpoint == "chat" else c.completions.create
    if not params.get("stream"):
        r = create(**params, **extra)
        choice = r.choices[0]
        text = choice.message.content if endpoint == "chat" else choice.text
        calls = getattr(choice.message, "tool_calls", None) if endpoint == "chat" else None
        return {
            "tool_calls": [dump(c) for c in calls] if calls else None,
            "status": 200,
            "text": text,
            "finish": choice.finish_reason,
            "usage": dump(r.usage),
            "logprobs": dump(choice.logprobs),
            "object": r.object,
        }
    text, finish, usage, chunks, logprobs, calls = "", None, None, 0, [], {}
    for chunk in create(**params, **extra):
        chunks += 1
        if chunk.usage is not None:
            usage = dump(chunk.usage)
        for choice in chunk.choices:
            piece = choice.delta.content if endpoint == "chat" else choice.text
            text += piece or ""
            for delta in (choice.delta.tool_calls or []) if endpoint == "chat" else []:
                call = calls.setdefault(
                    delta.index,
                    {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
                )
                if delta.id:
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["function"]["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["function"]["arguments"] += delta.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
            if choice.logprobs is not None:
                logprobs.append(dump(choice.logprobs))
    return {
        "status": 200,
        "text": text,
        "finish": finish,
        "usage": usage,
        "chunks": chunks,
        "logprobs": logprobs,
        "tool_calls": [calls[i] for i in sorted(calls)] if calls else None,
    }


def file_call(c, endpoint, params):
    """The files API: file_create (path, purpose), file_list (purpose,
    limit, order),
    file_get, file_content, file_delete (id)."""
    if endpoint == "file_create":
        with open(params["path"], "rb") as f:
            return {"status": 200, "file": dump(c.files.create(file=f, purpose=params["purpose"]))}
    if endpoint == "file_list":
        # Iterating the page follows `has_more` and `after`, as the SDK does.
        extra = {k: params[k] for k in ("purpose", "limit", "order") if k in params}
        return {"status": 200, "files": [dump(f) for f in c.files.list(**extra)]}
    if endpoint == "file_get":
        return {"status": 200, "file": dump(c.files.retrieve(params["id"]))}
    if endpoint == "file_content":
        return {"status": 200, "content": c.files.content(params["id"]).read().decode()}
    if endpoint == "file_delete":
        return {"status": 200, "deleted": dump(c.files.delete(params["id"]))}
    raise ValueError(endpoint)


def resolve(params, results):
    """`{"id_of": N}` in params: the id of the file result N made."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "id_of" in v:
            v = results[v["id_of"]]["file"]["id"]
        out[k] = v
    return out


def main():
    plan = json.load(sys.stdin)
    results = []
    for call in plan["calls"]:
        try:
            call = dict(call, params=resolve(call.get("params", {}), results))
            results.append(run(plan, call))
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {"raw": str(e.body)}
            results.append(
                {
                    "status": e.status_code,
                    "error": body.get("error", body),
                    "retry_after": e.response.headers.get("retry-after"),
                    "exception": type(e).__name__,
                }
            )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
