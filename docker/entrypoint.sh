#!/usr/bin/env bash
# The image's entry point, after the SageMaker container contract.
#
# SageMaker starts a hosting container as `docker run IMAGE serve`. `serve` (also the image's
# default command) runs `twinserve serve` on 0.0.0.0 and on port $SAGEMAKER_BIND_TO_PORT
# (SageMaker sets it for inference pipelines), else $TWINSERVE_PORT, else $PORT (8080 in the
# image): the same order the image's HEALTHCHECK probes. The model is /opt/ml/model when
# SageMaker unpacked weights there, else what `twinserve serve` reads from the environment
# (TWINSERVE_MODEL, HF_MODEL_ID + HF_MODEL_REVISION, else `default`); `twinserve serve` also
# reads every TGI/SageMaker limit itself (MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS, SM_NUM_GPUS, ...).
# Arguments after `serve` are added to its flags. Any other command runs as given
# (`docker run IMAGE twinserve plan ...`, `docker run -it IMAGE bash`).
set -euo pipefail

# where SageMaker unpacks the model's ModelDataUrl; SM_MODEL_DIR moves it (tests, other layouts)
model_dir="${SM_MODEL_DIR:-/opt/ml/model}"

has_weights() {
  # pickle checkpoints count too: the loader then refuses them with a clear error, instead of
  # this script silently serving another model
  local file
  for file in "$1"/*.safetensors "$1"/*.bin "$1"/*.pt "$1"/*.pth; do
    [[ -f "$file" ]] && return 0
  done
  return 1
}

if [[ $# -eq 0 ]]; then
  set -- serve
fi
if [[ "$1" != serve ]]; then
  exec "$@"
fi
shift

args=(serve --host 0.0.0.0 --port "${SAGEMAKER_BIND_TO_PORT:-${TWINSERVE_PORT:-${PORT:-8080}}}")
if has_weights "$model_dir"; then
  echo "entrypoint: serving the weights in $model_dir" >&2
  args+=(--model "$model_dir")
else
  echo "entrypoint: no weights in $model_dir; serving ${TWINSERVE_MODEL:-${HF_MODEL_ID:-${MODEL_ID:-default}}}" >&2
fi
exec twinserve "${args[@]}" "$@"
