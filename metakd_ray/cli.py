"""The ``metakd-ray`` command line.

    metakd-ray validate CONFIG [key=value ...]     print the resolved config
    metakd-ray prepare  CONFIG [key=value ...]     split + tokenize, print per-domain counts
    metakd-ray teacher  CONFIG [--fresh]           train the configured teacher kind on Ray Train
    metakd-ray distill  CONFIG [--methods ...]     one student per domain as parallel Ray tasks
    metakd-ray run      CONFIG [--methods ...]     the whole pipeline, writes results.json
    metakd-ray sweep    CONFIG --space FILE        Ray Tune + Optuna search (tune_spaces/*.yaml)
    metakd-ray doctor   CONFIG [--address ...]     PASS/FAIL checks of cluster, storage, MLflow, model, data
    metakd-ray report   OUTPUT_DIR ... | --experiment NAME   accuracy tables over seeds, plots, vs the paper

CONFIG is a preset (quickstart, amazon, mnli) or a YAML path. Bad input exits with code 2 and one
``error:`` line naming the key or file.
"""

from __future__ import annotations

import argparse
import os
import sys

from metakd_ray.errors import MetaKDError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metakd-ray", description="Meta-KD cross-domain distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="preset name (quickstart, amazon, mnli) or path to a YAML config")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        return p

    command("validate", "Print the resolved, validated config.")
    command("prepare", "Load, dedupe, split and tokenize the data; print per-domain counts.")
    p = command("teacher", "Train the teacher (teacher.kind) with Ray Train.")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished or finished run and start anew")
    for name, text in (("distill", "Distil one student per domain from trained teachers (Ray tasks)."),
                       ("run", "Run the whole pipeline and write results.json.")):
        p = command(name, text)
        p.add_argument("--methods", help="comma-separated methods or 'all' (default: distill.methods)")
        if name == "run":
            p.add_argument("--fresh", action="store_true", help="retrain the teachers and students from scratch")
    p = command("doctor", "Check Ray, storage, MLflow, model and data for this config (PASS/FAIL lines).")
    p.add_argument("--address", default=None, help="Ray address (default: ray.address, $RAY_ADDRESS or a local Ray)")
    p = command("sweep", "Ray Tune + Optuna (+ ASHA) search over a space in tune_spaces/.")
    p.add_argument("--space", required=True, help="search-space YAML, e.g. tune_spaces/distill.yaml")
    p.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--concurrency", type=int, default=2, help="trials running at once (default 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--name", default="", help="sweep name (default: <space>-<config hash>)")
    p.add_argument("--objective", default="accuracy", help="accuracy (default) or accuracy,latency (Pareto)")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    p = sub.add_parser("report", help="Domain x method report over seeds, beside the paper, with plots.",
                       description="Domain x method test accuracy (mean ± std over seeds) beside the paper's "
                                   "table, with heatmap, size/latency, gap and training-curve plots.")
    p.add_argument("sources", nargs="*", metavar="OUTPUT_DIR",
                   help="run output directories (or their results.json, or a directory of run directories)")
    p.add_argument("--experiment", help="read every finished pipeline run of this MLflow experiment instead")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow store for --experiment (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="report directory (default: OUTPUT_DIR/report for one source, else ./report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except MetaKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from metakd_ray.config import dump_yaml, load_config

    if args.command == "report":
        return _report(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        print(dump_yaml(cfg), end="")
        return 0
    if args.command == "prepare":
        from metakd_ray.data.prepare import prepare

        prepare(cfg)
        print(f"splits: {cfg.out / 'splits.json'}")
        return 0

    if args.command == "doctor":
        from metakd_ray.doctor import run_doctor

        return 0 if run_doctor(cfg, args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS")) else 1
    if args.command == "sweep":
        from metakd_ray.tune import sweep

        sweep(cfg, args.space, args.trials, args.concurrency, resume=args.resume, name=args.name,
              objective=args.objective, asha=not args.no_asha)
        return 0

    from metakd_ray.pipeline import resolve_methods, run_pipeline

    if args.command == "teacher":
        from metakd_ray.methods import methods_from

        run_pipeline(cfg, methods_from(cfg.teacher.kind)[:1], fresh=args.fresh, teachers_only=True)
        return 0
    methods = resolve_methods(args.methods, cfg)
    run_pipeline(cfg, methods, fresh=getattr(args, "fresh", False), require_teachers=args.command == "distill")
    return 0


def _report(args) -> int:
    from pathlib import Path

    from metakd_ray.report import build_report, load_results, load_results_from_mlflow

    if bool(args.sources) == bool(args.experiment):
        raise MetaKDError("report: give either OUTPUT_DIR(s) or --experiment NAME")
    if args.experiment:
        if not args.tracking_uri:
            raise MetaKDError("report --experiment: no MLflow store (pass --tracking-uri or set MLFLOW_TRACKING_URI)")
        results = load_results_from_mlflow(args.experiment, args.tracking_uri)
        default = Path(f"report-{args.experiment}")
    else:
        results = load_results(args.sources)
        one = Path(args.sources[0])
        default = (one if one.is_dir() else one.parent) / "report" if len(args.sources) == 1 else Path("report")
    build_report(results, Path(args.out) if args.out else default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
