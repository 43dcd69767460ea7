"""Protection matrix at CPU scale: clean test accuracy of victims for every protection x every training.

    python bench/source_cpu.py              # first: the K=6 checkpoints in bench/runs/source-cpu
    python bench/protection_matrix.py [--protections clean sep-fa-vr sep-fa-vr@eps2 cuda@50% ...] [--defenses none at8-eval ...]

Rows: clean data, every protection registered in ``sep_hf.protect`` (crafted on the first
10,000 CIFAR-10 training images at eps 8/255 with ``recipes/protect.py --preset cpu --splits train``
through bench/sep_effectiveness.py's ``protect``), budget rows ``METHOD@epsN`` (crafted at N/255)
and partial-protection rows ``METHOD@P%`` (only P% of the training rows protected: the victim mixes
in the clean originals with ``--clean_dataset --clean_fraction``). Columns: the appropriator's
trainings, ``COLUMNS`` below (every registered defense at its defaults, plus variants such as
``at8-eval`` and ``jpeg50``). Each cell is ``recipes/train_victim.py --preset cpu --defense D``
(small net, 12 epochs) evaluated on the first 2,000 clean test images.

Per protection the JSON reports the **floor** (the highest accuracy any measured training reaches:
the appropriator keeps the best model), the training that reaches it, the mean PSNR of the
protected images, and which trainings are ``held_out`` (the crafting never saw them; a protection
that crafts through defenses lists them in its results.json ``crafted_against``).

Finished work is reused: crafted datasets, victims whose results.json matches the cell's setup, and
cells already in bench/results/protection_matrix.json whose run folder is gone (kept with the
machine they were measured on). Writes bench/results/protection_matrix.{json,md,png}, rewritten after
every row, and the per-method summary a dataset card would show (bench/results/protection_matrix_card.json).
A bench run never changes what the package's cards say: ``--release`` copies that summary into the
package (sep_hf/publish/measured/protection_matrix_cpu.json), a deliberate step reviewed in its own commit.
"""

import argparse
import atexit
import contextlib
import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import common
import sep_effectiveness
from common import (
    BACKBONE_MODEL,
    BACKBONE_REPO,
    REPO_ROOT,
    RUNS_DIR,
    SHARED_CIFAR10,
    bench_hub,
    launch,
    markdown_table,
    read_json,
    write_results,
)

from sep_hf.data.view import DataArguments
from sep_hf.defenses import get_defense, list_defenses
from sep_hf.protect import get_protection, list_protections
from sep_hf.victim.trainer import VictimTrainingConfig

