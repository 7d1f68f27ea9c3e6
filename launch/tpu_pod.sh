#!/usr/bin/env bash
# One jaxcompress job on a Cloud TPU VM pod: the same command on every worker (one process
# per host); jax.distributed.initialize() detects the rest. Needs jaxcompress checked out
# and installed at ~/jaxcompress on every worker. train.batch_size is the global batch.
#
#   launch/tpu_pod.sh <tpu-name> <zone> configs/x.py /shared/run [--config.<field>=<value> ...]
#
# The workdir must be on a file system every worker sees (e.g. a Filestore mount).
set -euo pipefail
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="cd ~/jaxcompress && \
python -m launch.main --config=$CONFIG --workdir=$WORKDIR --config.distributed.enabled=True $*"
