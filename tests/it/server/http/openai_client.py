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
import time

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
    if endpoint.startswith("job"):
        return job_call(c, endpoint, params, extra)
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


TERMINAL = ("succeeded", "failed", "cancelled")


def job_call(c, endpoint, params, extra):
    """The fine-tuning API: job_create (the SDK's arguments), job_get,
    job_cancel, job_events (every event, newest first, through the SDK's
    pages of `limit`), job_checkpoints (id), job_list (limit: the first
    page), and job_wait: polls job `id` until its status is one of `until`
    (default: a final one) or, with `steps`, until it has run that many
    steps; within `timeout` seconds."""
    jobs = c.fine_tuning.jobs
    if endpoint == "job_create":
        return {"status": 200, "job": dump(jobs.create(**params, **extra))}
    if endpoint == "job_get":
        return {"status": 200, "job": dump(jobs.retrieve(params["id"]))}
    if endpoint == "job_cancel":
        return {"status": 200, "job": dump(jobs.cancel(params["id"]))}
    if endpoint == "job_events":
        pages = jobs.list_events(params["id"], limit=params.get("limit", 20))
        return {"status": 200, "events": [dump(e) for e in pages]}
    if endpoint == "job_checkpoints":
        pages = jobs.checkpoints.list(params["id"])
        return {"status": 200, "checkpoints": [dump(p) for p in pages]}
    if endpoint == "job_list":
        page = jobs.list(limit=params.get("limit", 20))
        return {"status": 200, "jobs": [dump(j) for j in page.data], "has_more": page.has_more}
    if endpoint == "job_wait":
        until = params.get("until", TERMINAL)
        deadline = time.time() + params.get("timeout", 300)
        while True:
            job = jobs.retrieve(params["id"])
            if job.status in until or ("steps" in params and steps_run(jobs, job.id) >= params["steps"]):
                return {"status": 200, "job": dump(job)}
            if job.status in TERMINAL or time.time() > deadline:
                return {"status": 200, "job": dump(job), "timed_out": True}
            time.sleep(0.2)
    raise ValueError(endpoint)


def steps_run(jobs, job_id):
    """The last step a job's events report."""
    for e in jobs.list_events(job_id, limit=10).data:
        if e.data and "train_loss" in e.data:
            return e.data["step"]
    return 0


def resolve(params, results):
    """`{"id_of": N}` in params: the id of the file or job result N made;
    `{"model_of": N}`: the fine-tuned model of job result N."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "id_of" in v:
            made = results[v["id_of"]]
            v = (made.get("file") or made["job"])["id"]
        elif isinstance(v, dict) and "model_of" in v:
            v = results[v["model_of"]]["job"]["fine_tuned_model"]
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
