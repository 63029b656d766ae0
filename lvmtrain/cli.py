"""`lvmtrain <verb>`: thin argument parsing; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lvmtrain.checkpoint import CheckpointError
from lvmtrain.config.schema import ConfigError, DataConfig
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
    check = data_verbs.add_parser("check", help="pre-flight: find missing / corrupt shards, count samples, "
                                  "decode a few per shard; exit 1 on any bad shard or bad decoded sample")
    check.add_argument("spec", help="shard spec, e.g. '/data/{00000..00099}.tar' (quote the braces)")
    check.add_argument("--world", type=int, default=1, help="ranks the run will use")
    check.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    check.add_argument("--batch-size", type=int, default=None, help="samples per rank per step")
    check.add_argument("--decode", type=int, default=4, metavar="K", help="samples decoded per shard")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    index = data_verbs.add_parser("index", help="count every shard once (in parallel) and write the dataset "
                                  "index a run starts from (data.train=INDEX.json): no shard scans at start-up")
    index.add_argument("spec", help="shard spec of one source, e.g. 's3://laion/{00000..41407}.tar'")
    index.add_argument("--out", default=None, help="index file (default: SHARD_FOLDER/lvmtrain-index.json; "
                       "required for remote shards)")
    index.add_argument("--sidecars", default=None, metavar="DIR", help="write the shards' index sidecars here "
                       "(default: beside local shards; OUT's folder/sidecars for remote ones)")
    index.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    for verb in (check, index):
        verb.add_argument("--io-timeout-s", type=float, default=DataConfig.io_timeout_s, metavar="S",
                            help="remote shards: seconds one read may take before it is retried (data.io_timeout_s)")
        verb.add_argument("--io-retries", type=int, default=DataConfig.io_retries, metavar="N",
                            help="remote shards: further attempts of a failed read (data.io_retries)")
    build = data_verbs.add_parser("build", help="build img2dataset-layout shards + index sidecars from a "
                                  "class folder, a CSV / parquet of local images, or other shards (reshard)")
    build.add_argument("source", help="folder of class sub-folders, .csv / .parquet (path + caption "
                       "[+ label] columns), or a shard spec to reshard")
    build.add_argument("out", help="output folder (must hold no shards yet)")
    build.add_argument("--per-shard", type=int, default=10000, help="samples per shard")
    build.add_argument("--prefix", default="", help="shard names PREFIX-00000.tar (default 00000.tar)")
    build.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    build.add_argument("--caption-template", default="a photo of a {}", help="folder builds: caption for "
                       "a class folder name ({} <- name, _ -> space)")
    build.add_argument("--image-format", choices=["keep", "jpg"], default="keep",
                       help="keep the source bytes (PNG / JPEG / WebP; others become PNG) or re-encode as JPEG")
    build.add_argument("--resize", type=int, default=None, metavar="S", help="resize so the shorter side is S")

    ckpt = verbs.add_parser("ckpt", help="inspect a checkpoint, or export its weights")
    ckpt_verbs = ckpt.add_subparsers(dest="ckpt_verb", required=True)
    inspect = ckpt_verbs.add_parser("inspect", help="manifest and tensor summary of a checkpoint")
    export = ckpt_verbs.add_parser("export", help="the model for use outside lvmtrain: our weights as one "
                                   "safetensors file, or a folder open_clip / timm load as `local-dir:FOLDER`")
    for verb in (inspect, export):
        verb.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")
        verb.add_argument("--allow-older", action="store_true", help="for a run directory whose newest "
                          "checkpoints fail verification: use the newest that verifies (named on stderr) "
                          "instead of exiting 2")
    export.add_argument("--teacher", action="store_true", help="dino runs: the teacher's backbone instead of "
                        "the student's (open_clip / timm formats)")
    export.add_argument("--format", choices=["safetensors", "open_clip", "timm"], default="safetensors",
                        help="safetensors: one file, our names; open_clip (CLIP models): a folder for "
                        "open_clip.create_model_and_transforms('local-dir:FOLDER'); timm (ViTs): a folder for "
                        "timm.create_model('local-dir:FOLDER', pretrained=True)")
    export.add_argument("--out", help="output file, or folder for open_clip / timm (default: RUN/exports/"
                        "step_XXXXXXXX-safetensors.safetensors or RUN/exports/step_XXXXXXXX-FORMAT/, outside "
                        "checkpoints/, whose retention would delete it)")

    submit = verbs.add_parser("submit", help="submit a training job to Slurm (slurm/train.sbatch); prints the job id")
    submit.add_argument("config", help="YAML config file")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, passed to every rank")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU (0: CPU ranks)")
    submit.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node without GPUs (default 1)")
    submit.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (data workers + threads)")
    submit.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (the job saves and requeues "
                        "itself 2 minutes before it)")
    submit.add_argument("--partition", default=None)
    submit.add_argument("--account", default=None)
    submit.add_argument("--job-name", default=None, help="default: run.name; the run directory is "
                        "log.dir/JOB_NAME-JOB_ID")
    submit.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="any other sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    submit.add_argument("--script", default=None, help="batch script (default: the repository's slurm/train.sbatch)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")

    evaluate = verbs.add_parser("eval", help="score a checkpoint on evaluation sets (zero-shot, retrieval, k-NN, "
                                "linear probe, a classifier's head), sharded over torchrun's ranks")
    evaluate.add_argument("path", help="checkpoint directory, a run directory (its newest checkpoint), or a "
                          "safetensors file of `ckpt export`")
    evaluate.add_argument("overrides", nargs="*", help="config keys over the checkpoint's, e.g. parallel.backend=fsdp "
                          "eval.batch_size=512 data.workers=4")
    evaluate.add_argument("--set", action="append", default=[], metavar="NAME=KIND:SHARDS[,key=value...]",
                          help="a set to score (repeatable; default: the run's own data.val and eval.sets); KIND: "
                          "zeroshot, retrieval, knn, linear or classify; keys as eval.sets[]'s, e.g. "
                          "fmnist=knn:'test-{0..1}.tar',train='train-{0..11}.tar',k=20")
    evaluate.add_argument("--out", default=None, help="JSON file of the scores (default: RUN/eval/step_X.json)")
    evaluate.add_argument("--allow-older", action="store_true", help="for a run directory whose newest checkpoints "
                          "fail verification: use the newest that verifies")

    report = verbs.add_parser("report", help="PNG plots and a markdown summary of runs from their metrics.jsonl")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several: overlaid)")
    report.add_argument("--out", default=None, help="output folder (default: the first run's report/)")

    verbs.add_parser("models", help="list model presets with parameter counts and FLOPs")
    config = verbs.add_parser("config", help="config utilities")
    config.add_argument("what", choices=["docs", "show"], help="docs: markdown reference; show: resolved config")
    config.add_argument("config", nargs="?", help="YAML config (for show)")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--write", metavar="README", help="docs: replace the reference between the "
                        "config-reference markers of this file")

    # NOTE: overrides may come after options (`submit CONFIG --nodes 2 optim.lr=1e-3`), which
    # argparse alone refuses once the positional list has been read.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = VERBS[args.verb](args)
        sys.stdout.flush()  # NOTE: here, so that a closed pipe surfaces below, not at exit
        return code
    except BrokenPipeError:
        # The reader stopped early (`lvmtrain ckpt inspect RUN | head`): nothing went wrong. Python
        # would complain again flushing stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"lvmtrain: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    import faulthandler

    from lvmtrain.config.loader import load_config
    from lvmtrain.distributed.dims import shutdown

    cfg = load_config(args.config, args.overrides)
    from lvmtrain.preemption import requeue_exit_code, restart_count
    from lvmtrain.rundir import RunFinished, die_with_launcher
    from lvmtrain.trainer import Trainer, TrainingDiverged

    die_with_launcher()
    faulthandler.enable(all_threads=True)  # a crash in native code (SIGSEGV, SIGABRT) prints every thread's stack
    try:
        trainer = Trainer(cfg)
        result = trainer.train()
    except RunFinished as e:
        # NOTE: a restart of a launch whose run finished (a crash after the last save) is done
        print(f"lvmtrain: {'' if restart_count() else 'error: '}{e}", file=sys.stderr)
        return 0 if restart_count() else 2
    except TrainingDiverged as e:
        print(f"lvmtrain: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if trainer.stopped_by:  # the batch script requeues on this code; the new job resumes the checkpoint
        return requeue_exit_code()
    if result and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))
    return 0


def _data(args) -> int:
    return DATA_VERBS[args.data_verb](args)


def _data_demo(args) -> int:
    from lvmtrain.data.build import build_demo

    meta = build_demo(args.out, per_shard=args.per_shard)
    print(json.dumps(meta, indent=2))
    return 0


def _data_check(args) -> int:
    from lvmtrain.data.check import check_shards
    from lvmtrain.data.shards import RemoteIO

    report = check_shards(args.spec, world=args.world, workers=args.workers, batch_size=args.batch_size,
                          decode_per_shard=args.decode, io=RemoteIO(args.io_timeout_s, args.io_retries))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    # NOTE: bad decoded samples fail the check too: training skips them, but a source where some
    # do not decode is rarely what its owner meant (a wrong image key makes every one bad).
    return 1 if report.problems or report.bad else 0


def _data_index(args) -> int:
    from lvmtrain.data.dataset_index import write_dataset_index
    from lvmtrain.data.shards import RemoteIO

    path, counted = write_dataset_index(args.spec, args.out, sidecars=args.sidecars, workers=args.workers,
                                        io=RemoteIO(args.io_timeout_s, args.io_retries))
    for url, _, message in counted.problems[:20]:
        print(f"problem: {message}", file=sys.stderr)
    print(f"indexed {len(counted.urls):,} shards, {sum(counted.counts):,} samples ({len(counted.problems)} shard "
          f"problem(s)) -> {path}\ntrain on it with data.train={path}")
    return 0


def _data_build(args) -> int:
    from lvmtrain.data.build import build_shards

    stats = build_shards(args.source, args.out, per_shard=args.per_shard, prefix=args.prefix,
                         workers=args.workers, caption_template=args.caption_template,
                         image_format=args.image_format, resize=args.resize)
    for skip in stats["skipped_files"][:10]:
        print(f"skipped {skip['file']}: {skip['error']}", file=sys.stderr)
    print(f"wrote {len(stats['shards'])} shards, {stats['successes']} samples ({stats['skipped']} skipped) to "
          f"{args.out}\nspec: {stats['spec']}")
    return 0


DATA_VERBS = {"demo": _data_demo, "check": _data_check, "index": _data_index, "build": _data_build}


def _ckpt(args) -> int:
    from lvmtrain import export

    def warn(line: str) -> None:
        print(f"lvmtrain: warning: {line}", file=sys.stderr, flush=True)

    if args.ckpt_verb == "inspect":
        print(export.inspect(args.path, allow_older=args.allow_older, warn=warn))
    else:
        print(export.export(args.path, args.format, args.out, allow_older=args.allow_older, warn=warn,
                            teacher=args.teacher))
    return 0


def _submit(args) -> int:
    from pathlib import Path

    from lvmtrain.slurm import DEFAULT_SCRIPT, JobSpec, submit

    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                   account=args.account, job_name=args.job_name, sbatch_args=args.sbatch_arg,
                   script=Path(args.script) if args.script else DEFAULT_SCRIPT)
    print(submit(args.config, args.overrides, spec, dry_run=args.dry_run))
    return 0


def _eval(args) -> int:
    from lvmtrain.distributed.dims import shutdown
    from lvmtrain.evaluation.standalone import evaluate_checkpoint
    from lvmtrain.export import resolve, run_dir_of

    warn = lambda line: print(f"lvmtrain: warning: {line}", file=sys.stderr)  # noqa: E731
    if args.path.endswith(".safetensors"):  # an export: scores beside it by default
        ckpt = Path(args.path)
        out = args.out or str(ckpt.with_suffix(".eval.json"))
    else:
        ckpt = resolve(args.path, allow_older=args.allow_older, warn=warn)[0]
        out = args.out or str(run_dir_of(ckpt) / "eval" / f"{ckpt.name}.json")
    try:
        result = evaluate_checkpoint(str(ckpt), args.set, args.overrides, out=out)
    finally:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result["scores"]))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _report(args) -> int:
    from lvmtrain.report import report

    out = report(args.runs, args.out)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
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


VERBS = {"train": _train, "data": _data, "ckpt": _ckpt, "eval": _eval, "submit": _submit, "report": _report,
         "models": _models,
         "config": _config}

if __name__ == "__main__":
    sys.exit(main())
