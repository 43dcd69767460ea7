"""The dataset card's measured protection-matrix section says what was measured, and no more."""

import json

from sep_hf.cards import measured_matrix_section


def _measured(tmp_path, cells, missing):
    row = {"eps": 8, "cells": cells, "floor": max(cells.values()), "floor_defense": max(cells, key=cells.get),
           "defeated_by": ["jpeg"], "missing_defenses": missing}
    path = tmp_path / "protection_matrix_cpu.json"
    path.write_text(json.dumps({"scale": "cpu scale", "machines": ["AMD EPYC"], "clean": {"none": 0.78, "jpeg": 0.72},
                                "rows": {"sep-fa-vr": row}}))
    return path


def test_floor_over_every_column_is_stated_plainly(tmp_path):
    text = measured_matrix_section("sep-fa-vr", 8, "cpu", _measured(tmp_path, {"none": 0.15, "jpeg": 0.70}, []))
    assert "**0.7000** with `jpeg`" in text and "| jpeg | 0.7000 | 0.7200 |" in text
    assert "lower bound" not in text


def test_floor_with_unmeasured_trainings_is_called_a_lower_bound(tmp_path):
    text = measured_matrix_section("sep-fa-vr", 8, "cpu", _measured(tmp_path, {"none": 0.15, "jpeg": 0.70}, ["at8-eval"]))
    assert "Not measured: at8-eval" in text and "lower bound" in text


def test_no_row_for_another_budget_or_scale(tmp_path):
    path = _measured(tmp_path, {"none": 0.15}, [])
    for eps, preset in ((4, "cpu"), (8, "paper")):
        assert measured_matrix_section("sep-fa-vr", eps, preset, path).startswith("No protection matrix")
    assert measured_matrix_section("cuda", 8, "cpu", path).startswith("No protection matrix")
