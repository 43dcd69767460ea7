"""Robust protection search at CPU scale: candidates of ``--method sep-robust`` against the appropriator's trainings.

    python bench/source_cpu.py                       # first: the K=6 checkpoints in bench/runs/source-cpu
    python bench/robust_protection.py [--candidates NAME ...] [--defenses none jpeg ...]

Each candidate is a set of ``recipes/protect.py --method sep-robust`` flags, crafted on the first
10,000 CIFAR-10 training images at 8/255 (the protection matrix's protocol), and its victims are
the matrix's columns (``protection_matrix.COLUMNS``, same folders and resume: finished crafting and
victims are reused). Per candidate the JSON has ``name``, ``floor`` (highest clean test accuracy
over the measured trainings), ``floor_defense``, ``held_out_floor`` (over the trainings the crafting
never saw), ``standard_accuracy``, ``mean_psnr``, ``crafting_seconds`` and the ``flags``. SEP-FA-VR
and CUDA come from bench/results/protection_matrix.json as reference points.

Screening runs ``--defenses`` on every candidate (the cheap columns by default; AT and RSE take
~11 minutes each), then the finalists get every column. Writes
bench/results/robust_protection.{json,md,png}.
"""

import argparse
import json
import sys
import time

import common
import protection_matrix as matrix
import sep_effectiveness
from common import SHARED_CIFAR10, markdown_table, read_json, write_results

NAME = "robust_protection"
# name -> sep-robust flags (the candidates before the grating say grating_amplitude 0: it is on by default
# since eot-grating10 was promoted; 12/255 since eot-grating12 was). Every candidate runs SEP-FA (T=10 steps of 2/255, K=6: 60 gradient
# evaluations per image, the cpu preset) unless its flags say otherwise. ``source_defense``: the
# checkpoints come from a source run trained through that victim defense (idea 2: a robust
# self-ensemble; ``train_source.py --preset cpu --defense D``, in RUNS_DIR/source-cpu-D).
VIEWS = "jpeg,grayscale,blur,noise,augment"
CANDIDATES = {
    "plain": {"craft_transforms": "none", "grating_amplitude": 0},
    "eot": {"craft_transforms": "jpeg,grayscale,blur,noise,augment", "grating_amplitude": 0},
    "luma-block2": {"craft_transforms": "none", "perturbation_block": 2, "shared_channels": True, "grating_amplitude": 0},
    "eot-luma-block2": {"craft_transforms": "jpeg,grayscale,blur,noise,augment", "perturbation_block": 2,
                        "shared_channels": True, "grating_amplitude": 0},
    "eot-luma": {"craft_transforms": "jpeg,grayscale,blur,noise,augment", "shared_channels": True, "grating_amplitude": 0},
    "eot-block4": {"craft_transforms": "jpeg,grayscale,blur,noise,augment", "perturbation_block": 4, "grating_amplitude": 0},
    "eot-jpeg-luma-block2": {"craft_transforms": "jpeg", "perturbation_block": 2, "shared_channels": True, "grating_amplitude": 0},
    "at-source-eot-luma-block2": {"source_defense": "at", "craft_transforms": VIEWS, "perturbation_block": 2,
                                  "shared_channels": True, "grating_amplitude": 0},
    "jpeg-source-eot-luma-block2": {"source_defense": "jpeg", "craft_transforms": VIEWS, "perturbation_block": 2,
                                    "shared_channels": True, "grating_amplitude": 0},
    "at-source": {"source_defense": "at", "craft_transforms": "none", "grating_amplitude": 0},
    "at-source-eot": {"source_defense": "at", "craft_transforms": VIEWS, "grating_amplitude": 0},
    # idea 4: a model-free class-wise component (+-pattern on 4x4 blocks, every channel) and SEP in the rest
    "classwise": {"craft_transforms": "none", "classwise_share": 1.0, "grating_amplitude": 0},
    "classwise-half": {"craft_transforms": "none", "classwise_share": 0.5, "grating_amplitude": 0},
    "classwise-half-eot": {"craft_transforms": VIEWS, "classwise_share": 0.5, "grating_amplitude": 0},
    # 8x8 blocks line up with JPEG's blocks: the pattern lives in the luma DC coefficients, which JPEG-10
    # quantizes in steps of 80 (DCT units) against the pattern's +-64, so it survives as a dither. Measured:
    # not even learned under standard training (0.7475), too weak against the images' own low frequencies
    "classwise-b8": {"craft_transforms": "none", "classwise_share": 1.0, "classwise_block": 8, "grating_amplitude": 0},
    "classwise-b8-half": {"craft_transforms": "none", "classwise_share": 0.5, "classwise_block": 8, "grating_amplitude": 0},
    # round 2, JPEG's own grid: eot, then each 8x8 block's luma DC level at quality 10 pushed to the side the
    # loss descends (bench/jpeg_grid.py measured the premise); jpeg8 / jpeg15 test an appropriator's other quality
    "eot-jpeg-grid": {"craft_transforms": VIEWS, "jpeg_grid_quality": 10, "grating_amplitude": 0},
    # round 2, a component AT cannot cancel: eot, then a class-wise luma grating of 10/255 (periods 8-16 px,
    # random phase; sep_hf.gratings) beyond the budget; its adaptive column is --defense notch
    "eot-grating10": {"craft_transforms": VIEWS, "grating_amplitude": 10},
    "eot-grating12": {"craft_transforms": VIEWS, "grating_amplitude": 12},  # 28.1 dB: the most the goal's PSNR allows
}
# JPEG at the qualities around the one a grid candidate is crafted for (not matrix columns: only this search uses them)
EXTRA_COLUMNS = {"jpeg8": ("jpeg", {"jpeg_quality": 8}), "jpeg15": ("jpeg", {"jpeg_quality": 15})}
SCREEN_COLUMNS = ["none", "jpeg", "jpeg50", "grayscale", "bitdepth", "blur", "augment"]
REFERENCES = ("sep-fa-vr", "sep-fa", "cuda")


