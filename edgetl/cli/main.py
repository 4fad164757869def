"""The `edgetl` command. Commands parse options, call the library and print; heavy imports (torch,
onnx, openvino) happen inside each command so `edgetl --help` answers at once."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from edgetl.errors import EdgetlError, PeerFailed, TrainingInterrupted

app = typer.Typer(
    name="edgetl",
    help="From a folder of labelled images to a fast, small, self-describing classifier for the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn user errors into one line on stderr and an exit code; Ctrl-C into a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeerFailed as exc:  # rank 0 of a torchrun job printed the reason
            raise typer.Exit(exc.exit_code) from None
        except EdgetlError as exc:
            rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
            typer.echo(f"error{f' (training process {rank})' if rank != '0' else ''}: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except TrainingInterrupted as exc:
            typer.echo(
                f"interrupted: the last completed epoch is saved in {exc.run_dir}; "
                f"continue with `edgetl train --resume {exc.run_dir}`",
                err=True,
            )
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except RuntimeError as exc:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from edgetl.distributed import lost_peer

                if lost_peer(exc):  # another process of a torchrun job died before training started
                    typer.echo(f"error: training process {os.environ.get('RANK', '?')} lost the others: "
                               f"{str(exc).splitlines()[0][:160]}", err=True)  # fmt: skip
                    raise typer.Exit(1) from None
            raise

    return wrapper  # type: ignore[return-value]


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether an option was typed on the command line (not left at its default)."""
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def _teacher_option(runs: list[Path] | None) -> str | tuple[str, ...] | None:
    """--teacher given once is one run; given several times, cross-fitted teachers or an ensemble."""
    if not runs:
        return None
    return str(runs[0]) if len(runs) == 1 else tuple(str(r) for r in runs)