NAME = "protection_matrix"
REAL_BACKBONE = "hf-hub:timm/tf_efficientnet_lite2.in1k"
CELL_FILE = "bench_cell.json"
CPU_DATA = DataArguments.PRESETS["cpu"]
CPU_EPOCHS = VictimTrainingConfig.PRESETS["cpu"]["epochs"]
CARD_SUMMARY = common.RESULTS_DIR / "protection_matrix_card.json"
RELEASED_FILE = REPO_ROOT / "sep_hf" / "publish" / "measured" / "protection_matrix_cpu.json"
# The appropriator's trainings: column -> (defense, its flags). Every registered defense also gets a
# column at its defaults, so a new defense module appears here without editing this table.
COLUMNS = {
    "none": ("none", {}),
    "at": ("at", {}),  # PGD 4/255, attack in train mode (Madry)
    "at8-eval": ("at", {"at_eps": 8, "at_attack_mode": "eval"}),  # the EM / ISS papers' AT protocol
    "rse": ("rse", {}),
    "jpeg": ("jpeg", {}),  # quality 10 (ISS)
    "jpeg50": ("jpeg", {"jpeg_quality": 50}),
    "grayscale": ("grayscale", {}),
    "bitdepth": ("bitdepth", {}),
    "blur": ("blur", {}),
    "augment": ("augment", {}),
    # The adaptive answer to sep-robust's gratings: the family's frequencies notched, after JPEG-10 in the second
    "notch": ("notch", {}),
    "notch-jpeg": ("notch", {"notch_jpeg_quality": 10}),
    # The real appropriator: ImageNet EfficientNet-Lite2 fine-tuned / probed, cells measured by bench/real_appropriator.py
    # (timm's transforms at its input sizes) and read from its results, never run here (REAL_COLUMNS).
    "pretrained-ft": ("none", {"model": REAL_BACKBONE}),
    "linear-probe": ("none", {"model": REAL_BACKBONE, "linear_probe": True}),
    # A stand-in, kept and labelled as such: a small net the bench pretrained on CIFAR-10 rows outside the protected
    # 10k and on 5 of the 10 classes (bench/pretrained_appropriator.py), loaded from the loopback Hub.
    "standin-ft": ("none", {"model": BACKBONE_MODEL}),  # full fine-tuning, backbone at 0.1 x lr
    "standin-probe": ("none", {"model": BACKBONE_MODEL, "linear_probe": True}),
}
REAL_COLUMNS = ("pretrained-ft", "linear-probe")
# Older matrices named the stand-in's columns as the real ones are named now.
RENAMED_STANDIN = {"pretrained-ft": "standin-ft", "linear-probe": "standin-probe"}
HUB_ENV: dict = {}  # the loopback Hub serving the backbone (main starts it when a column loads a model)
# A victim reaching this share of the clean-data accuracy under the same training "defeats" a protection.
DEFEAT_SHARE = 0.8


def columns() -> dict:
    table = dict(COLUMNS)
    for defense in list_defenses():
        table.setdefault(defense, (defense, {}))
    return table


def serve_backbone() -> None:
    """Serve the bench Hub for the pretrained columns (until exit); its backbone repo must exist."""
    from huggingface_hub import HfApi

    HUB_ENV.update(_HUB.enter_context(bench_hub()))
    atexit.register(_HUB.close)
    if not HfApi(endpoint=HUB_ENV["HF_ENDPOINT"], token=HUB_ENV["HF_TOKEN"]).repo_exists(BACKBONE_REPO):
        raise SystemExit(f"The pretrained columns load {BACKBONE_REPO} from the bench Hub ({RUNS_DIR / 'hub'}): "
                         "first run python bench/pretrained_appropriator.py --stage backbone.")


_HUB = contextlib.ExitStack()


def parse_row(row: str, default_eps: float) -> dict:
    """``clean``, ``METHOD``, ``METHOD@epsN`` (budget N/255) or ``METHOD@P%`` (P% of the rows protected)."""
    method, _, variant = row.partition("@")
    spec = {"method": method, "eps": default_eps, "protected_percent": 100}
    if variant.startswith("eps"):
        spec["eps"] = float(variant[3:])
    elif variant.endswith("%"):
        spec["protected_percent"] = int(variant[:-1])
    elif variant:
        raise SystemExit(f"Row '{row}': write METHOD, METHOD@epsN or METHOD@P%.")
    return spec


def defense_defaults(defense: str) -> dict:
    """The defense's own flags at their defaults (checked on reuse, with the column's overrides)."""
    arguments = get_defense(defense).arguments
    return asdict(arguments()) if arguments else {}


def use_folders(runs_dir: str | None, results_dir: str | None) -> None:
    """Point this script, and the shared crafting helper and writer, at other folders (smoke runs)."""
    global RUNS_DIR
    if runs_dir:
        RUNS_DIR = sep_effectiveness.RUNS_DIR = common.RUNS_DIR = Path(runs_dir).resolve()
    if results_dir:
        common.RESULTS_DIR = Path(results_dir).resolve()


def victim_dir(row: str, column: str, eps: float, model: str, data_name: str | None = None) -> Path:
    # defense none keeps sep_effectiveness.py's folder names, so its finished victims are reused
    spec = parse_row(row, eps)
    data = data_name or ("clean" if spec["method"] == "clean" else f"{spec['method']}-eps{spec['eps']:g}")
    if spec["protected_percent"] != 100:
        data += f"-p{spec['protected_percent']}"
    return RUNS_DIR / (f"victim-{data}-{model}" + ("" if column == "none" else f"-{column}"))