def source_run(defense: str | None, args) -> tuple[str, dict]:
    """The checkpoints a candidate crafts with: the matrix's source run, or one trained through ``defense``."""
    if not defense:
        return args.checkpoints, {}
    output_dir = matrix.RUNS_DIR / f"source-cpu-{defense}"
    if not (output_dir / "results.json").exists():
        common.launch("train_source.py", ["--dataset", args.dataset, "--preset", "cpu", "--defense", defense,
                                          "--output_dir", output_dir], log=matrix.RUNS_DIR / f"{output_dir.name}.log")
    results = read_json(output_dir / "results.json")
    return str(output_dir), {"source_defense": defense, "source_accuracy": results["clean_test_accuracy"],
                             "source_train_seconds": results["train_seconds"]}


def candidate_row(name: str, flags: dict, args) -> tuple[str, dict]:
    flags = dict(flags)
    checkpoints, source = source_run(flags.pop("source_defense", None), args)
    dataset, protection = sep_effectiveness.protect("sep-robust", args.eps, checkpoints, args.dataset,
                                                    flags=flags, name=f"robust-{name}")
    return str(dataset), {**matrix.crafting_record(dataset, protection), **source}


def pareto_png(candidates: list[dict], references: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    for items, marker, colour in ((candidates, "o", "tab:blue"), (references, "s", "tab:red")):
        for item in items:
            if item.get("floor") is None or item.get("mean_psnr") is None:
                continue
            axis.scatter(item["mean_psnr"], item["floor"], marker=marker, color=colour)
            label = item["name"] + ("" if not item.get("missing_defenses") else f" ({len(item['missing_defenses'])} cols missing)")
            axis.annotate(label, (item["mean_psnr"], item["floor"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axhline(0.30, color="grey", linestyle="--", linewidth=1)
    axis.axvline(28, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("mean PSNR of the protected images (dB, higher = less visible)")
    axis.set_ylabel("floor: best appropriator training's test accuracy")
    axis.set_title("sep-robust candidates (blue) vs references (red); target: floor <= 0.30, PSNR >= 28", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def summarize(name: str, row_cells: dict, crafting: dict, clean_cells: dict, defenses: list[str], flags: dict | None) -> dict:
    floor = matrix.floors({"clean": clean_cells, name: row_cells}, {name: crafting}, defenses).get(name, {})
    return {"name": name, "floor": floor.get("floor"), "floor_defense": floor.get("floor_defense"),
            "held_out_floor": floor.get("held_out_floor"), "held_out": floor.get("held_out"),
            "standard_accuracy": row_cells.get("none", {}).get("eval_accuracy"),
            "mean_psnr": crafting.get("mean_psnr"), "crafting_seconds": crafting.get("crafting_seconds"),
            "measured_defenses": floor.get("measured_defenses", []), "missing_defenses": floor.get("missing_defenses", []),
            "defeated_by": floor.get("defeated_by", []), "flags": flags,
            "source": {key: crafting[key] for key in ("source_accuracy", "source_train_seconds") if key in crafting},
            "cells": {d: c["eval_accuracy"] for d, c in row_cells.items() if "eval_accuracy" in c}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help=f"Of {', '.join(CANDIDATES)}.")
    parser.add_argument("--defenses", nargs="+", default=SCREEN_COLUMNS, help="Columns to measure (matrix names).")
    parser.add_argument("--eps", type=float, default=8.0)
    parser.add_argument("--model", default="smallnet_cifar")
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    parser.add_argument("--checkpoints", default=None, help="Source checkpoints (default: RUNS_DIR/source-cpu).")
    parser.add_argument("--runs_dir", default=None, help="Runs folder (default: bench/runs).")
    parser.add_argument("--report_only", action="store_true", help="Craft and train nothing; report finished runs.")
    parser.add_argument("--promote", default=None, metavar="NAME",
                        help="Link candidate NAME's runs as the matrix's sep-robust row (its flags must be sep-robust's "
                             "defaults), then stop: `protection_matrix.py --protections sep-robust` reuses them.")
    args = parser.parse_args()
    for flag in ("max_train_samples", "max_eval_samples", "epochs"):
        setattr(args, flag, None)  # the matrix's protocol, always
    matrix.use_folders(args.runs_dir, None)
    matrix.COLUMNS.update(EXTRA_COLUMNS)
    args.checkpoints = args.checkpoints or str(matrix.RUNS_DIR / "source-cpu")
    unknown = sorted(set(args.candidates) - set(CANDIDATES)) + sorted(set(args.defenses) - set(matrix.columns()))
    if unknown:
        raise SystemExit(f"Unknown candidates or columns {unknown}.")
    if args.promote:
        promote(args.promote, args.eps, args.model)
        return
    all_columns = list(matrix.columns())
    if any("model" in matrix.columns()[column][1] for column in args.defenses) and not args.report_only:
        matrix.serve_backbone()  # the pretrained columns load the bench backbone from the loopback Hub
    previous = read_json(common.RESULTS_DIR / f"{NAME}.json") if (common.RESULTS_DIR / f"{NAME}.json").exists() else {}
    reference_matrix = read_json(common.RESULTS_DIR / "protection_matrix.json")
    clean_cells = reference_matrix["cells"].get("clean", {})

    results = {item["name"]: item for item in previous.get("candidates", []) if item["name"] in CANDIDATES}
    command = "python bench/robust_protection.py " + " ".join(sys.argv[1:])
    failed = False
    for name in args.candidates:
        flags = CANDIDATES[name]
        craft_dir = matrix.RUNS_DIR / f"protect-robust-{name}-eps{args.eps:g}"
        if args.report_only and not (craft_dir / "results.json").exists():
            continue
        dataset, crafting = candidate_row(name, flags, args)
        row_cells = {}
        for column in all_columns:  # finished victims of every column count, measured this time or not
            measure = column in args.defenses and not args.report_only
            start = time.perf_counter()
            try:
                cell = matrix.victim("sep-robust", dataset, args.dataset, column,
                                     argparse.Namespace(**{**vars(args), "report_only": not measure}),
                                     data_name=f"robust-{name}-eps{args.eps:g}")
                if cell is not None:
                    row_cells[column] = cell
            except RuntimeError as err:
                row_cells[column] = {"error": str(err), "wall_seconds": time.perf_counter() - start}
                failed = True
        # Cells recorded earlier whose run folders are gone (another machine, a fresh checkout) are kept
        recorded = results.get(name, {}).get("cells", {})
        row_cells.update({d: {"eval_accuracy": a} for d, a in recorded.items() if "eval_accuracy" not in row_cells.get(d, {})})
        results[name] = summarize(name, row_cells, crafting, clean_cells, all_columns, flags)
        write(results, reference_matrix, all_columns, command)
    write(results, reference_matrix, all_columns, command)
    sys.exit(1 if failed else 0)


def promote(name: str, eps: float, model: str) -> None:
    """Link a finished candidate's crafting and victims under the names the matrix gives the sep-robust row."""
    from dataclasses import asdict

    from sep_hf.protect.methods.robust import RobustArguments

    defaults = {key: value for key, value in asdict(RobustArguments()).items() if key != "robust_base"}
    flags = {**{key: value for key, value in defaults.items()}, **CANDIDATES[name]}
    if "source_defense" in flags or any(str(flags[key]) != str(value) for key, value in defaults.items()):
        raise SystemExit(f"Candidate {name}'s flags {CANDIDATES[name]} are not sep-robust's defaults {defaults}: "
                         "change RobustArguments first.")
    if not (matrix.RUNS_DIR / f"protect-robust-{name}-eps{eps:g}").exists():
        promote_recorded(name, eps)  # measured on an earlier machine: its folders are gone, its figures are not
        return
    links = {matrix.RUNS_DIR / f"protect-sep-robust-eps{eps:g}": matrix.RUNS_DIR / f"protect-robust-{name}-eps{eps:g}"}
    for column in matrix.columns():
        row_dir = matrix.victim_dir("sep-robust", column, eps, model)
        links[row_dir] = matrix.victim_dir("sep-robust", column, eps, model, data_name=f"robust-{name}-eps{eps:g}")
    for link, target in links.items():
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
            print(f"{link.name} -> {target.name}")
    # the README shows the shipped setting's images: clean row, protected row, perturbation row
    grid = matrix.RUNS_DIR / f"protect-robust-{name}-eps{eps:g}" / "dataset" / "sample_grid.png"
    (common.RESULTS_DIR / f"{NAME}_samples.png").write_bytes(grid.read_bytes())


def promote_recorded(name: str, eps: float) -> None:
    """Copy a candidate's recorded cells into protection_matrix.json as the sep-robust row, each cell marked
    with where it comes from; `protection_matrix.py --report_only` then rebuilds the tables and the card's file."""
    recorded = read_json(common.RESULTS_DIR / f"{NAME}.json")
    candidate = next((item for item in recorded["candidates"] if item["name"] == name), None)
    if candidate is None:
        raise SystemExit(f"Candidate {name} has neither run folders nor a record in {NAME}.json: run it first.")
    path = common.RESULTS_DIR / f"{matrix.NAME}.json"
    measured = read_json(path)
    source = f"bench/results/{NAME}.json, candidate {name}"
    machine = recorded["machine"]["cpu"]  # the record keeps one machine: the one that wrote it
    measured["cells"]["sep-robust"] = {column: {"eval_accuracy": accuracy, "promoted_from": source, "machine": machine}
                                       for column, accuracy in candidate["cells"].items()}
    columns = matrix.columns()
    measured["crafting"]["sep-robust"] = {
        "mean_psnr": candidate["mean_psnr"], "crafting_seconds": candidate.get("crafting_seconds"), "eps": eps,
        "crafted_against": sorted({columns[d][0] for d in columns if d not in candidate["held_out"]}),
        "promoted_from": source}
    path.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n")
    print(f"sep-robust row <- {source}; now run: python bench/protection_matrix.py --report_only")


def write(results: dict, reference_matrix: dict, columns: list[str], command: str) -> None:
    references = [summarize(row, reference_matrix["cells"].get(row, {}), reference_matrix["crafting"].get(row, {}),
                            reference_matrix["cells"].get("clean", {}), columns, None) for row in REFERENCES]
    candidates = list(results.values())

    def fmt(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [[item["name"], fmt(item["floor"]), item["floor_defense"] or "-", fmt(item["held_out_floor"]),
             fmt(item["standard_accuracy"]), fmt(item["mean_psnr"], 1),
             fmt(item["crafting_seconds"] / 60 if item.get("crafting_seconds") else None, 1),
             *(fmt(item["cells"].get(d)) for d in columns),
             "; ".join(f"{k}={v}" for k, v in (item["flags"] or {}).items()) or "(reference)"]
            for item in [*candidates, *references]]
    table = markdown_table(["candidate", "floor", "reached by", "held-out floor", "standard", "PSNR dB", "craft min",
                            *columns, "flags"], rows)
    table += ("\n\nfloor: the highest clean test accuracy over the measured columns ('-': not measured; a floor over "
              "fewer columns is a lower bound). Held-out: the columns whose defense the crafting never saw.")
    payload = {"setup": {"protocol": "bench/protection_matrix.py's cpu protocol: 10k train / 2k test CIFAR-10, "
                                     "smallnet_cifar victims, 12 epochs, eps 8/255, K=6 source checkpoints",
                         "columns": {d: {"defense": matrix.columns()[d][0], "flags": matrix.columns()[d][1]} for d in columns}},
               "commands": ["python bench/source_cpu.py", command], "candidates": candidates, "references": references}
    write_results(NAME, payload, table)
    (common.RESULTS_DIR / f"{NAME}.png").write_bytes(pareto_png(candidates, references))


if __name__ == "__main__":
    main()