def _print_metrics(title: str, m: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from edgetl.progress import make_console

    table = Table(title=escape(title), show_edge=False)  # titles and cells are markup; names and paths are not
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in m["per_class_accuracy"].items():
        table.add_row(escape(name), "-" if acc is None else f"{acc:.1%}")
    console = make_console()
    console.print(table)
    top5 = f"  top-5 {m['top5']:.2%}" if m.get("top5") is not None else ""
    console.print(f"top-1 [bold]{m['top1']:.2%}[/]{top5}  macro-F1 {m['macro_f1']:.3f}  (n={m['n']})")


FORMAT_HELP = ("onnx, openvino, litert (.tflite; needs the litert extra), executorch (.pte; needs the executorch extra), "
               "or all (onnx and openvino); several comma-separated: all,litert,executorch")

# Options shared by `export --quantize int8` and `quantize`.
CalibSize = Annotated[int, typer.Option(help="Calibration images (see --calib-source)")]
CalibMethod = Annotated[str, typer.Option(help="minmax, percentile or entropy")]
MaxDrop = Annotated[float, typer.Option(help="Accuracy budget: top-1 points int8 may lose on validation "
                                               "(adapted runs: and on target images, expected from fp32's probabilities)")]
Int8Target = Annotated[str, typer.Option(help="portable (correct on every x86/ARM CPU) or vnni (full 8-bit weights, VNNI CPUs only)")]
AllowDataChange = Annotated[bool, typer.Option(help="Use the run's recorded file lists although its data folder changed")]
CalibSource = Annotated[str, typer.Option(help="auto (an adapted run's target images, else the training split), train or target")]


def _no_extra_arguments(ctx: typer.Context, given: list[str | None]) -> None:
    """Refuse extra arguments, saying why when the shell expanded an unquoted shard pattern into file names
    (`train-{000000..000009}.tar` without quotes gives ten arguments): with the quoted pattern to use."""
    if not ctx.args:
        return
    extra = [str(a) for a in ctx.args]
    if all(a.endswith(".tar") for a in extra):
        from edgetl.shards import pattern_for

        names = [str(g) for g in given if g is not None and str(g).endswith(".tar")] + extra
        quoted = " and ".join(f"'{p}'" for p in pattern_for(names))
        raise EdgetlError(f"{len(names)} shard file names were given where one pattern goes: the shell expands a pattern "
                          f"that is not in quotes. Quote it: {quoted}")  # fmt: skip
    raise EdgetlError(f"unexpected extra argument(s): {' '.join(extra)}")


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def train(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Argument(help="ROOT/<class>/<images>, ROOT/{train,val[,test]}/<class>/..., IDX files, "
                                                   "or WebDataset shards 'DIR/train-{000000..000009}.tar'")] = None,
    val_data: Annotated[str | None, typer.Option(help="With shards: the validation shards (default: hold out --val-fraction)")] = None,
    backbone: Annotated[str, typer.Option(help="See `edgetl backbones`")] = "efficientnet_lite0",
    out: Annotated[str | None, typer.Option(help="Run folder (default: models/<data>-<backbone>)")] = None,
    name: Annotated[str | None, typer.Option(help="Run name under models/")] = None,
    epochs_head: Annotated[int, typer.Option(help="Stage 1 epochs (frozen base, new head)")] = 30,
    epochs_finetune: Annotated[int, typer.Option(help="Stage 2 epochs; 0 skips fine-tuning")] = 8,
    recipe: Annotated[str, typer.Option(help="Stage 2: auto (short trials pick a fine-tune, or none), finetune "
                                             "(--unfreeze at --lr-finetune), head (stage 1 only)")] = "auto",
    recipe_candidates: Annotated[str | None, typer.Option(help="--recipe auto's candidates: UNFREEZE@LR\\[/DECAY],... "
                                                               "e.g. 3@1e-4,all@3x/0.7 (default 3@1x,all@1x/0.7,all@3x/0.7)")] = None,
    unfreeze: Annotated[str, typer.Option(help="Top blocks to unfreeze in stage 2, or 'all' (implies --recipe finetune)")] = "3",
    lr_head: Annotated[float, typer.Option(help="Stage 1 learning rate")] = 1e-3,
    lr_finetune: Annotated[float | None, typer.Option(help="Stage 2 learning rate (default: lr-head / 10)")] = None,
    head_lr_scale: Annotated[float, typer.Option(help="Stage 2 head learning rate as a multiple of the blocks' top rate")] = 1.0,
    l2sp: Annotated[float, typer.Option(help="Stage 2 pulls the backbone toward its pretrained weights with this strength "
                                        "(L2-SP, decoupled like AdamW's decay; 10-40 act over an 8-epoch fine-tune) "
                                        "instead of decaying it to zero; 0: off")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Stage 2 batch size")] = 32,
    patience: Annotated[int, typer.Option(help="Stage 2 early stopping: epochs without a better checkpoint than stage 2's best")] = 3,
    patience_head: Annotated[int, typer.Option(help="Stage 1 early stopping: epochs without a better head (0: off)")] = 5,
    min_epochs_finetune: Annotated[int, typer.Option(help="Stage 2 is not stopped early before this many epochs")] = 2,
    teacher: Annotated[list[Path] | None, typer.Option(
        metavar="RUN", help="Distil from this trained run (same labels and normalisation); given several times: "
                            "cross-fitted teachers (--hold-out-fold) or an ensemble (each trained on all images)")] = None,
    distill_alpha: Annotated[float, typer.Option(help="Weight of the teacher's soft labels (1 - alpha on true labels)")] = 0.5,
    distill_temperature: Annotated[float, typer.Option(help="Softmax temperature of distillation")] = 2.0,
    distill_mode: Annotated[str, typer.Option(help="cached: teacher logits of whole images, once; consistent: the teacher "
                                                   "scores each stage-2 crop the student sees (slower)")] = "cached",
    ema_decay: Annotated[float, typer.Option(help="Keep and validate a moving average of the fine-tuned weights (0: off)")] = 0.0,
    mixup: Annotated[float, typer.Option(help="Stage 2 mixup alpha (timm Mixup; 0: off)")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="Stage 2 cutmix alpha (0: off; with --mixup, half the batches each)")] = 0.0,
    erase: Annotated[float, typer.Option(help="Random erasing probability of each augmented training image (0: off)")] = 0.0,
    hidden: Annotated[int, typer.Option(help="Hidden units in the head (0: dropout + linear)")] = 0,
    dropout: Annotated[float, typer.Option(help="Head dropout")] = 0.2,
    label_smoothing: float = 0.1,
    augment: Annotated[str, typer.Option(help="Training augmentation: none, light, trivial")] = "light",
    crop_scale: Annotated[float, typer.Option(help="Smallest area fraction of the random crop (0.35; 0.7-1 for centred images)")] = 0.35,
    crop_source: Annotated[str, typer.Option(help="Crops from the eval-size image (resized) or from larger (full)")] = "resized",
    cache_features: Annotated[bool, typer.Option(help="Stage 1 on cached features of the frozen base")] = True,
    cache_views: Annotated[int, typer.Option(help="Cache K views per image (1 plain + K-1 augmented)")] = 1,
    balance: Annotated[bool, typer.Option(help="Class-weighted loss for imbalanced data")] = False,
    input_size: Annotated[int | None, typer.Option(help="Input size (default: the backbone's)")] = None,
    val_fraction: Annotated[float, typer.Option(help="Held out for validation when DATA has no val/ folder")] = 0.2,
    limit_train: Annotated[int | None, typer.Option(help="Use a seeded, stratified subset of N training images")] = None,
    limit_val: Annotated[int | None, typer.Option(help="Use a seeded, stratified subset of N validation images")] = None,
    hold_out_fold: Annotated[str | None, typer.Option(help="K/N: train without fold K of N of the training images "
                                                           "(cross-fitted teachers, one run per fold)")] = None,
    strict: Annotated[bool, typer.Option(help="Unreadable images are an error instead of skipped")] = False,
    weights: Annotated[Path | None, typer.Option(help="ImageNet weights file (state dict or .safetensors)")] = None,
    pretrained: Annotated[bool, typer.Option(help="--no-pretrained trains from random weights")] = True,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (CUDA) autocast for training steps")] = "auto",
    channels_last: bool = True,
    compile: Annotated[bool, typer.Option(help="Stage 2 through torch.compile: ~1.2x faster steps on CPU after about a minute "
                                               "of compiling per recipe tried (needs a C++ compiler)")] = False,
    workers: Annotated[int | None, typer.Option(help="Data-loading workers (default: 0 on 2 cores)")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder (or extend one with --epochs-finetune)")] = None,
    allow_data_change: Annotated[bool, typer.Option(help="With --resume: use the recorded file lists although the data changed")] = False,
    keep_feature_cache: Annotated[bool, typer.Option(help="Keep the memory-mapped feature cache in the run folder after training")] = False,
    nproc_per_node: Annotated[int, typer.Option(help="Train in N processes on this machine (torch.distributed; see README)")] = 1,
) -> None:
    """Train a classifier: frozen ImageNet backbone + new head, then fine-tune the top blocks."""
    from edgetl.config import TrainConfig  # light: torch is imported once the options are known to be good

    # Every option is checked here, before --nproc-per-node starts any process: a bad one is one line,
    # not one line per process after each has imported torch.
    _no_extra_arguments(ctx, [data, val_data])
    cfg = None
    if resume is not None:
        # A resumed run keeps the options it was started with; an option given here would be silently
        # ignored, so it is refused instead. Only what a resume can honour is allowed.
        allowed = {"resume", "epochs_finetune", "allow_data_change", "keep_feature_cache", "nproc_per_node"}
        given = [name for name in ctx.params if name not in allowed and _given(ctx, name)]
        if given:
            flags = ", ".join("DATA" if n == "data" else "--" + n.replace("_", "-") for n in given)
            raise EdgetlError(f"--resume continues a run with its recorded options: {flags} cannot be changed (only "
                              "--epochs-finetune, --allow-data-change, --keep-feature-cache and --nproc-per-node go with --resume)")
    else:
        if allow_data_change:
            raise EdgetlError("--allow-data-change goes with --resume (a new run records the data as it is)")
        if data is None:
            raise EdgetlError("missing DATA: the folder of labelled images to train on (or --resume RUN)")
        if recipe == "auto" and not _given(ctx, "recipe") and (_given(ctx, "unfreeze") or _given(ctx, "lr_finetune")):
            recipe = "finetune"  # an explicit fine-tune setting is a fixed recipe, not one candidate among others
        cfg = TrainConfig(
            backbone=backbone, input_size=input_size, epochs_head=epochs_head, lr_head=lr_head,
            cache_features=cache_features, cache_views=cache_views, hidden=hidden, dropout=dropout,
            epochs_finetune=epochs_finetune, lr_finetune=lr_finetune, unfreeze=unfreeze, batch_size=batch_size,
            patience=patience, patience_head=patience_head, min_epochs_finetune=min_epochs_finetune, recipe=recipe,
            recipe_candidates=recipe_candidates, head_lr_scale=head_lr_scale, l2sp=l2sp, teacher=_teacher_option(teacher),
            distill_alpha=distill_alpha, distill_temperature=distill_temperature, distill_mode=distill_mode, ema_decay=ema_decay,
            mixup=mixup, cutmix=cutmix, erase=erase,
            label_smoothing=label_smoothing, augment=augment, crop_scale=crop_scale,
            crop_source=crop_source,
            balance=balance, seed=seed,
            device=device, precision=precision, channels_last=channels_last, compile=compile, workers=workers,
            val_fraction=val_fraction, limit_train=limit_train, limit_val=limit_val, hold_out_fold=hold_out_fold, strict=strict,
            pretrained=pretrained, weights=str(weights) if weights else None,
        )  # fmt: skip
    from edgetl.launch import launched_by_torchrun

    if nproc_per_node != 1 and not launched_by_torchrun():
        from edgetl.launch import check_before_launch, launch_local, strip_option

        check_before_launch(cfg if cfg is not None else resume, nproc_per_node)
        code = launch_local(nproc_per_node, strip_option(sys.argv[1:], "--nproc-per-node"))
        if code:
            raise typer.Exit(code)
        return
    from edgetl.train import resume as resume_run
    from edgetl.train import train as train_run

    if resume is not None:
        extend = epochs_finetune if _given(ctx, "epochs_finetune") else None
        result = resume_run(resume, epochs_finetune=extend, allow_data_change=allow_data_change, keep_feature_cache=keep_feature_cache)
    else:
        assert cfg is not None and data is not None
        result = train_run(data, cfg, out=out, name=name, keep_feature_cache=keep_feature_cache, val_data=val_data)
    if "best" in result.metrics:
        _print_metrics(f"validation, best checkpoint of {result.run_dir}", result.metrics["best"])


@app.command()
@user_errors
def shards(
    source: Annotated[Path, typer.Argument(help="Image folder: ROOT/<class>/... or ROOT/{train,val[,test]}/<class>/...")],
    out: Annotated[Path, typer.Argument(help="Folder for the shards (OUT/<split>-NNNNNN.tar and classes.txt)")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard")] = 1000,
) -> None:
    """Write an image folder as WebDataset tar shards (image bytes as they are, a `cls` index per
    sample, classes.txt), for `edgetl train 'OUT/train-{000000..N}.tar'`."""
    from edgetl.shards import write_shards

    summary = write_shards(source, out, shard_size)
    for split, info in summary["splits"].items():
        typer.echo(f"{split}: {info['samples']} samples -> '{info['pattern']}'")
    typer.echo(f"{len(summary['classes'])} classes -> {out / 'classes.txt'}")
    patterns = {split: info["pattern"] for split, info in summary["splits"].items()}
    if "train" in patterns:  # the command to train on them, with the patterns in quotes (a shell expands them otherwise)
        val = f" --val-data '{patterns['val']}'" if "val" in patterns else ""
        typer.echo(f"train on them: edgetl train '{patterns['train']}'{val}")


@app.command("eval", context_settings={"allow_extra_args": True})
@user_errors
def eval_cmd(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="Run folder (or checkpoint file)")],
    data: Annotated[Path, typer.Argument(help="Labelled image folder, dataset root with splits, or shard pattern (test-{0..9}.tar)")],
    split: Annotated[str | None, typer.Option(help="For datasets with split folders: train, val or test (default: test, else val)")] = None,
    device: str = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this JSON file")] = None,
) -> None:
    """Score a trained checkpoint on labelled images: every image of a folder of class folders, or the
    test (else validation) folder of a dataset. Top-1, top-5, per-class accuracy, macro-F1."""
    from edgetl.evaluate import evaluate
    from edgetl.fileio import write_json

    _no_extra_arguments(ctx, [str(data)])
    if json_out is not None and json_out.is_dir():
        raise EdgetlError(f"--json {json_out} is a folder: give a file name, e.g. {json_out / 'eval.json'}")
    m = evaluate(run, data, split=split, device=device)
    _print_metrics(f"{m['data']}", m)
    if json_out:
        try:
            write_json(json_out, m)
        except OSError as exc:
            raise EdgetlError(f"cannot write --json {json_out}: {exc.strerror or exc}") from None