def mismatch(result: dict, defense: str, expected: dict) -> str | None:
    """Why a finished victim is not this cell's (None if it is)."""
    config = result.get("training_config", {})
    if result.get("defense", "none") != defense:
        return f"defense {result.get('defense')} != {defense}"
    for key, value in expected.items():
        found = result.get(key, config.get(key, result.get("defense_arguments", {}).get(key)))
        if found != value:
            return f"{key} {found} != {value}"
    return None


def victim(row: str, dataset: str, eval_dataset: str, column: str, args, data_name: str | None = None) -> dict | None:
    """One cell: the victim of training ``column`` on ``dataset`` (its folder named by the row, or ``data_name``)."""
    if column in REAL_COLUMNS:  # measured by bench/real_appropriator.py (real_appropriator_cells)
        return None
    defense, flags = columns()[column]
    spec = parse_row(row, args.eps)
    output_dir = victim_dir(row, column, args.eps, args.model, data_name)
    clean_fraction = round(1 - spec["protected_percent"] / 100, 4)
    model = flags.get("model", args.model)  # a pretrained column brings its own backbone
    expected = {"num_train": args.max_train_samples or CPU_DATA["max_train_samples"],
                "num_eval": args.max_eval_samples or CPU_DATA["max_eval_samples"],
                "epochs": args.epochs or CPU_EPOCHS, **defense_defaults(defense), **flags, "model": model}
    if clean_fraction:
        expected["clean_fraction"] = clean_fraction
    results_file = output_dir / "results.json"
    if results_file.exists():
        result = read_json(results_file)
        reason = mismatch(result, defense, expected)
        if reason:
            raise SystemExit(f"{output_dir} holds a victim of another setup ({reason}): delete it, or pass --runs_dir.")
        cell = read_json(output_dir / CELL_FILE) if (output_dir / CELL_FILE).exists() else {}
        return {**summary(result, output_dir), "wall_seconds": cell.get("wall_seconds"), "command": cell.get("command"),
                "reused": True, "machine": cell.get("machine", CURRENT_CPU)}
    if args.report_only:
        return None

    recipe_args = ["--dataset", dataset, "--eval_dataset", eval_dataset, "--model", model, "--preset", "cpu",
                   "--defense", defense, "--output_dir", output_dir]
    for flag, value in flags.items():
        if flag != "model":
            recipe_args += [f"--{flag}", value]
    if clean_fraction:
        recipe_args += ["--clean_dataset", eval_dataset, "--clean_fraction", clean_fraction]
    for flag in ("max_train_samples", "max_eval_samples", "epochs"):
        if getattr(args, flag):
            recipe_args += [f"--{flag}", getattr(args, flag)]
    wall = launch("train_victim.py", recipe_args, env=HUB_ENV if "model" in flags else None,
                  log=RUNS_DIR / f"{output_dir.name}.log")
    command = "accelerate launch --cpu recipes/train_victim.py " + " ".join(map(str, recipe_args))
    (output_dir / CELL_FILE).write_text(json.dumps({"wall_seconds": wall, "command": command, "machine": CURRENT_CPU},
                                                   indent=2))
    return {**summary(read_json(results_file), output_dir), "wall_seconds": wall, "command": command, "reused": False,
            "machine": CURRENT_CPU}


def summary(result: dict, output_dir: Path) -> dict:
    cell = {"eval_accuracy": result["eval_accuracy"], "train_seconds": result["train_seconds"],
            "defense_settings": result.get("defense_settings", {}), "num_train": result["num_train"],
            "num_eval": result["num_eval"], "output_dir": str(output_dir)}
    for key in ("training_mode", "eval_accuracy_seen_classes", "eval_accuracy_unseen_classes", "pretraining_seen_classes"):
        if key in result:  # pretrained victims: accuracy on the classes the backbone was / was not pretrained on
            cell[key] = result[key]
    return cell


