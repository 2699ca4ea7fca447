#!/usr/bin/env bash
# Fetch what api.py needs to serve OpenELM-3B-Instruct, using the ModelScope CLI:
#
#   LLM-Research/OpenELM-3B-Instruct -> $MODEL_ROOT/OpenELM-3B-Instruct
#       config.json, generation_config.json, model.safetensors.index.json and
#       the safetensors shards that index names. The repo also carries the same
#       weights again as pytorch_model*.bin (~13.5 GB); those are never fetched.
#   shakechen/Llama-2-7b-hf          -> $MODEL_ROOT/Llama-2-7b-hf
#       only the tokenizer files (OpenELM is used with the Llama-2 tokenizer),
#       never the Llama weights.
#
#   with DRAFT=1, also LLM-Research/OpenELM-270M-Instruct -> $MODEL_ROOT/OpenELM-270M-Instruct
#       config.json, generation_config.json, model.safetensors: the draft
#       model for speculative decoding (--draft-model-path), same tokenizer.
#
# Usage:  ./download.sh                     # into /root/autodl-tmp
#         MODEL_ROOT=/data ./download.sh    # somewhere else
#         DRAFT=1 ./download.sh             # and the 270M draft model
#
# Files are selected by naming them exactly (positional `files` of
# `modelscope download`), not with --include/--exclude patterns, whose
# meaning changed: up to 1.37 an --exclude value was also tried as a regular
# expression (so the old tutorial's `--exclude ".bin"` worked); from 1.38 the
# CLI comes from modelscope_hub and patterns are fnmatch globs (only ".*" is
# still rewritten to "*"), so ".bin" excludes nothing and all ~13.5 GB of .bin
# weights come down. A plain file name means the same to every version.
#
# Safe to re-run: files already present (and non-empty) are not fetched
# again, and modelscope is not called at all when nothing is missing.
#
# Before modelscope runs, the hub is probed once (10 s at most): without a
# network, one clear message comes at once instead of modelscope's banner and
# half a minute of retries. A failed run removes the folders it created that
# are still empty.

set -euo pipefail

MODEL_ROOT="${MODEL_ROOT:-/root/autodl-tmp}"

OPENELM_REPO="LLM-Research/OpenELM-3B-Instruct"
OPENELM_INDEX="model.safetensors.index.json"
# The weight shards are not listed here: they are whatever the index names.
OPENELM_FILES=(config.json generation_config.json "$OPENELM_INDEX")

TOKENIZER_REPO="shakechen/Llama-2-7b-hf"
# tokenizer.json is not strictly needed (transformers can build it from
# tokenizer.model), but with it the fast tokenizer loads without a conversion.
TOKENIZER_FILES=(tokenizer.model tokenizer_config.json special_tokens_map.json tokenizer.json)

DRAFT_REPO="LLM-Research/OpenELM-270M-Instruct"
DRAFT_FILES=(config.json generation_config.json model.safetensors)

# What api.py uses when --model-path / --tokenizer-path are not given.
API_DEFAULT_MODEL_PATH=/root/autodl-tmp/OpenELM-3B-Instruct
API_DEFAULT_TOKENIZER_PATH=/root/autodl-tmp/Llama-2-7b-hf

