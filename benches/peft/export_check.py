#!/usr/bin/env python3
"""Checks `svfit adapter export --format peft` against PEFT itself: loads
the base GGUF with transformers (dequantized to fp32, q and k rows put back
in Hugging Face's order as transformers does), attaches the exported
adapter with `PeftModel.from_pretrained`, merges it, and compares every
adapted weight with transformers' reading of `svfit merge --type f32` of
the same adapter (W + U diag(delta) Vt, computed by svfit). Prints one JSON
object: the matrices compared, the largest |difference| relative to the
largest |delta W| of its matrix, and the logits' largest |difference| on a
prompt. Exits 1 when a matrix differs by more than f32 rounding.

Needs torch, transformers, peft and gguf (scripts/peft-env installs them):
    $SVFIT_HOME/peft-venv/bin/python benches/peft/export_check.py \\
        --model BASE.gguf --merged MERGED.gguf --peft EXPORT_DIR
"""

import argparse
import json
import os
import sys


def load(path, torch):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(path))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--merged", required=True)
    ap.add_argument("--peft", required=True)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()

    import torch
    from peft import PeftModel

    base = load(a.model, torch)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, a.peft)
    tokens = torch.tensor([[1, 504, 3458, 8347, 1691, 30, 2]])
    with torch.no_grad():
        adapted_logits = peft(tokens).logits
    merged_by_peft = peft.merge_and_unload().state_dict()
    merged_by_svfit = load(a.merged, torch)
    with torch.no_grad():
        svfit_logits = merged_by_svfit(tokens).logits
    theirs = merged_by_svfit.state_dict()
    worst, compared = 0.0, 0
    for name, w in merged_by_peft.items():
        delta = theirs[name] - original[name]
        if delta.abs().max() == 0:
            assert (w == original[name]).all(), f"{name}: PEFT changed a matrix svfit did not"
            continue
        compared += 1
        error = ((w - theirs[name]).abs().max() / delta.abs().max()).item()
        worst = max(worst, error)
    logits = (adapted_logits - svfit_logits).abs().max().item()
    scale = svfit_logits.std().item()
    print(json.dumps({"matrices": compared, "max_rel_error": worst,
                      "logits_max_abs_diff": logits, "logits_std": scale}))
    sys.exit(0 if compared > 0 and worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()
