"""peft_table on ViT-B/16 (meta device) against the parameter counts of METHODS.md section 5."""

from __future__ import annotations

import torch

from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.peft.table import peft_table
from vitpipe.models.vit import build_vit


def test_vit_base_counts_match_the_papers() -> None:
    rows = {row["method"]: row for row in peft_table("vit_base_patch16_224")}
    assert list(rows) == list(PEFT_METHODS)
    params = {name: row["trainable_params"] for name, row in rows.items()}

    assert params["fact_tt"] == 2 * 768 * 8 + 144 * 8 * 8 == 21_504
    assert params["vpt"] == 10 * 768 * 12 == 92_160
    assert params["convpass"] == 327_552
    assert params["adaptformer"] == 147_456 + 12 * (8 + 768)  # weights + biases, "~0.16M"
    assert params["lora"] == 294_912  # "0.29M"
    assert params["bitfit"] == 102_144  # "~0.10M"
    assert params["fact_tk"] == 2 * 768 * 32 + 144 * 32 + 32**3
    assert params["bi_adapter"] == 12 * 2 * 768 * 32
    # the authors' VTAB setup: one 384-group branch with a bias per Linear, 0.35% of ViT-B/16
    assert params["consolidator"] == 84_934_656 // 384 + 12 * (2304 + 768 + 3072 + 768) == 304_128
    assert params["linear"] == 0
    assert round(params["full"] / 1e6, 1) == 85.8

    for name, row in rows.items():
        assert row["mergeable"] == PEFT_METHODS[name].mergeable
        if name != "bi_adapter":  # float32 everywhere else
            assert row["delta_bytes"] == 4 * row["trainable_params"]
    assert rows["bi_adapter"]["delta_bytes"] == 12 * 2 * 768 * 32 // 8 + 12 * 2 * 8


def test_adaptformer_without_biases_is_147456() -> None:
    with torch.device("meta"):
        model = build_vit("vit_base_patch16_224")
    method = PEFT_METHODS["adaptformer"]
    method.apply(model, {"bias": False})
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == 147_456


def test_head_is_excluded_from_the_counts() -> None:
    with_head = {row["method"]: row["trainable_params"] for row in peft_table("vit_base_patch16_224", num_classes=100)}
    without = {row["method"]: row["trainable_params"] for row in peft_table("vit_base_patch16_224")}
    assert with_head == without
