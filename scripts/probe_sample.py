"""Score a pretraining run on the two held-out probes of the packaged Sentinel-2 sample
(geodino.eval.sample_probe) against a random-init backbone of the same architecture.

    geodino train run_dir=runs/quick train.iterations=200
    python scripts/probe_sample.py runs/quick
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory or checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-init backbone")
    args = ap.parse_args(argv)

    from geodino.eval.sample_probe import compare
    from geodino.models import backbone_from_contract, load_backbone

    trained = load_backbone(args.run)
    torch.manual_seed(args.seed)
    random_init = backbone_from_contract(trained.geodino_contract)  # same architecture, official init
    random_init.init_weights()
    print(json.dumps(compare(trained, random_init), indent=2))


if __name__ == "__main__":
    main()
