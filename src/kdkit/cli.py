"""The ``kdkit`` command line: run, validate, ls, demo, bench, cache, report, export, predict.

Exit codes: 0 success, 1 an export that does not compute what PyTorch does, 2 bad input (recipe, names, files),
3 training diverged, 130 interrupted (a checkpoint was saved; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from kdkit.errors import ExportMismatch, KdkitError, TrainingDiverged


def _split_resume(overrides: list[str]) -> tuple[list[str], bool]:
    """``resume=true`` is a run option, not a recipe key: take it out of the overrides."""
    rest, resume = [], False
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "resume":
            choices = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                       "0": False}
            if value.strip().lower() not in choices:
                raise KdkitError(f"resume={value!r} is not a boolean", bad=value.strip().lower(), choices=list(choices),
                                 fix="write resume=true (or pass --resume)")
            resume = choices[value.strip().lower()]
        else:
            rest.append(item)
    return rest, resume


def _names_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Split positional arguments into names (recipes, folders) and ``key=value`` overrides."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def _load_checked(source: Any, overrides: list[str]) -> Any:
    """``load_recipe``; when the schema refuses values, the error also lists what the later checks (taps,
    shapes, files) find in the rest of the recipe, so one report holds every problem."""
    from kdkit.build import with_later_problems
    from kdkit.errors import RecipeErrors
    from kdkit.recipe import load_recipe

    try:
        return load_recipe(source, overrides)
    except RecipeErrors as exc:
        raise with_later_problems(exc, source) from None


def cmd_run(args: argparse.Namespace) -> int:
    """`kdkit run RECIPE [key=value ...]`: train what the recipe describes."""
    from kdkit.recipe import find_recipe
    from kdkit.runner import run_recipe

    overrides, resume = _split_resume(args.overrides)
    source = find_recipe(args.recipe)
    recipe = _load_checked(source, overrides)
    summary = run_recipe(recipe, source=source, resume=args.resume or resume, overwrite=args.overwrite,
                         device=args.device, progress=False if args.quiet else None)
    metric = summary.get("metric", "top1") if summary else None
    if summary and f"best_{metric}" in summary:
        print(f"{recipe.name}: best {metric} {summary[f'best_{metric}']:.2f} (epoch {summary['best_epoch']}), last "
              f"{summary[f'last_{metric}']:.2f}  ->  {recipe.run_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """`kdkit validate RECIPE ...`: build and check recipes without training."""
    from kdkit.build import plan
    from kdkit.recipe import SEARCH_SPACE_PREFIX, Recipe, find_recipe

    if args.schema:
        print(json.dumps(Recipe.model_json_schema(), indent=1))
        return 0
    names, given = _names_and_overrides(args.recipes)
    overrides, _ = _split_resume(given)
    if not names:
        raise KdkitError("no recipe given", fix="kdkit validate RECIPE.yaml [key=value ...]")
    failed = 0
    for name in names:
        if Path(name).stem.startswith(SEARCH_SPACE_PREFIX) and Path(name).is_file():
            failed += not _validate_space(name, overrides)
            continue
        try:
            source = find_recipe(name)
            recipe = _load_checked(source, overrides)
            built = plan(recipe, training=False, source=source)
        except KdkitError as exc:
            failed += 1
            print(f"FAIL {name}\n{exc.render()}", file=sys.stderr)
            continue
        terms = ", ".join(f"{n} {s}->{t}" for n, (s, t) in built.tap_shapes.items())
        teachers = ", ".join(spec.arch for spec in recipe.frozen_teachers().values())
        print(f"ok   {name}: {recipe.model.arch}" + (f" <- {teachers}" if teachers else "")
              + f" on {recipe.data.dataset}" + (f" [{terms}]" if terms else ""))
        for warning in built.warnings:
            print(f"     warning: {warning}")
    return 2 if failed else 0


def _validate_space(name: str, overrides: list[str]) -> bool:
    """Check a search space file (``search_space*.yaml``) as `kdkit validate` does a recipe; whether it is valid."""
    from kdkit.grammar import open_space

    try:
        if overrides:
            raise KdkitError(f"overrides {overrides} apply to recipes, not to the search space {name!r}",
                             fix="edit the space file, or override keys of its base recipe when a search runs it")
        space = open_space(name)
    except KdkitError as exc:
        print(f"FAIL {name}\n{exc.render()}", file=sys.stderr)
        return False
    print(f"ok   {name}: search space over {space.spec.recipe}, {len(space.cores)} terms, {space.size():,} "
          f"distillers of {'/'.join(str(n) for n in space.term_counts)} term(s)")
    return True


def cmd_ls(args: argparse.Namespace) -> int:
    """`kdkit ls WHAT [NAME]`: list registered names, shipped recipes or a model's taps; with NAME, one component
    in full."""
    from kdkit.bridges import BRIDGES
    from kdkit.data import DATASETS, SETTINGS
    from kdkit.losses import LOSSES
    from kdkit.method import METHODS
    from kdkit.models import MODELS
    from kdkit.recipe import shipped_recipes
    from kdkit.task import TASKS

    registries = {"models": MODELS, "losses": LOSSES, "datasets": DATASETS, "bridges": BRIDGES, "methods": METHODS,
                  "tasks": TASKS, "settings": SETTINGS}
    if args.what == "recipes":
        if args.name:
            raise KdkitError(f"`kdkit ls recipes` takes no NAME (got {args.name!r})",
                             fix=f"kdkit validate {args.name} checks a recipe; the shipped files are under "
                                 "recipes/ (kdkit ls recipes lists them)")
        for name in shipped_recipes():
            print(name)
        return 0
    if args.what == "taps":
        from kdkit.build import KNOWN_SHAPES
        from kdkit.models import build_model
        from kdkit.taps import probe_shapes, resolve_tap, tap_choices

        if not args.name:
            raise KdkitError("`kdkit ls taps` needs a model name", fix="kdkit ls taps resnet8x4")
        classes, channels, size = KNOWN_SHAPES.get(args.dataset, (10, 3, 32))
        model = build_model(args.name, num_classes=classes, in_channels=channels, image_size=size)
        import torch

        taps = [resolve_tap(model, spec) for spec in tap_choices(model)]
        shapes = probe_shapes(model, taps, torch.zeros(2, channels, size, size), only_tensors=True)
        friendly = getattr(model, "feature_taps", {})
        for tap in (t for t in taps if t.spec in shapes):
            note = f"  (= {friendly[tap.spec]})" if tap.spec in friendly else ""
            print(f"{tap.spec:40s} {shapes.get(tap.spec)!s}{note}")
        return 0
    if args.name:  # one component in full (an unknown name fails with the closest choices)
        from kdkit.describe import DESCRIBERS

        print(DESCRIBERS[args.what](args.name))
        return 0
    registry = registries[args.what]
    width = max((len(n) for n in registry.names()), default=0)
    for name in registry.names():
        print(f"{name:{width}s}  {registry.describe(name)}")
    if args.what == "models":
        print(f"{'timm:NAME':{width}s}  any timm model (pip install 'kdkit[zoo]'), random init or checkpoint")
        print(f"{'torchvision:NAME':{width}s}  any torchvision classification model, random init or checkpoint")
        print(f"{'pkg.module:factory':{width}s}  your own factory, imported by path (only with --trust-code)")
    if args.what == "tasks":
        for name, task in TASKS.items():
            print(f"  {name}: metrics {', '.join(task.metrics)} (best by {task.best}); targets: "
                  f"{task.target or 'the labels'}; deploys {task.deployed_output}")
    if args.what == "methods":
        sections = {name: m.section for name, m in METHODS.items() if m.section}
        print("recipe sections: " + (", ".join(f"`{s}:` (method {n})" for n, s in sections.items()) or "none"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`kdkit demo`: the main job (see :mod:`kdkit.demo`)."""
    from kdkit.demo import run_demo

    run_demo(out=Path(args.out), data=args.data, data_dir=args.data_dir, seeds=args.seeds, quick=args.quick,
             overwrite=args.overwrite, amp=args.amp, jobs_requested=args.jobs)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`kdkit bench methods|speed`: every method on Fashion-MNIST, or ms per step vs hand-written loops."""
    from kdkit.bench.methods import run_methods_bench

    if args.what == "export":
        from kdkit.bench.export import run_export_bench

        names, overrides = _names_and_overrides(args.overrides)
        if len(names) != 1 or overrides:
            raise KdkitError(f"bench export takes one run folder, got {args.overrides or 'none'}",
                             fix="kdkit bench export runs/demo/kd_seed0 [--format onnx]")
        if args.threads is not None:
            if args.threads < 1:
                raise KdkitError(f"--threads {args.threads} runs nothing", fix="use --threads 1 or more",
                                 where="--threads")
            import torch

            torch.set_num_threads(args.threads)  # onnxruntime is given as many
        run_export_bench(Path(names[0]), args.format, out=Path(args.out) if args.out else None)
        return 0
    if args.what == "speed":
        from kdkit.bench.speed import run_speed_bench

        names, overrides = _names_and_overrides(args.overrides)
        if len(names) > 1:
            raise KdkitError(f"bench speed takes one recipe, got {names}", fix="kdkit bench speed fashion_mnist/kd")
        if args.rounds < 2:
            raise KdkitError(f"--rounds must be at least 2, got {args.rounds}", bad=args.rounds,
                             fix="use --rounds 15 (the default) or more for a narrower interval")
        quick = {"steps": 2, "rounds": 2, "warmup": 1, "profile_steps": 2} if args.quick else {"rounds": args.rounds}
        run_speed_bench(names[0] if names else "fashion_mnist/kd", Path(args.out or "runs/bench_speed"), **quick,
                        overrides=overrides)
        return 0
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    default_out = "runs/bench_methods" if args.suite == "fashion_mnist" else f"runs/bench_{args.suite}"
    run_methods_bench(Path(args.out or default_out), seeds=args.seeds, methods=methods, quick=args.quick,
                      overrides=args.overrides, suite=args.suite)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`kdkit cache build RECIPE [key=value ...]` or `kdkit cache info FOLDER`."""
    if args.what == "info":
        from kdkit.cache import TeacherCache

        if len(args.overrides) != 1:
            raise KdkitError("cache info takes one cache folder", fix="kdkit cache info runs/cache/KEY")
        cache = TeacherCache(Path(args.overrides[0]))
        print(json.dumps({k: v for k, v in cache.manifest.items() if k != "taps_layout"}, indent=1))
        print(f"teacher outputs: {cache.describe()}")
        return 0
    from kdkit.assemble import build_teacher_cache
    from kdkit.build import resolve_device
    from kdkit.recipe import find_recipe, load_recipe
    from kdkit.runner import train_weights_first

    names, overrides = _names_and_overrides(args.overrides)
    if len(names) != 1:
        raise KdkitError(f"cache build takes one recipe, got {names or 'none'}",
                         fix="kdkit cache build RECIPE [teacher.cache.views=K ...]")
    source = find_recipe(names[0])
    recipe = _load_checked(source, overrides)
    if recipe.teacher is None:
        what = "several teachers (`teachers:`); a cache holds one teacher's outputs" if recipe.has_teacher else \
            "no teacher to cache"
        raise KdkitError(f"recipe {recipe.name!r} has {what}", fix="use a recipe with one `teacher:`")
    if recipe.teacher.cache is None:  # building for a recipe that does not use a cache yet: default settings
        recipe = load_recipe(source, [*overrides, "teacher.cache={}"])
    train_weights_first(recipe, source, device=args.device)
    cache = build_teacher_cache(recipe, source=source, device=resolve_device(args.device) if args.device else None,
                                overwrite=args.overwrite, progress=not args.quiet)
    m = cache.manifest
    print(f"teacher cache: {cache.folder} ({cache.describe()}; built in {m['build_seconds']} s)")
    if recipe.teacher.cache.dir is None:
        print("runs use it when the recipe has `teacher: {cache: {...}}` with the same settings "
              "(the folder name is their hash)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """`kdkit search SPACE`: find a distiller by proxy runs on a validation split (resumable)."""
    from kdkit.search import run_search

    result = run_search(args.space, args.overrides, out=args.out, trials=args.trials, strategy=args.strategy)
    best, cost = result["best"], result["cost"]
    print(f"search: {result['complete']}/{result['budget']} trials finished ({cost['seconds_total']} s, "
          f"{cost['teacher_forwards']:,} teacher forwards); results in {result['out']}/search.json, report.md")
    if best is not None:
        print(f"best: trial {best['number']}, validation {result['objective']} {best['value']:.4f}: {best['formula']}"
              f"\ntrain it (test split): kdkit run {result['best_recipe']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`kdkit sweep RECIPE SWEEP`: tune a recipe's keys with Optuna on a validation split (resumable)."""
    from kdkit.sweep import run_sweep

    result = run_sweep(args.recipe, args.sweep, args.overrides, out=args.out, trials=args.trials,
                       sampler=args.sampler, mode=args.mode)
    best = result["best"]
    print(f"sweep: {result['complete']}/{result['budget']} trials finished; results in {result['out']}/sweep.json, "
          f"report.md")
    if best is not None:
        print(f"best: trial {best['number']}, validation {result['objective']} {best['value']:.4f}, {best['params']}"
              f"\ntrain it (test split): kdkit run {result['best_recipe']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`kdkit report RUN ...`: HTML + PNG comparison of run folders."""
    from kdkit.export.gallery import predictions_section
    from kdkit.report import write_report

    path = write_report([Path(p) for p in args.runs], Path(args.out) if args.out else None,
                        sections=[predictions_section])
    print(f"report: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`kdkit export RUN --format F`: the deployed network in a file, verified against PyTorch, and its model card."""
    from kdkit.export import export_run
    from kdkit.export.verify import TOLERANCE

    result = export_run(args.run, args.format, out=args.out, opset=args.opset, dynamic_batch=args.dynamic_batch,
                        checkpoint=args.checkpoint, tolerance=TOLERANCE if args.tolerance is None else args.tolerance)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    latency = result.latency[1]
    print(f"export: {result.path} ({result.format}, {result.metadata['run']['network']})")
    print(f"verified against PyTorch: {result.verification.line()}")
    print(f"latency at batch 1: PyTorch eager {latency['eager']:.3f} ms, {result.format} {latency['export']:.3f} ms "
          "per image (`kdkit bench export RUN` measures more)")
    print(f"model card: {result.card}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`kdkit predict RUN_OR_EXPORT IMAGE_OR_FOLDER ...`: the top-k classes of image files."""
    from kdkit.export.predict import open_predictor, predict, print_predictions

    predictor = open_predictor(args.source, args.checkpoint)
    print_predictions(predictor, predict(predictor, args.images, args.top_k), args.top_k)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation toolkit.",
                                     epilog="--trust-code (anywhere on the line): let recipes import the code they "
                                            "name (model: {arch: package.module:factory}); off by default")
    from kdkit import __version__

    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a teacher or distil a student from a recipe")
    run.add_argument("recipe", help="recipe YAML path or shipped name (kdkit ls recipes)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 (resume=true resumes)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    run.add_argument("--device", help="override train.device (cpu, cuda, cuda:1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser("validate", help="check recipes (and search_space*.yaml files) without training; reports "
                                          "every problem")
    val.add_argument("recipes", nargs="*", help="recipe paths or names, then key=value overrides")
    val.add_argument("--schema", action="store_true", help="print the recipe JSON schema")
    val.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list models, losses, datasets, settings, bridges, methods, tasks, recipes, or a "
                                   "model's taps")
    ls.add_argument("what", choices=["models", "losses", "datasets", "settings", "bridges", "methods", "tasks",
                                     "recipes", "taps"])
    ls.add_argument("name", nargs="?", help="one component to show in full (parameters, defaults, bounds), or the "
                    "model whose taps `ls taps` lists")
    ls.add_argument("--dataset", default="cifar100", help="input shape for `ls taps` (default cifar100)")
    ls.set_defaults(fn=cmd_ls)

    demo = sub.add_parser("demo", help="the main job: teacher, student without and with KD, table and report")
    demo.add_argument("--data", default="auto", choices=["auto", "fashion_mnist", "digits"],
                      help="auto: Fashion-MNIST if its files are found, else scikit-learn digits (it says which)")
    demo.add_argument("--data-dir", help="folder with the Fashion-MNIST idx files")
    demo.add_argument("--seeds", type=int, default=3, help="student seeds per method (default 3)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a tiny budget, for smoke tests")
    demo.add_argument("--overwrite", action="store_true", help="retrain students even if their runs exist")
    demo.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                      help="precision of every run (default auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs with "
                      "native bf16, fp32 elsewhere; the choice is printed and stored in results.json)")
    demo.add_argument("--jobs", type=int, default=None,
                      help="runs trained at once, each in its own process with cores/jobs threads (default: 2 on a "
                      "CPU with 2 or more cores, where two 1-thread runs beat one 2-thread run; 1 on a GPU)")
    demo.set_defaults(fn=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks: `bench methods` (every method on Fashion-MNIST), "
                           "`bench speed [RECIPE]` (ms per step vs hand-written loops)")
    bench.add_argument("what", choices=["methods", "speed", "export"])
    bench.add_argument("overrides", nargs="*", help="[RECIPE for speed] then key=value recipe overrides; the run "
                       "folder for export")
    bench.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    bench.add_argument("--methods", help="comma-separated recipe names (default: every recipe of the suite)")
    bench.add_argument("--suite", default="fashion_mnist", help="folder of shipped recipes to benchmark: any "
                       "folder of recipes/ holding a teacher.yaml and a student_* baseline (default fashion_mnist; "
                       "a wrong name lists them)")
    bench.add_argument("--out", help="output folder (default runs/bench_methods or runs/bench_speed)")
    bench.add_argument("--quick", action="store_true", help="one epoch per run, for smoke tests")
    bench.add_argument("--rounds", type=int, default=15, help="speed: interleaved blocks per variant (default 15; "
                       "more rounds narrow the median's interval)")
    bench.add_argument("--format", default="onnx", help="export: the format timed against PyTorch eager (default "
                       "onnx)")
    bench.add_argument("--threads", type=int, help="export: CPU threads of both runtimes (default: torch's)")
    bench.set_defaults(fn=cmd_bench)

    cache = sub.add_parser("cache", help="teacher-output cache: `cache build RECIPE` runs the teacher once over "
                           "K stored views per image; `cache info FOLDER`")
    cache.add_argument("what", choices=["build", "info"])
    cache.add_argument("overrides", nargs="*", help="RECIPE then key=value overrides (build), or a cache folder "
                       "(info)")
    cache.add_argument("--overwrite", action="store_true", help="rebuild even if the cache folder exists")
    cache.add_argument("--device", help="device for the teacher (default: the recipe's train.device)")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(fn=cmd_cache)

    sweep = sub.add_parser("sweep", help="tune a recipe's keys with Bayesian optimisation (Optuna), each trial a run "
                           "scored on a validation split; rerun the same command to resume")
    sweep.add_argument("recipe", help="recipe YAML path or shipped name")
    sweep.add_argument("sweep", help="sweep file: the keys to tune, objective, budget, sampler (docs/sweep.md)")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, as for kdkit run")
    sweep.add_argument("--out", help="output folder (default runs/sweep_<recipe name>)")
    sweep.add_argument("--trials", type=int, help="finished trials wanted (replaces the sweep file's `trials`)")
    sweep.add_argument("--sampler", help="tpe, gp or random (replaces the sweep file's `sampler`)")
    sweep.add_argument("--mode", help="plain or boss (replaces the sweep file's `mode`)")
    sweep.set_defaults(fn=cmd_sweep)

    search = sub.add_parser("search", help="find a distiller in a space of the distiller grammar (MCTS as Auto-KD, "
                            "evolution as KD-Zero, random), each candidate a proxy run on a validation split; rerun "
                            "the same command to resume")
    search.add_argument("space", help="SPACE.yaml: base recipe, tap pairs, transforms, distances, weights, terms and "
                        "the search: section (docs/search.md; recipes/fashion_mnist/search_space.yaml)")
    search.add_argument("overrides", nargs="*", help="key=value overrides of the base recipe, as for kdkit run "
                        "(e.g. teacher.checkpoint=runs/teacher teacher.recipe=null)")
    search.add_argument("--strategy", help="mcts (default), evolution or random (replaces search.strategy)")
    search.add_argument("--trials", type=int, help="finished trials wanted (replaces search.trials)")
    search.add_argument("--out", help="output folder (default runs/search_<space file>_<strategy>)")
    search.set_defaults(fn=cmd_search)

    rep = sub.add_parser("report", help="HTML + PNG report comparing run folders")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="output folder (default: report/ next to the first run)")
    rep.set_defaults(fn=cmd_report)

    export = sub.add_parser("export", help="write a finished run's deployed network (onnx, torchscript, safetensors) "
                            "with its preprocessing, verified against PyTorch, and a model card")
    export.add_argument("run", help="a finished run folder")
    export.add_argument("--format", default="onnx", help="onnx (default; pip install 'kdkit[export]'), torchscript "
                        "or safetensors")
    export.add_argument("--out", help="file (with the format's suffix) or folder to write (default RUN/export/)")
    export.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    export.add_argument("--dynamic-batch", action="store_true", help="let the file take any batch size (default: "
                        "one image at a time)")
    export.add_argument("--checkpoint", default="best", help="best (default: the best epoch's) or latest")
    export.add_argument("--tolerance", type=float, help="largest output difference allowed vs PyTorch, relative to "
                        "the largest output (default 1e-4)")
    export.set_defaults(fn=cmd_export)

    pred = sub.add_parser("predict", help="top-k classes of image files, from a run folder or an exported file")
    pred.add_argument("source", help="a finished run folder or a file written by `kdkit export`")
    pred.add_argument("images", nargs="+", help="image files or folders of them")
    pred.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    pred.add_argument("--checkpoint", default="best", help="for a run folder: best (default) or latest")
    pred.set_defaults(fn=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdkit`` command."""
    import torch

    # Flush denormal floats to zero before torch's intra-op worker threads exist: they copy this thread's
    # floating-point mode when they start, and cannot be switched later. Distillation produces denormals
    # (a loss between nearly equal distributions, e.g. a model's per-step outputs vs their mean early in training,
    # back-propagates ~1e-39 gradients through every layer), and on a CPU each costs ~100x a normal
    # float: measured 3.3 s per step of such a loss with them, 0.13 s without. Values below 1.2e-38 are
    # nothing a float32 training step can resolve.
    torch.set_flush_denormal(True)
    argv = list(sys.argv[1:] if argv is None else argv)
    original = list(argv)
    if "--trust-code" in argv:  # a global switch, accepted anywhere on the line
        argv = [a for a in argv if a != "--trust-code"]
        from kdkit.models import TRUST_CODE_ENV

        os.environ[TRUST_CODE_ENV] = "1"
    parser = build_parser()
    # Options may follow key=value overrides (`kdkit run R a=1 --resume b=2`): argparse stops the
    # positional list at the first option, so the overrides after it come back as extras.
    args, extra = parser.parse_known_args(argv)
    strays = [e for e in extra if e.startswith("-") or "=" not in e]
    if strays or (extra and not hasattr(args, "overrides") and not hasattr(args, "recipes")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        target = "overrides" if hasattr(args, "overrides") else "recipes"
        setattr(args, target, [*getattr(args, target), *extra])
    from kdkit.engine import Interrupted

    try:
        return args.fn(args)
    except KdkitError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ExportMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"{exc}\ncontinue with: {resume_command(original)}", file=sys.stderr)
        return 130


def resume_command(argv: list[str]) -> str:
    """The exact command line that continues an interrupted one: the same arguments (overrides and
    ``--trust-code`` included, so it is the same run) with ``--resume`` for ``kdkit run``; other commands
    (``demo``, ``bench``) reuse finished runs and resume the interrupted one when repeated as they were."""
    args = list(argv)
    if args[:1] == ["run"] and "--resume" not in args and "resume=true" not in args:
        args.append("--resume")
    return shlex.join(["kdkit", *args])


if __name__ == "__main__":
    sys.exit(main())
