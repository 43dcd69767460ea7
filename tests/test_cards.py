"""The dataset card's measured protection-matrix section says what was measured, and no more."""

import json

from sep_hf.publish.cards import measured_matrix_section


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


def test_pretrained_appropriators_are_named_plainly_the_stand_in_as_one(tmp_path):
    """Columns pretrained-ft / linear-probe (the real ImageNet backbone) and standin-ft / standin-probe: the card
    says what each reaches, whether the protection holds, and which is the stand-in."""
    path = _measured(tmp_path, {"none": 0.15, "jpeg": 0.70, "pretrained-ft": 0.65, "linear-probe": 0.30,
                                "standin-ft": 0.20}, [])
    row = json.loads(path.read_text())
    row["rows"]["sep-fa-vr"]["defeated_by"] = ["jpeg", "pretrained-ft"]
    row["clean"]["pretrained-ft"] = 0.74
    path.write_text(json.dumps(row))
    text = measured_matrix_section("sep-fa-vr", 8, "cpu", path)
    real = text[text.index("The real pretrained appropriator (an ImageNet EfficientNet-Lite2)"):text.index("A stand-in")]
    assert "fine-tuning a pretrained backbone reaches 0.6500 (0.7400 on clean data: 88% of it kept)" in real
    assert "linear probe of a frozen pretrained backbone reaches 0.3000" in real
    assert "does not hold against it" in real
    standin = text[text.index("A stand-in pretrained appropriator"):]
    assert "fine-tuning it reaches 0.2000" in standin and "does not hold" not in standin
    assert "| pretrained-ft (ImageNet EfficientNet-Lite2 fine-tuned) | 0.6500 | 0.7400 |" in text
    assert "| standin-ft (stand-in: a small CIFAR-pretrained net fine-tuned) | 0.2000 | - |" in text
    assert "has not been measured" not in text  # the matrix's own real columns: no second sentence
    assert "pretrained appropriator" not in measured_matrix_section(
        "sep-fa-vr", 8, "cpu", _measured(tmp_path, {"none": 0.15, "jpeg": 0.70}, []))


def test_audit_section_states_this_datasets_probe_or_why_not():
    from sep_hf.publish.cards import audit_section

    audit = {"audited": True, "model": "hf-hub:timm/tf_efficientnet_lite2.in1k", "input_size": [128, 128],
             "clean_accuracy": 0.8, "protected_accuracy": 0.6, "num_train": 10000, "num_eval": 2000, "eval_split": "test",
             "probe": "logistic regression", "precision": "bf16", "seconds_per_1000_images": 7.25}
    text = audit_section(audit)
    assert "`hf-hub:timm/tf_efficientnet_lite2.in1k` (128x128 px; logistic regression)" in text
    assert "reaches **0.6000** on the 2000 clean `test` images" in text and "reaches **0.8000**" in text
    assert "keeps 75% of it" in text and "7.2 s per 1,000 images" in text
    assert audit_section({"audited": False, "reason": "turned off"}) == "Not audited: turned off."
    assert audit_section(None).startswith("Not audited: this protection was made before")


def test_card_states_how_class_names_became_a_class_label():
    from sep_hf.publish.cards import protected_dataset_card

    results = {"eps": 8, "method": "sep", "mean_psnr": 35.0, "dataset": "photos", "config": {},
               "splits": {"train": {"num_examples": 10, "max_linf": 8, "mean_psnr": 35.0, "mean_l2": 1.2}}}
    _, body = protected_dataset_card(results, [], "grid.png")
    assert "Same columns and labels as the source." in body
    encoded = {"column": "label", "names": [f"class{index:02d}" for index in range(12)]}
    _, body = protected_dataset_card({**results, "class_encoded": encoded}, [], "grid.png")
    assert "Same columns and labels" not in body and "class names in `label` are stored as a ClassLabel" in body
    assert "`class_encode_column`" in body and "0 = class00, 1 = class01" in body and "9 = class09, ...)" in body


def test_real_imagenet_appropriator_is_stated_or_said_unmeasured(tmp_path):
    """The card names what an ImageNet backbone probed or fine-tuned reached on the method's bench data, with the clean
    figure beside it; a method it was not measured against is said so, never left out."""
    from sep_hf.publish.cards import real_appropriator_sentence

    path = tmp_path / "real_appropriator_cpu.json"
    path.write_text(json.dumps({"backbone": "timm/tf_efficientnet_lite2.in1k", "protocol": "10,000 images",
                                "machines": ["AMD EPYC (bf16)"],
                                "rows": {"clean": {"linear-probe": 0.76, "pretrained-ft": 0.79},
                                         "sep-fa-vr": {"linear-probe": 0.58, "pretrained-ft": 0.29}}}))
    text = real_appropriator_sentence("sep-fa-vr", path)
    assert "`timm/tf_efficientnet_lite2.in1k`" in text and "AMD EPYC (bf16)" in text
    assert "a linear probe of a frozen pretrained backbone reaches 0.5800 (0.7600 on clean data)" in text
    assert "fine-tuning a pretrained backbone reaches 0.2900 (0.7900 on clean data)" in text
    assert "has not been measured against this method" in real_appropriator_sentence("cuda", path)
    assert "has not been measured" in real_appropriator_sentence("sep-fa-vr", tmp_path / "missing.json")