def crafted(row: str, args) -> tuple[str, dict]:
    spec = parse_row(row, args.eps)
    method, eps = spec["method"], spec["eps"]
    if args.report_only and not (RUNS_DIR / f"protect-{method}-eps{eps:g}" / "results.json").exists():
        return "", {"error": "not crafted yet"}
    dataset, protection = sep_effectiveness.protect(method, eps, args.checkpoints, args.dataset)
    return str(dataset), crafting_record(dataset, protection, spec["protected_percent"])


def crafting_record(dataset: Path, protection: dict, protected_percent: int = 100) -> dict:
    """What the matrix keeps of a protect.py results.json."""
    wall = protection.get("wall_seconds", {})
    return {"dataset": str(dataset), "max_linf": protection.get("max_linf"), "eps": protection.get("eps"),
                          "mean_psnr": protection.get("mean_psnr"), "wall_seconds": wall,
                          "crafted_against": protection.get("crafted_against", []),
                          "protected_percent": protected_percent,
                          "crafting_seconds": sum(v for k, v in wall.items() if k not in ("publishing", "decoding"))}


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if "error" in cell:
        return "failed"
    return f"{cell['eval_accuracy']:.4f}"


def _minutes(cell: dict | None) -> str:
    if cell is None or "error" in cell:
        return "-"
    seconds = cell["wall_seconds"] if cell.get("wall_seconds") is not None else cell.get("train_seconds")
    if seconds is None:  # promoted from another benchmark's record, which keeps accuracies only
        return "?" + ("p" if cell.get("machine", CURRENT_CPU) != CURRENT_CPU else "")
    return (f"{seconds / 60:.1f}" + ("" if cell.get("wall_seconds") is not None else "*")
            + ("p" if cell.get("machine", CURRENT_CPU) != CURRENT_CPU else ""))


def best_per_defense(cells: dict, defenses: list[str]) -> dict:
    """The protection with the lowest victim accuracy under each training (clean excluded)."""
    best = {}
    for defense in defenses:
        scored = [(row[defense]["eval_accuracy"], name) for name, row in cells.items()
                  if name != "clean" and "eval_accuracy" in row.get(defense, {})]
        if scored:
            accuracy, name = min(scored)
            best[defense] = {"protection": name, "eval_accuracy": accuracy}
    return best


def floors(cells: dict, crafting: dict, defenses: list[str]) -> dict:
    """Per row: the floor (max accuracy over the measured trainings), where it is reached, PSNR, held-out floor,
    and the trainings that defeat the protection (>= DEFEAT_SHARE of clean data's accuracy under them)."""
    clean = cells.get("clean", {})
    out = {}
    for row, row_cells in cells.items():
        measured = {d: row_cells[d]["eval_accuracy"] for d in defenses if "eval_accuracy" in row_cells.get(d, {})}
        if not measured:
            continue
        crafted_against = set(crafting.get(row, {}).get("crafted_against", []))
        held_out = [d for d in defenses if columns()[d][0] not in crafted_against]
        held = {d: a for d, a in measured.items() if d in held_out}
        floor_defense = max(measured, key=measured.get)
        out[row] = {
            "floor": measured[floor_defense], "floor_defense": floor_defense,
            "mean_psnr": crafting.get(row, {}).get("mean_psnr"), "held_out": held_out,
            "held_out_floor": max(held.values()) if held else None,
            "measured_defenses": sorted(measured), "missing_defenses": [d for d in defenses if d not in measured],
            "defeated_by": sorted(d for d, a in measured.items() if row != "clean" and "eval_accuracy" in clean.get(d, {})
                                  and a >= DEFEAT_SHARE * clean[d]["eval_accuracy"]),
        }
    return out