@app.command()
@user_errors
def backbones() -> None:
    """List the backbones: parameters, MACs, input size, and whether ImageNet weights are here."""
    from rich.table import Table

    from edgetl.backbones import find_weights, list_backbones, preprocess_spec
    from edgetl.profile import count_macs_and_params
    from edgetl.progress import make_console

    table = Table(show_edge=False)
    for col in ("name", "timm model", "params", "MACs", "input", "weights here"):
        table.add_column(col, justify="right" if col in ("params", "MACs", "input") else "left")
    for e in list_backbones():
        spec = preprocess_spec(e.name)
        macs, params = count_macs_and_params(e.name, spec.input_size)
        found = find_weights(e.name)
        table.add_row(
            e.name, e.timm_id, f"{params / 1e6:.2f}M", f"{macs / 1e6:.0f}M", f"{spec.input_size}",
            f"yes ({found[0]})" if found else "no: --weights FILE",
        )  # fmt: skip
    make_console().print(table)


@app.command()
@user_errors
def demo(
    out: Annotated[str | None, typer.Option(help="Run folder (default: models/demo-...)")] = None,
    epochs_finetune: Annotated[int, typer.Option(help="Stage 2 epochs")] = 3,
    min_time: Annotated[float, typer.Option(help="Seconds of timed runs per variant in the bench table")] = 2.0,
) -> None:
    """Train the default backbone on the bundled clothing sample, export it (ONNX, OpenVINO, int8)
    and print the accuracy x latency x size table."""
    from edgetl.bench.runner import BenchOptions
    from edgetl.bench.runner import bench as run_bench
    from edgetl.config import TrainConfig
    from edgetl.export import ExportOptions, export_run
    from edgetl.quantize import QuantizeOptions, quantize_run
    from edgetl.report import print_bench_table, print_export_report, print_quantize_report
    from edgetl.sample import sample_path
    from edgetl.train import train as train_run

    data = sample_path()
    cfg = TrainConfig(epochs_finetune=epochs_finetune, patience=0)
    result = train_run(data, cfg, out=out, name="demo-clothing-efficientnet_lite0")
    _print_metrics(f"demo: validation split of the bundled sample, {result.run_dir}", result.metrics["best"])
    print_export_report(export_run(result.run_dir, ExportOptions(embed_preprocess=True)))
    # The sample's validation split is small (100 images): the budget is 2 points, i.e. 2 images.
    print_quantize_report(quantize_run(result.run_dir, QuantizeOptions(max_drop=2.0, latency_runs=100)))
    print_bench_table(run_bench([result.run_dir], BenchOptions(min_time=min_time, batches=(1, 8))))


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (or checkpoint file)")],
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "all",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 18,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size")] = "dynamic",
    embed_preprocess: Annotated[bool, typer.Option(help="Also write model.uint8.onnx: uint8 NHWC pixels in")] = False,
    fp16: Annotated[bool, typer.Option(help="Also write an fp16-compressed OpenVINO IR")] = False,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the run folder)")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing exported files")] = False,
    data: Annotated[Path | None, typer.Option(help="Labelled images for the parity check (default: the run's val split)")] = None,
    parity_samples: Annotated[int, typer.Option(help="Images for the parity check (seeded sample)")] = 300,
    quantize: Annotated[str | None, typer.Option(help="int8: also write static int8 models (see `edgetl quantize`)")] = None,
    calib_size: CalibSize = 300,
    calib_method: CalibMethod = "minmax",
    max_drop: MaxDrop = 1.0,
    int8_target: Int8Target = "portable",
    calib_source: CalibSource = "auto",
    allow_data_change: AllowDataChange = False,
) -> None:
    """Export the best checkpoint to ONNX and OpenVINO (and LiteRT / ExecuTorch when asked), with labels and
    preprocessing inside, and check each file in its own runtime against the PyTorch model on real images
    (fails on disagreement)."""
    from edgetl.export import ExportOptions, export_run
    from edgetl.report import print_export_report

    opts = ExportOptions(format=format, opset=opset, batch=batch, embed_preprocess=embed_preprocess, fp16=fp16,
                         out=str(out) if out else None, force=force, data=str(data) if data else None,
                         parity_samples=parity_samples, allow_data_change=allow_data_change)  # fmt: skip
    if quantize not in (None, "int8"):
        raise EdgetlError(f"--quantize supports int8, got {quantize!r}")
    if quantize is not None:
        from edgetl.quantize import QuantizeOptions

        qopts = QuantizeOptions(format=format, calib_size=calib_size, calib_method=calib_method, max_drop=max_drop,
                                int8_target=int8_target, allow_data_change=allow_data_change, calib_source=calib_source)  # fmt: skip
    print_export_report(export_run(run, opts))
    if quantize is not None:
        # The models just written: in --out when given (that folder's export.json names the run).
        _quantize(out if out is not None else run, qopts)