# die LINE...: print the lines as one error message and stop.
die() {
    printf 'ERROR: %s\n' "$1" >&2
    shift
    if (($# > 0)); then printf '       %s\n' "$@" >&2; fi
    exit 1
}

info() {
    printf '%s\n' "$@"
}

# Folders this run created, so that a failed run can remove those left empty.
CREATED_DIRS=()

# make_dir DIR: mkdir -p DIR, remembering each folder it creates.
make_dir() {
    local dir=$1
    local -a new=()
    while [[ -n $dir && ! -d $dir ]]; do
        new=("$dir" "${new[@]}")
        dir=${dir%/*}
    done
    mkdir -p "$1"
    CREATED_DIRS+=("${new[@]}")
}

# On failure, remove the created folders that are still empty, deepest first
# (rm -d removes only empty ones): no empty model folder is left behind.
remove_empty_created_dirs() {
    local status=$? i
    if ((status != 0)); then
        for ((i = ${#CREATED_DIRS[@]} - 1; i >= 0; i--)); do
            rm -d -- "${CREATED_DIRS[i]}" 2>/dev/null || true
        done
    fi
    return "$status"
}
trap remove_empty_created_dirs EXIT

# The hub modelscope talks to (MODELSCOPE_ENDPOINT is modelscope's own setting).
ENDPOINT="${MODELSCOPE_ENDPOINT:-https://modelscope.cn}"

# require_hub: stop with one message when the hub cannot be reached, before
# modelscope prints its banner and retries for half a minute.
HUB_CHECKED=""
require_hub() {
    [[ -n $HUB_CHECKED ]] && return 0
    local address=${ENDPOINT#*://} port=443
    address=${address%%/*}
    [[ $ENDPOINT == http://* ]] && port=80
    if [[ $address == *:* ]]; then
        port=${address##*:}
        address=${address%:*}
    fi
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
    if ! timeout 10 "$BASH" -c 'exec 3<>"/dev/tcp/$1/$2"' probe "$address" "$port" 2>/dev/null; then
        die "cannot reach the ModelScope hub at $address:$port ($ENDPOINT), so nothing can be downloaded." \
            "Check this machine's network (or MODELSCOPE_ENDPOINT, if you set it), then run this script again."
    fi
    HUB_CHECKED=1
}

# Called only when something is missing: re-checking a complete download
# works without modelscope installed.
require_modelscope() {
    command -v modelscope >/dev/null 2>&1 && return 0
    die "the 'modelscope' command was not found on PATH, so nothing can be downloaded." \
        "Install it and run this script again:" \
        "    pip install modelscope        (or: pip install -r requirements.txt)"
}

# Which spelling of the CLI to use, decided once, on first need:
#   current: modelscope >= 1.38   modelscope download REPO FILE... --local-dir DIR
#   legacy:  modelscope <= 1.37   modelscope download --model REPO FILE... --local_dir DIR
# The legacy form only has --local_dir; the current one still accepts it but
# as a deprecated alias, so ask the installed CLI which one it documents.
MS_STYLE=""
detect_cli_style() {
    [[ -n $MS_STYLE ]] && return 0
    local help
    help=$(modelscope download --help 2>&1) || true
    if [[ $help == *--local-dir* ]]; then
        MS_STYLE=current
    else
        MS_STYLE=legacy
    fi
}

# fetch REPO DIR FILE...: download exactly these files of REPO into DIR.
fetch() {
    local repo=$1 dir=$2
    shift 2
    detect_cli_style
    local -a cmd
    if [[ $MS_STYLE == current ]]; then
        cmd=(modelscope download "$repo" "$@" --local-dir "$dir")
    else
        cmd=(modelscope download --model "$repo" "$@" --local_dir "$dir")
    fi
    info "    running: ${cmd[*]}"
    "${cmd[@]}" ||
        die "modelscope failed (exit status $?) while downloading from $repo into $dir." \
            "Check the network and free disk space, then run this script again;" \
            "files that already arrived are kept and will not be fetched twice."
}

# missing_in DIR FILE...: print each FILE that is absent or empty in DIR.
missing_in() {
    local dir=$1 f
    shift
    for f in "$@"; do
        [[ -s $dir/$f ]] || printf '%s\n' "$f"
    done
}

# ensure REPO DIR FILE...: make DIR hold every FILE, fetching only the missing ones.
ensure() {
    local repo=$1 dir=$2
    shift 2
    local -a missing
    mapfile -t missing < <(missing_in "$dir" "$@")
    if ((${#missing[@]} == 0)); then
        info "    already present: $*"
        return 0
    fi

    require_modelscope
    require_hub
    make_dir "$dir"
    local f
    for f in "${missing[@]}"; do
        # An empty file is a leftover of an interrupted download; remove it so
        # modelscope does not mistake it for a finished one.
        if [[ -e $dir/$f ]]; then rm -f -- "${dir:?}/$f"; fi
    done
    info "    fetching: ${missing[*]}"
    fetch "$repo" "$dir" "${missing[@]}"

    mapfile -t missing < <(missing_in "$dir" "$@")
    ((${#missing[@]} == 0)) ||
        die "modelscope finished, but these files are still missing or empty in $dir:" \
            "    ${missing[*]}" \
            "Run this script again to retry."
}

# shards_in INDEX: the shard file names an index.json maps tensors to. A
# shard name is the only kind of JSON string there ending in ".safetensors"
# (the keys are tensor names), so grep is enough and no JSON parser is needed.
shards_in() {
    grep -oE '[^"/]+\.safetensors' "$1" | sort -u
}

# Absolute, so that the printed command works from anywhere; nothing is created
# until something is downloaded.
[[ $MODEL_ROOT == /* ]] || MODEL_ROOT="$PWD/$MODEL_ROOT"
MODEL_ROOT=${MODEL_ROOT%/}
OPENELM_DIR="$MODEL_ROOT/OpenELM-3B-Instruct"
TOKENIZER_DIR="$MODEL_ROOT/Llama-2-7b-hf"
DRAFT_DIR="$MODEL_ROOT/OpenELM-270M-Instruct"

info "==> $OPENELM_REPO -> $OPENELM_DIR"
# First the small files, including the index, then the shards the index names.
ensure "$OPENELM_REPO" "$OPENELM_DIR" "${OPENELM_FILES[@]}"
mapfile -t shards < <(shards_in "$OPENELM_DIR/$OPENELM_INDEX")
((${#shards[@]} > 0)) ||
    die "$OPENELM_DIR/$OPENELM_INDEX names no .safetensors shards." \
        "Delete that file and run this script again."
ensure "$OPENELM_REPO" "$OPENELM_DIR" "${shards[@]}"

info "==> $TOKENIZER_REPO (tokenizer files only) -> $TOKENIZER_DIR"
ensure "$TOKENIZER_REPO" "$TOKENIZER_DIR" "${TOKENIZER_FILES[@]}"

if [[ ${DRAFT:-} == 1 ]]; then
    info "==> $DRAFT_REPO (draft model for speculative decoding) -> $DRAFT_DIR"
    ensure "$DRAFT_REPO" "$DRAFT_DIR" "${DRAFT_FILES[@]}"
fi

info "" \
    "Done. Everything is in place:" \
    "    model:     $OPENELM_DIR" \
    "    tokenizer: $TOKENIZER_DIR" \
    "" \
    "Start the server with:" \
    "    python api.py --model-path $(printf '%q' "$OPENELM_DIR") --tokenizer-path $(printf '%q' "$TOKENIZER_DIR")"
if [[ $OPENELM_DIR == "$API_DEFAULT_MODEL_PATH" && $TOKENIZER_DIR == "$API_DEFAULT_TOKENIZER_PATH" ]]; then
    info "(these are api.py's default paths, so plain \`python api.py\` works too)"
fi
if [[ ${DRAFT:-} == 1 ]]; then
    info "" \
        "Draft model for speculative decoding: $DRAFT_DIR" \
        "    add --draft-model-path $(printf '%q' "$DRAFT_DIR") to the command above"
fi
