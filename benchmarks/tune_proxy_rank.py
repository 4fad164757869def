"""The tune's proxy against fully trained accuracy, adding candidates trained since (issue 18, part 2).

    python benchmarks/train_accuracy.py clothing --set backbone=efficientnet_lite1 --set input_size=240 \\
        --tag lite1-240 --out RUN
    python benchmarks/tune_proxy_rank.py --base tune_clothing_default-training \\
        --add efficientnet_lite1@240=train_accuracy_clothing_lite1-240 --tag default-training-5

`tune_clothing.py --epochs-finetune 0` trains every candidate with edgetl's default training in one go;
a candidate trained later by `train_accuracy.py` (one training, recorded config and test/validation
top-1) joins the base result's candidates here, after its recorded config is checked to be the one
`tune_clothing.py` would have trained it with. The proxy is the base result's: the probe's validation
top-1 (fp32, ONNX Runtime) recorded for every candidate of the tune, trained or not.

One training of a 372-image test split moves by about a point between seeds, as much as the candidates
differ, so a candidate can be given several seeds (`--add efficientnet_lite0@192=RESULT_S1,RESULT_S2`): its
trained accuracy is then the mean over them and the tune's own seed-0 training, each seed counted once.
"""

from __future__ import annotations

import argparse

from common import load_result, save
from tune_clothing import candidate, proxy_rank, training_differences


def probe_top1(rows: list[dict]) -> dict[tuple[str, int], float]:
    """The probe's validation top-1 of every tuned backbone@size: its fp32 ONNX Runtime candidate's top-1."""
    return {(r["backbone"], r["size"]): r["top1"] for r in rows if r["target"] == "ort-cpu" and r["precision"] == "fp32"}


def trained_later(key: tuple[str, int], result: dict, name: str) -> dict:
    """A train_accuracy.py result as a trained candidate, if it trained as tune_clothing.py would have."""
    from edgetl.backbones import preprocess_spec

    if not {"config", "val_best", "test", "train_wall_seconds"} <= result.keys():
        raise SystemExit(f"{name} is not a train_accuracy.py result (no recorded config, validation and test top-1)")
    recorded = result["config"]
    size = preprocess_spec(recorded["backbone"], recorded["input_size"]).input_size
    # The seed may differ (the runs are averaged over seeds); everything else must be the candidate's training.
    differ = training_differences({**recorded, "seed": 0}, size, *key, 0)
    if differ:
        raise SystemExit(f"{name}: not trained as candidate {key[0]}@{key[1]} would be ({'; '.join(differ)})")
    return {"run": result["run_dir"], "val_top1": result["val_best"]["top1"], "test_top1": result["test"]["top1"],
            "train_seconds": result["train_wall_seconds"], "from": name, "seed": recorded.get("seed", 0)}  # fmt: skip


def seed_mean(key_text: str, runs: list[dict]) -> dict:
    """One candidate's trainings at different seeds as one: the mean of their accuracies and training times."""
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"{key_text}: seed(s) given twice ({seeds}, the tune's own training is seed 0): a mean over "
                         "seeds counts each once")  # fmt: skip
    if len(runs) == 1:  # one training: named by its seed unless it is the tune's seed 0
        return runs[0] if seeds == [0] else {**runs[0], "seeds": seeds}
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("val_top1", "test_top1", "train_seconds")}
    return {**mean, "seeds": seeds, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a tune_clothing.py result (name without .json)")
    ap.add_argument("--add", nargs="+", required=True, metavar="BACKBONE@SIZE=RESULT[,RESULT]",
                    help="train_accuracy.py results to add (several: seeds to average)")
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    base = load_result(args.base)
    if base["epochs_finetune"] != 0:
        raise SystemExit(f"{args.base} trained its candidates for {base['epochs_finetune']} epochs, not with the default training")
    proxy = probe_top1(base["candidates"])
    trained = {candidate(k): v for k, v in base["trained"].items()}
    for item in args.add:
        key_text, sep, name = item.partition("=")
        if not sep:
            raise SystemExit(f"--add takes BACKBONE@SIZE=RESULT, got {item!r}")
        key = candidate(key_text)
        if key not in proxy:
            raise SystemExit(f"{key_text} was not a candidate of the tune in {args.base}")
        base_run = [{**trained[key], "seed": 0}] if key in trained else []  # the tune trains its candidates at seed 0
        added = [trained_later(key, load_result(n), n) for n in name.split(",")]
        trained[key] = seed_mean(key_text, base_run + added)
    keys = sorted(k for k in trained if k in proxy)
    rho_test, rho_val, rank_lines = proxy_rank({k: proxy[k] for k in keys}, trained)
    lines = ["# edgetl tune's proxy against default training (seed 0, or the mean over the seeds named)", "",
             f"Base: `{args.base}.md`; added, trained later by `train_accuracy.py`: {', '.join(f'`{a}`' for a in args.add)}.", "",
             *rank_lines]  # fmt: skip
    save(f"tune_clothing_{args.tag}", {"base": args.base, "added": args.add, "spearman_test": rho_test, "spearman_val": rho_val,
                                       "trained": {f"{k[0]}@{k[1]}": trained[k] for k in keys},
                                       "proxy": {f"{k[0]}@{k[1]}": proxy[k] for k in keys}}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
