#!/usr/bin/env bash
# Pretraining on every host of a Cloud TPU VM pod slice: copies this checkout to each worker,
# installs it (once; SKIP_INSTALL=1 skips), then runs the same `launch.py pretrain` on all
# workers at once (gcloud --worker=all). jax.distributed finds the other hosts by itself.
# Docs: docs/launching.md.
#
#   scripts/tpu_pod.sh NAME ZONE [--config.key=value ...]
#   CONFIG=configs/bert_mlm.py:base WORKDIR=/mnt/shared/runs/mlm-base \
#       scripts/tpu_pod.sh my-v4-32 us-central2-b --config.mesh.fsdp=-1 --config.batch_size=512
#
# Environment: CONFIG (default configs/bert_mlm.py:base), WORKDIR (required: a directory that
# every worker mounts at the same path, e.g. Filestore or gcsfuse: each host writes its
# checkpoint shards there; gs:// paths are not supported), PYTHON (python3 of the workers,
# 3.11 or newer), PROJECT (gcloud --project, optional), SKIP_INSTALL=1.
# A multi-slice run (queued resources with --node-count) runs this once per slice, all at
# the same time, with --config.mesh.dcn_data=<slices>.
set -euo pipefail

if (($# < 2)); then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
NAME=$1
ZONE=$2
shift 2
CONFIG=${CONFIG:-configs/bert_mlm.py:base}
WORKDIR=${WORKDIR:?set WORKDIR to a directory every TPU worker shares}
PYTHON=${PYTHON:-python3}
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    # The working tree as it is (uncommitted changes included), without runs and caches.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    archive=$tmp/pretrax.tar.gz
    tar -C "$ROOT" -czf "$archive" --exclude=./runs --exclude=./.venv --exclude=./.git \
        --exclude=__pycache__ .
    "${GCLOUD[@]}" scp "$archive" "$NAME:~/pretrax.tar.gz" --worker=all "${FLAGS[@]}"
    "${GCLOUD[@]}" ssh "$NAME" --worker=all "${FLAGS[@]}" --command "
        set -e
        mkdir -p ~/pretrax && tar -xzf ~/pretrax.tar.gz -C ~/pretrax && cd ~/pretrax
        [ -d .venv ] || $PYTHON -m venv .venv
        . .venv/bin/activate
        pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
fi

# Every worker runs the same command; arguments are quoted for the remote shell.
printf -v args ' %q' --config "$CONFIG" --workdir "$WORKDIR" "$@"
"${GCLOUD[@]}" ssh "$NAME" --worker=all "${FLAGS[@]}" \
    --command "cd ~/pretrax && . .venv/bin/activate && python launch.py pretrain$args"
