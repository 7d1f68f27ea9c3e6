"""Runs one jaxcompress job from an ml_collections config (see jaxcompress.cli).

    python -m launch.main --config=configs/quickstart.py --workdir=/tmp/quickstart \
        --config.train.num_epochs=3
"""
from jaxcompress.cli import main

if __name__ == "__main__":
    main()