def previous_cells(path: Path) -> tuple[dict, dict, dict]:
    """Cells, crafting and machine of the last written matrix (reused where this machine has no run folder)."""
    if not path.exists():
        return {}, {}, {}
    previous = read_json(path)
    cells = previous.get("cells", {})
    for row_cells in cells.values():  # the stand-in's cells under their old column names
        for old, new in RENAMED_STANDIN.items():
            if BACKBONE_MODEL in (row_cells.get(old) or {}).get("command", ""):
                row_cells[new] = row_cells.pop(old)
    return cells, previous.get("crafting", {}), previous.get("machine", {})


def real_appropriator_cells() -> dict:
    """{row: {column: cell}} of bench/real_appropriator.py's lite2 cells at its default input sizes (the matrix's
    REAL_COLUMNS): the same 10,000 training / 2,000 clean test images, rows crafted by the same protect.py --preset cpu."""
    import real_appropriator

    path = common.RESULTS_DIR / "real_appropriator.json"
    if not path.exists():
        return {}
    payload, out = read_json(path), {}
    for c in payload["cells"]:
        if (c["backbone"] == "lite2" and c["mode"] in REAL_COLUMNS and c["image_size"] == real_appropriator.MODES[c["mode"]][1]
                and c.get("preprocessing") in ("timm", "timm-eval")):
            out.setdefault(c["row"], {})[c["mode"]] = {
                "eval_accuracy": c["eval_accuracy"], "eval_loss": c.get("eval_loss"), "train_seconds": c["train_seconds"],
                "wall_seconds": None, "image_size": c["image_size"], "epochs": c["epochs"], "output_dir": c["output_dir"],
                "measured_by": "bench/real_appropriator.py", "machine": payload["machine"]["cpu"],
                "mixed_precision": c.get("mixed_precision")}
    return out


CURRENT_CPU = common.machine()["cpu"]


def heatmap_png(cells: dict, rows: list[str], defenses: list[str], title: str, summary_rows: dict) -> bytes:
    """Accuracy per cell, and a last column with each row's floor (the appropriator's best training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [*defenses, "FLOOR"]
    values = np.array([[cells.get(r, {}).get(d, {}).get("eval_accuracy", np.nan) for d in defenses]
                       + [summary_rows.get(r, {}).get("floor", np.nan)] for r in rows], dtype=float)
    fig, axis = plt.subplots(figsize=(1.25 * len(labels) + 2, 0.55 * len(rows) + 1.6))
    image = axis.imshow(values, cmap="RdYlGn_r", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(rows):
        for j, label in enumerate(labels):
            if label == "FLOOR":
                floor = summary_rows.get(row)
                text = f"{floor['floor']:.3f}\n{floor['floor_defense']}" if floor else "-"
            else:
                cell = cells.get(row, {}).get(label)
                text = _fmt(cell) if cell is None or "error" in cell else f"{cell['eval_accuracy']:.3f}"
            axis.text(j, i, text, ha="center", va="center", fontsize=7)
    axis.axvline(len(defenses) - 0.5, color="black", linewidth=2)
    axis.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), labels=[f"{r} ({summary_rows[r]['mean_psnr']:.1f} dB)"
                                              if summary_rows.get(r, {}).get("mean_psnr") else r for r in rows])
    axis.set_xlabel("victim training (appropriator)")
    axis.set_ylabel("training data (mean PSNR)")
    axis.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axis, label="clean test accuracy (lower = better protection)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _budget(row: str, eps: float) -> int | None:
    """The row's L-inf budget in 1/255 (None for methods without one, such as CUDA)."""
    spec = parse_row(row, eps)
    return round(spec["eps"]) if get_protection(spec["method"]).has_budget else None


def _floor_text(floor: dict | None) -> str:
    if not floor:
        return "-"
    partial = f", {len(floor['missing_defenses'])} not measured" if floor["missing_defenses"] else ""
    return f"{floor['floor']:.4f} ({floor['floor_defense']}{partial})"