def _quantize(run: Path, qopts: Any) -> None:
    from edgetl.quantize import quantize_run
    from edgetl.report import print_quantize_report

    print_quantize_report(quantize_run(run, qopts))


@app.command("quantize")
@user_errors
def quantize_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder, or an `export --out` folder, with exported models")],
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "all",
    calib_size: CalibSize = 300,
    calib_method: CalibMethod = "minmax",
    max_drop: MaxDrop = 1.0,
    int8_target: Int8Target = "portable",
    calib_source: CalibSource = "auto",
    allow_data_change: AllowDataChange = False,
) -> None:
    """Static int8 versions of a run's exported models, within an accuracy budget, with a speed check."""
    from edgetl.quantize import QuantizeOptions

    _quantize(run, QuantizeOptions(format=format, calib_size=calib_size, calib_method=calib_method, max_drop=max_drop,
                                   int8_target=int8_target, allow_data_change=allow_data_change, calib_source=calib_source))  # fmt: skip


@app.command()
@user_errors
def predict(
    model: Annotated[Path, typer.Argument(help="An exported edgetl model: .onnx, or .tflite (with the litert extra)")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders")],
    top_k: Annotated[int, typer.Option(help="How many labels to show per image")] = 3,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table")] = False,
    batch: Annotated[int, typer.Option(help="Images per inference call")] = 16,
) -> None:
    """Classify images with an exported model (onnxruntime + numpy only). Unreadable images are
    reported per file; the exit code is 1 if any failed."""
    import json

    from edgetl.data import image_files
    from edgetl.preprocess import IMAGE_EXTENSIONS
    from edgetl.runtime import Classifier

    if batch < 1:
        raise EdgetlError(f"--batch must be at least 1, got {batch}")
    if top_k < 1:
        raise EdgetlError(f"--top-k must be at least 1, got {top_k}")
    if not model.is_file():
        raise EdgetlError(f"model file not found: {model}")
    try:
        clf = Classifier(model)
    except ValueError as exc:
        raise EdgetlError(str(exc)) from None
    files: list[Path] = []
    for p in images:
        if p.is_dir():
            files += image_files(p)  # as training finds them: no hidden files (macOS's ._ copies), no link loops
        else:
            files.append(p)
    if not files:
        raise EdgetlError("no images given (folders are searched for " + ", ".join(IMAGE_EXTENSIONS) + ")")
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch):
        chunk, prepared, ok = files[start : start + batch], [], []
        for f in chunk:
            try:
                prepared.append(clf.prepare(f))
                ok.append(f)
            except Exception as exc:  # one bad file must not stop the rest
                rows.append({"path": str(f), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"})
        if prepared:
            import numpy as np

            for f, pred in zip(ok, clf.predict_prepared(np.stack(prepared), top_k), strict=True):
                rows.append({"path": str(f), **pred.to_dict()})
    failed = [r for r in rows if "error" in r]
    if json_lines:
        for r in rows:
            typer.echo(json.dumps(r))
    else:
        from rich.markup import escape
        from rich.table import Table

        from edgetl.progress import make_console

        table = Table(show_edge=False)
        # A path is the row's name: on a narrow terminal it wraps, never ends in "…" (off a terminal the table is as
        # wide as it needs, make_console).
        table.add_column("image", overflow="fold")
        for col in ("label", "probability", "also"):
            table.add_column(col)
        for r in rows:
            if "error" in r:
                table.add_row(escape(r["path"]), "[red]unreadable[/]", "", escape(r["error"]))
            else:
                also = ", ".join(f"{t['label']} {t['probability']:.0%}" for t in r["top_k"][1:])
                table.add_row(escape(r["path"]), escape(r["label"]), f"{r['probability']:.1%}", escape(also))
        make_console(fit=table).print(table)
    if failed:
        typer.echo(f"{len(failed)} of {len(rows)} image(s) could not be read", err=True)
        raise typer.Exit(1)


def _floats(text: str | None, n: int, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EdgetlError(f"{name} takes {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise EdgetlError(f"{name} takes {n} comma-separated numbers, got {text!r}")
    return values


@app.command()
@user_errors
def adapt(
    run: Annotated[Path, typer.Argument(help="Trained run folder")],
    target: Annotated[Path, typer.Argument(help="Unlabelled images of the deployment domain (flat or in subfolders; labels ignored)")],
    method: Annotated[str, typer.Option(help="adabn (BatchNorm statistics), tent (+ entropy minimisation), im (+ SHOT's "
                                             "information maximisation), shot (+ SHOT's centroid pseudo-labels), "
                                             "bn-replace (literal AdaBN, for comparison)")] = "shot",
    out: Annotated[Path | None, typer.Option(help="New run folder (default: RUN-METHOD beside the run)")] = None,
    labelled: Annotated[Path | None, typer.Option(help="Labelled target images (class folders): fine-tune on them after adapting")] = None,
    evaluate: Annotated[Path | None, typer.Option(help="Labelled target images (class folders) to score before and after "
                                                       "(never adapted on)")] = None,
    batch_size: Annotated[int, typer.Option(help="Target images per batch (>= 16)")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate of tent, im, shot and the labelled fine-tune")] = 1e-3,
    epochs: Annotated[int, typer.Option(help="Passes over the target images (tent, im, shot)")] = 1,
    train: Annotated[str, typer.Option(help="What tent, im and shot learn: affine (BatchNorm scale and shift) or extractor "
                                            "(the whole feature extractor, head frozen, as in SHOT)")] = "affine",
    bn_depth: Annotated[float, typer.Option(help="Share of BatchNorm layers, from the input, whose statistics are aligned")] = 0.5,
    reliable_entropy: Annotated[float, typer.Option(help="tent/im/shot: entropy loss only on images below this share of "
                                                         "ln(classes) (EATA: 0.4; 0: all images)")] = 0.0,
    pseudo_flip: Annotated[bool, typer.Option(help="shot: pseudo-labels from each image and its mirror image together")] = False,
    labelled_steps: Annotated[int, typer.Option(help="Steps of the labelled fine-tune")] = 100,
    source_images: Annotated[int, typer.Option(help="Training images the source statistics are measured on")] = 512,
    gate: Annotated[float, typer.Option(help="Adapt only when the target images' feature shift exceeds that of same-size sets "
                                             "of validation images by at least this many times the in-domain shift "
                                             "(0: always adapt)")] = 2.8,
    seed: int = 0,
    device: str = "auto",
    allow_shape_change: Annotated[bool, typer.Option(help="Adapt although the target images' colour or size differ from training")] = False,
    allow_data_change: AllowDataChange = False,
) -> None:
    """Adapt a trained run to unlabelled images of the domain it is deployed in (another camera, light,
    blur, compression) and write a new run folder that export, quantize, bench and eval take like any run:
    its checkpoint, the target images used, a shift report (metrics.json, shift.png) and its lineage."""
    from edgetl.adapt import AdaptOptions, adapt_run

    opts = AdaptOptions(method=method, out=str(out) if out else None, labelled=str(labelled) if labelled else None,
                        evaluate=str(evaluate) if evaluate else None, batch_size=batch_size, lr=lr, epochs=epochs,
                        train=train, bn_depth=bn_depth, reliable_entropy=reliable_entropy, pseudo_flip=pseudo_flip,
                        labelled_steps=labelled_steps,
                        source_images=source_images, gate=gate,
                        seed=seed, device=device, allow_shape_change=allow_shape_change, allow_data_change=allow_data_change)  # fmt: skip
    _print_shift(adapt_run(run, target, opts))


def _print_shift(m: dict[str, Any]) -> None:
    from rich.table import Table

    from edgetl.progress import make_console

    shift = m["shift"]
    done = m["adaptation"]["method"] if m["adaptation"]["adapted"] else "not adapted (shift gate)"
    table = Table(title=f"{done} on {shift['after']['images']} target images", show_edge=False)
    for col in ("", "before", "after"):
        table.add_column(col, justify="right" if col else "left")
    rows = [(f"feature shift (in-domain {shift['in_domain_feature_shift']:.3f})", "feature_shift", "{:.3f}"),
            ("mean confidence", "mean_confidence", "{:.2f}"), ("predicted classes vs prior (TV)", "prior_distance", "{:.2f}")]  # fmt: skip
    for name, key, fmt in rows:
        table.add_row(name, fmt.format(shift["before"][key]), fmt.format(shift["after"][key]))
    if "top1" in shift["before"]:
        table.add_row("top-1 on --evaluate images", f"{shift['before']['top1']:.1%}", f"{shift['after']['top1']:.1%}")
    sv = m["source_val"]
    table.add_row("top-1 on the run's validation split", f"{sv['before_top1']:.1%}", f"{sv['after_top1']:.1%}")
    console = make_console()
    console.print(table)
    kind = "adapted run" if m["adaptation"]["adapted"] else "new run (the model as trained)"
    console.print(f"{kind}: {m['run_dir']} (shift report: {m['run_dir']}/shift.png)", markup=False)


@app.command()
@user_errors
def bench(
    paths: Annotated[list[Path], typer.Argument(help="Run folders (all their models) and/or model files")],
    data: Annotated[Path | None, typer.Option(help="Labelled images for accuracy (default: the run's validation split)")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated targets (default: every available one)")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes: latency at 1, throughput at the others")] = "1,8,32",
    threads: Annotated[int | None, typer.Option(help="Threads per runtime (default: physical cores)")] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up runs before timing")] = 10,
    min_time: Annotated[float, typer.Option(help="Seconds of timed batch-1 runs per variant")] = 10.0,
    out: Annotated[Path | None, typer.Option(help="Folder for bench.json/csv/md/png (default: the run folder)")] = None,
    input_size: Annotated[int | None, typer.Option(help="For models without edgetl metadata")] = None,
    mean: Annotated[str | None, typer.Option(help="For models without edgetl metadata: r,g,b")] = None,
    std: Annotated[str | None, typer.Option(help="For models without edgetl metadata: r,g,b")] = None,
    isolation: Annotated[str, typer.Option(help="process: each variant in its own worker (default); in-process: all in one")] = "process",
    check_reference: Annotated[bool, typer.Option(help="Also time ONNX Runtime and OpenVINO rows with their own tools")] = False,
    allow_data_change: AllowDataChange = False,
) -> None:
    """One table of accuracy x latency x size for every model, precision and target. Each variant runs
    in a worker process of its own, so no runtime's idle threads slow another's numbers."""
    from edgetl.bench.runner import BenchOptions
    from edgetl.bench.runner import bench as run_bench
    from edgetl.report import print_bench_table

    batches = _floats(batch, len(batch.split(",")), "--batch")
    assert batches is not None
    if any(b < 1 or b != int(b) for b in batches):
        raise EdgetlError(f"--batch takes positive whole numbers, got {batch!r}")
    opts = BenchOptions(
        data=str(data) if data else None, targets=tuple(t.strip() for t in targets.split(",")) if targets else None,
        batches=tuple(int(b) for b in batches), threads=threads, warmup=warmup, min_time=min_time, out=str(out) if out else None,
        input_size=input_size, mean=_floats(mean, 3, "--mean"), std=_floats(std, 3, "--std"),  # type: ignore[arg-type]
        isolation=isolation, check_reference=check_reference, allow_data_change=allow_data_change,
    )  # fmt: skip
    print_bench_table(run_bench(paths, opts))


@app.command()
@user_errors
def tune(
    data: Annotated[Path, typer.Argument(help="Image folder (class sub-folders or train/val/test), as for train")],
    max_latency_ms: Annotated[float, typer.Option(help="Batch-1 p50 budget on this machine, in milliseconds")],
    max_size_mb: Annotated[float | None, typer.Option(help="Model file size budget, in MB")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated runtime targets to measure")] = "ort-cpu,openvino-cpu",
    backbones: Annotated[str | None, typer.Option(help="Comma-separated backbones (default: every one with weights here)")] = None,
    sizes: Annotated[str | None, typer.Option(help="Comma-separated input sizes (default: per backbone, 160 px to its own)")] = None,
    precisions: Annotated[str, typer.Option(help="Comma-separated: fp32, bf16 (CPUs with bf16), int8")] = "fp32,bf16,int8",
    out: Annotated[Path | None, typer.Option(help="Tune folder (default: models/tune-DATA)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every probe and of the final run")] = 0,
    min_time: Annotated[float, typer.Option(help="Seconds of timed batch-1 runs per variant")] = 4.0,
    pretrained: Annotated[bool, typer.Option(help="ImageNet weights (--no-pretrained: from scratch)")] = True,
    final: Annotated[bool, typer.Option(help="Train, export and bench the pick in full")] = True,
    dry_run: Annotated[bool, typer.Option(help="Show the candidates and the estimated time; run nothing")] = False,
) -> None:
    """The most accurate model within a latency (and size) budget: stage-1 probes of backbones x input
    sizes, each exported, quantized and benchmarked here; then the pick trained in full."""
    from rich.console import Console
    from rich.table import Table

    from edgetl.tune import TuneOptions
    from edgetl.tune import tune as run_tune

    def items(text: str | None) -> tuple[str, ...] | None:
        return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None

    size_items = items(sizes)
    if size_items and not all(s.isdigit() for s in size_items):
        raise EdgetlError(f"--sizes takes whole numbers of pixels, got {sizes!r}")
    opts = TuneOptions(
        max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, targets=items(targets) or (), backbones=items(backbones),
        sizes=tuple(int(s) for s in size_items) if size_items else None, precisions=items(precisions) or (),
        out=str(out) if out else None, seed=seed, min_time=min_time, pretrained=pretrained, final=final, dry_run=dry_run,
    )  # fmt: skip
    report = run_tune(data, opts)
    console = Console()
    if report.get("dry_run"):
        table = Table(title=f"edgetl tune --dry-run: {report['images']} images, "
                            f"{report['candidates_per_probe']} latency candidates per probe (precision x runtime)")
        for col in ("backbone", "size", "MMACs", "est. minutes"):
            table.add_column(col)
        for p in report["probes"]:
            table.add_row(p["backbone"], str(p["size"]), f"{p['macs'] / 1e6:.0f}", f"{p['estimated_seconds'] / 60:.1f}")
        console.print(table)
        for s in report["skipped"]:
            console.print(f"left out {s['backbone']}: {s['reason']}", markup=False)
        console.print(f"estimated: {report['estimated_seconds'] / 60:.0f} min for the probes (the final training is extra)")
        return
    console.print(Path(report["files"]["markdown"]).read_text(), markup=False)


def _one_line_summaries() -> None:
    """Each command's summary in `edgetl --help` is its docstring's first paragraph. Typer's rich help keeps
    that paragraph's line breaks in the command list (it joins them only on the command's own page), so a
    summary wrapped in the source printed as broken lines; joined here into one line that rich wraps."""
    import inspect

    for info in app.registered_commands:
        if info.short_help is None and info.callback is not None:
            first = inspect.cleandoc(info.callback.__doc__ or "").split("\n\n")[0]
            info.short_help = " ".join(first.split())


_one_line_summaries()


def run() -> None:
    from edgetl.malloc_tuning import tune_malloc

    tune_malloc()  # before torch allocates anything: see the module for the measurement
    app()


if __name__ == "__main__":
    sys.exit(run())
