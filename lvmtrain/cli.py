"""`lvmtrain <verb>`: thin argument parsing; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lvmtrain.config.schema import ConfigError
from lvmtrain.data.shards import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lvmtrain", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a model from a YAML config and key=value overrides")
    train.add_argument("config", help="YAML config file (configs/...)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")

    data = verbs.add_parser("data", help="build and inspect shards")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    demo = data_verbs.add_parser("demo", help="build demo shards from real bundled data (Fashion-MNIST / MNIST)")
    demo.add_argument("out", help="output directory")
    demo.add_argument("--per-shard", type=int, default=5000, help="samples per shard")

    verbs.add_parser("models", help="list model presets with parameter counts and FLOPs")
    config = verbs.add_parser("config", help="config utilities")
    config.add_argument("what", choices=["docs", "show"], help="docs: markdown reference; show: resolved config")
    config.add_argument("config", nargs="?", help="YAML config (for show)")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--write", metavar="README", help="docs: replace the reference between the "
                        "config-reference markers of this file")

    args = parser.parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"lvmtrain: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from lvmtrain.config.loader import load_config
    from lvmtrain.distributed.dims import shutdown

    cfg = load_config(args.config, args.overrides)
    from lvmtrain.trainer import Trainer

    try:
        result = Trainer(cfg).train()
    finally:
        shutdown()
    if result and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))
    return 0


def _data(args) -> int:
    from lvmtrain.data.build import build_demo

    meta = build_demo(args.out, per_shard=args.per_shard)
    print(json.dumps(meta, indent=2))
    return 0


def _models(args) -> int:
    import torch

    from lvmtrain.models.registry import build_model, list_presets

    print(f"{'preset':12s} {'params':>14s} {'GFLOPs/sample (fwd+bwd)':>24s}")
    for name in list_presets():
        with torch.device("meta"):
            model = build_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:12s} {params:14,d} {model.flops_per_sample() / 1e9:24.2f}")
    return 0


def _config(args) -> int:
    from lvmtrain.config.loader import config_reference_markdown, config_to_dict, load_config

    if args.what == "docs" and args.write:
        from pathlib import Path

        path = Path(args.write)
        start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
        text = path.read_text()
        if start not in text or end not in text:
            raise ConfigError(f"{path}: no {start} ... {end} markers to write the reference between")
        head, rest = text.split(start, 1)
        path.write_text(f"{head}{start}\n{config_reference_markdown()}\n{end}{rest.split(end, 1)[1]}")
    elif args.what == "docs":
        print(config_reference_markdown())
    else:
        import yaml

        print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False))
    return 0


VERBS = {"train": _train, "data": _data, "models": _models, "config": _config}

if __name__ == "__main__":
    sys.exit(main())