def report(args, rows: list[str], defenses: list[str], cells: dict, crafting: dict, command: str) -> None:
    best = best_per_defense(cells, defenses)
    summary_rows = floors(cells, crafting, defenses)
    psnr = {row: (f"{crafting[row]['mean_psnr']:.1f}" if crafting.get(row, {}).get("mean_psnr") else "-") for row in rows}
    table = markdown_table(["training data \\ defense", *defenses, "floor (reached by)", "PSNR dB"],
                           [[row, *(_fmt(cells.get(row, {}).get(d)) for d in defenses),
                             _floor_text(summary_rows.get(row)), psnr[row]] for row in rows])
    table += "\n\n" + markdown_table(["best protection", *defenses],
                                     [["(lowest accuracy)", *(f"{best[d]['protection']} ({best[d]['eval_accuracy']:.4f})"
                                                              if d in best else "-" for d in defenses)]])
    table += "\n\nWall minutes per cell (`*`: train seconds only, victim reused from an earlier benchmark; " \
             "`p`: measured on another machine, named in the cell's `machine`; `?`: promoted from " \
             "bench/results/robust_protection.json, which keeps accuracies only):\n\n"
    table += markdown_table(["training data \\ defense", *defenses],
                            [[row, *(_minutes(cells.get(row, {}).get(d)) for d in defenses)] for row in rows])
    sizes = f"{args.max_train_samples or 10_000} train / {args.max_eval_samples or 2_000} test"
    title = f"{args.model}, preset cpu, {sizes}, eps {args.eps:g}/255 (floor: the best training's accuracy)"
    setup = {"train_images": args.max_train_samples or 10_000, "test_images": args.max_eval_samples or 2_000,
             "victim": f"{args.model}, preset cpu ({args.epochs or CPU_EPOCHS} epochs), Trainer",
             "protections": "recipes/protect.py --preset cpu --splits train (K=6 source checkpoints)",
             "eps": f"{args.eps:g}/255", "columns": {d: {"defense": columns()[d][0], "flags": columns()[d][1]}
                                                    for d in defenses},
             "defeat_share": DEFEAT_SHARE}
    # "protections": per row, its floor, floor_defense, mean_psnr, held_out (and held_out_floor, defeated_by)
    payload = {"setup": setup, "commands": ["python bench/source_cpu.py", command], "rows": rows,
               "protections": {row: summary_rows.get(row, {"floor": None, "floor_defense": None,
                                                           "mean_psnr": crafting.get(row, {}).get("mean_psnr")})
                               for row in rows},
               "defenses": defenses, "cells": cells, "crafting": crafting, "best_protection": best}
    payload["cell_machines"] = sorted({cell.get("machine", CURRENT_CPU) for row in cells.values() for cell in row.values()})
    write_results(NAME, payload, table)
    (common.RESULTS_DIR / f"{NAME}.png").write_bytes(heatmap_png(cells, rows, defenses, title, summary_rows))
    if args.results_dir is None:  # the dataset card's source: measured rows only, with their scale
        measured = {"scale": f"cpu preset: {setup['victim']}, {sizes}, {setup['protections']}",
                    "machines": payload["cell_machines"], "columns": setup["columns"],
                    "clean": {d: cells["clean"][d]["eval_accuracy"] for d in defenses
                              if "eval_accuracy" in cells.get("clean", {}).get(d, {})},
                    "rows": {row: {"eps": _budget(row, args.eps), **summary_rows[row],
                                   "cells": {d: cells[row][d]["eval_accuracy"] for d in summary_rows[row]["measured_defenses"]}}
                             for row in rows if row in summary_rows and row != "clean"}}
        CARD_SUMMARY.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n")
        if args.release:
            RELEASED_FILE.write_text(CARD_SUMMARY.read_text())
            print(f"released {CARD_SUMMARY.name} into the package: {RELEASED_FILE.relative_to(REPO_ROOT)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protections", nargs="+", default=None,
                        help="Rows (default: clean + every registered protection); METHOD@epsN and METHOD@P%% too.")
    parser.add_argument("--defenses", nargs="+", default=None, help="Columns (default: every column of COLUMNS).")
    parser.add_argument("--eps", type=float, default=8.0)
    parser.add_argument("--model", default="smallnet_cifar")
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    parser.add_argument("--checkpoints", default=None, help="Source checkpoints (default: RUNS_DIR/source-cpu).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Smoke runs only (default: the cpu preset's 10k).")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Smoke runs only (default: 2k).")
    parser.add_argument("--epochs", type=int, default=None, help="Smoke runs only (default: the cpu preset's 12).")
    parser.add_argument("--runs_dir", default=None, help="Runs folder (default: bench/runs); smoke runs use their own.")
    parser.add_argument("--results_dir", default=None, help="Results folder (default: bench/results).")
    parser.add_argument("--report_only", action="store_true",
                        help="Train and craft nothing: write the table from the finished runs ('-' for the rest).")
    parser.add_argument("--release", action="store_true",
                        help="Also copy the card summary into the package (what every future dataset card states).")
    parser.add_argument("--no_previous", action="store_true", help="Do not keep cells of the last written matrix.")
    args = parser.parse_args()
    use_folders(args.runs_dir, args.results_dir)
    args.checkpoints = args.checkpoints or str(RUNS_DIR / "source-cpu")

    all_columns = columns()
    # Measure the asked cells; report every row and column (the floor is over ALL columns, with the
    # cells of earlier runs), so a partial run never hides what was measured before.
    measured_columns = args.defenses or list(all_columns)
    unknown = sorted(set(measured_columns) - set(all_columns))
    if unknown:
        raise SystemExit(f"Unknown columns {unknown}; choose from {', '.join(all_columns)}.")
    previous, previous_crafting, previous_machine = ({}, {}, {}) if args.no_previous else \
        previous_cells(common.RESULTS_DIR / f"{NAME}.json")
    defenses = list(all_columns)
    selected = args.protections or ["clean", *list_protections()]
    rows = list(dict.fromkeys(["clean", *list_protections(), *previous, *selected]))
    for row in rows:
        method = parse_row(row, args.eps)["method"]
        if method != "clean" and method not in list_protections() and "+" not in method:
            raise SystemExit(f"Unknown protection in row '{row}'; choose from clean, {', '.join(list_protections())}.")
    command = "python bench/protection_matrix.py " + " ".join(sys.argv[1:])
    if any(parse_row(row, args.eps)["method"] == "cuda" for row in selected):
        common.ensure_cuda_key()

    if any("model" in all_columns[column][1] and column not in REAL_COLUMNS for column in measured_columns) \
            and not args.report_only:
        serve_backbone()
    cells: dict[str, dict] = {row: dict(previous.get(row, {})) for row in rows}
    for row_cells in cells.values():  # cells of the last matrix without a machine are the machine it names
        for cell in row_cells.values():
            cell.pop("previous_machine", None)
            cell.setdefault("machine", previous_machine.get("cpu", "unknown"))
    for row, real in real_appropriator_cells().items():
        if row in cells:
            cells[row].update(real)
    crafting: dict[str, dict] = {row: previous_crafting[row] for row in rows if row in previous_crafting}
    failed = False
    for row in selected:
        try:
            dataset, crafted_now = (args.dataset, {}) if row == "clean" else crafted(row, args)
        except RuntimeError as err:  # a method that cannot craft here: report it, keep the other rows
            print(f"{row}: crafting failed: {err}", file=sys.stderr)
            crafting.setdefault(row, {"error": str(err)})  # an earlier record of the row stays
            failed = True
            continue
        if "error" not in crafted_now or row not in crafting:  # --report_only keeps the previous crafting record
            crafting[row] = crafted_now
        for defense in measured_columns:
            start = time.perf_counter()
            try:
                cell = victim(row, dataset, args.dataset, defense, args)
                if cell is not None:
                    cells[row][defense] = cell
            except RuntimeError as err:
                cells[row][defense] = {"error": str(err), "wall_seconds": time.perf_counter() - start}
                failed = True
        report(args, rows, defenses, cells, crafting, command)
    report(args, rows, defenses, cells, crafting, command)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
