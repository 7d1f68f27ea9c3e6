#!/usr/bin/env bash
# One jaxcompress job over several SLURM nodes: one process per node, each using all of its
# node's GPUs; jax.distributed.initialize() detects the coordinator, process count and id
# from SLURM. train.batch_size is the global batch over every node and GPU.
#
#   sbatch --nodes=2 launch/slurm.sh configs/x.py /shared/run [--config.<field>=<value> ...]
#
# The workdir must be on a file system every node sees.
#SBATCH --job-name=jaxcompress
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
set -euo pipefail
CONFIG=$1 WORKDIR=$2
shift 2
srun --ntasks-per-node=1 python -m launch.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.enabled=True "$@"
