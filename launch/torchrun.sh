#!/usr/bin/env bash
# One node: every local GPU, or CPU processes without one.
#
#   launch/torchrun.sh CONFIG [key=value ...]
#
# Environment (all optional):
#   NPROC         ranks (default: the number of visible GPUs; 2 CPU processes without a GPU)
#   MAX_RESTARTS  elastic restarts after a worker crash (default 0); restarted workers resume from
#                 the run's last checkpoint (checkpoint.resume=auto)
#   PORT          rendezvous port (default: a free one)
#   SHUTDOWN_TIMEOUT  seconds the workers get to save on SIGUSR1 / SIGTERM before SIGKILL (default 300)
#   VENV          the virtual environment with lvmtrain (default .venv, else the python on PATH)
#
# The same as plain torchrun:
#   torchrun --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
#     --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m lvmtrain train CONFIG [key=value ...]
# SIGUSR1 or SIGTERM to torchrun: every worker finishes its step and saves a checkpoint; torchrun
# then exits non-zero, and the same command resumes the run.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: launch/torchrun.sh CONFIG [key=value ...]" >&2; exit 2; }
VENV=${VENV:-.venv}
PYTHON=$VENV/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  [ "$NPROC" -gt 0 ] || NPROC=2
fi
# NOTE: TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with the rendezvous store shared with the workers,
# an elastic restart after a worker crash hangs or fails about half the time (pytorch #135712).
# torchrun dies on SIGUSR1 unless it is told to forward it (--signals-to-handle).
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 exec "$PYTHON" -m torch.distributed.run \
  --nnodes=1 --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv-backend=c10d --rdzv-endpoint="localhost:${PORT:-0}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
  -m lvmtrain train "$@"
