# Sourced by the scripts: what they know about svfit's files, in one place
# for shell as src/home.rs is for Rust.

SVFIT_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# svfit's home as src/home.rs resolves it: SVFIT_HOME, else
# $XDG_CACHE_HOME/svfit, else ~/.cache/svfit.
svfit_home() {
    if [ -n "${SVFIT_HOME:-}" ]; then
        printf '%s\n' "$SVFIT_HOME"
    elif [ -n "${XDG_CACHE_HOME:-}" ]; then
        printf '%s\n' "$XDG_CACHE_HOME/svfit"
    else
        printf '%s\n' "$HOME/.cache/svfit"
    fi
}

# The default model (SmolLM2-135M-Instruct, Q4_1); its sha256 lives in
# default-model.sha256, which src/home.rs reads too.
SVFIT_DEFAULT_MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SVFIT_DEFAULT_MODEL_SHA256="$(tr -d '[:space:]' < "$SVFIT_SCRIPTS/default-model.sha256")"

svfit_default_model() {
    printf '%s\n' "$(svfit_home)/models/$SVFIT_DEFAULT_MODEL_FILE"
}

# Gemma 3 270M (base model, Q4_K_M), fetched on request
# (`scripts/bootstrap --model gemma3-270m`); its sha256 lives in
# gemma3-270m.sha256, which src/home.rs reads too.
SVFIT_GEMMA3_MODEL_FILE=gemma-3-270m-q4_k_m.gguf
SVFIT_GEMMA3_MODEL_SHA256="$(tr -d '[:space:]' < "$SVFIT_SCRIPTS/gemma3-270m.sha256")"
