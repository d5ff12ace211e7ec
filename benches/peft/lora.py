#!/usr/bin/env python3
"""The competitor in `cargo bench --bench train -- --peft DIR`: a PyTorch +
PEFT LoRA fine-tune on the same GGUF (loaded and dequantized to fp32 by
transformers), the same prompt/completion JSONL, batch and schedule as
`svfit train`, on the CPU. Prints one JSON object: seconds per step (the
first step, a warm-up, left out), trained tokens per second, the trainable
values, and the held-out accuracy (greedy answers, scored as `svfit eval`
scores them: the first label named for class labels, else the exact
answer).

Each example is the prompt as a user turn of the model's chat template and
the completion as the assistant's answer, loss on the answer and its end of
turn, the prompt cut at the front to fit --ctx: as svfit's trainer does.
The rows of a step are padded to the longest (svfit packs them).

Needs torch, transformers, peft and gguf (scripts/peft-env installs them).
"""

import argparse
import json
import math
import os
import time


def normalize(s):
    """An answer or completion as compared: `svfit eval`'s normalize."""
    return s.strip().rstrip(".!").strip().lower()


def first_word(text, word):
    """Offset of the first whole-word occurrence of `word` in `text`."""
    at = text.find(word)
    while at >= 0:
        before = text[at - 1] if at else ""
        after = text[at + len(word)] if at + len(word) < len(text) else ""
        if not before.isalnum() and not after.isalnum():
            return at
        at = text.find(word, at + 1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(a.model))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                   target_modules=a.targets.split(","), task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # svfit renders chats with llama.cpp's template code, which writes
    # ChatML without the default system turn SmolLM2's Jinja template adds:
    # the same here, so both sides train on the same tokens.
    template = tok.chat_template
    if "<|im_start|>" in (template or ""):
        template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def render(prompt, completion=None):
        messages = [{"role": "user", "content": prompt}]
        if completion is None:
            return tok.apply_chat_template(messages, chat_template=template,
                                           add_generation_prompt=True, tokenize=True)
        messages.append({"role": "assistant", "content": completion})
        return tok.apply_chat_template(messages, chat_template=template, tokenize=True)

    def ids(x):
        return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x

    records = [json.loads(line) for line in open(a.data) if line.strip()]
    examples = []
    for r in records:
        head = list(ids(render(r["prompt"])))
        full = list(ids(render(r["prompt"], r["completion"])))
        labels = [-100] * len(head) + full[len(head):]
        cut = max(0, len(full) - a.ctx)
        examples.append((full[cut:], labels[cut:]))

    steps = min(a.steps, math.ceil(len(examples) / a.batch))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.train()
    times, tokens = [], []
    for step in range(steps):
        batch = examples[step * a.batch:(step + 1) * a.batch]
        width = max(len(t) for t, _ in batch)
        x = torch.tensor([t + [pad] * (width - len(t)) for t, _ in batch])
        y = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in batch])
        start = time.perf_counter()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(t) for t, _ in batch))

    held = [json.loads(line) for line in open(a.eval) if line.strip()]
    if a.eval_limit:
        held = held[:a.eval_limit]
    # As `svfit eval` scores (src/train/eval.rs): answers normalised; the
    # first label named when the held-out completions are a few class
    # labels, else the exact answer.
    labels = sorted({normalize(r["completion"]) for r in held})
    classes = len(labels) <= 32 and 2 * len(labels) <= len(held)
    model.eval()
    hits = 0
    with torch.no_grad():
        for r in held:
            x = torch.tensor([list(ids(render(r["prompt"])))[-a.ctx:]])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=a.max_tokens, do_sample=False,
                                 pad_token_id=pad)
            answer = normalize(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True))
            want = normalize(r["completion"])
            if classes:
                named = sorted((at, l) for l in labels
                               if (at := first_word(answer, l)) is not None)
                hits += bool(named) and named[0][1] == want
            else:
                hits += answer == want
    timed = times[1:] or times
    print(json.dumps({
        "engine": "peft-lora",
        "rank": a.rank,
        "targets": a.targets,
        "trainable": trainable,
        "steps": steps,
        "s_per_step": sum(timed) / len(timed),
        "tokens_per_s": sum(tokens[1:] or tokens) / sum(timed),
        "tokens_per_step": sum(tokens) / len(tokens),
        "final_loss": float(loss.detach()),
        "eval_examples": len(held),
        "accuracy": hits / max(1, len(held)),
        "scored": "label" if classes else "exact",
        "torch": torch.__version__,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
