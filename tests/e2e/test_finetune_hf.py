"""A Hugging Face DeepSeek-V3 folder -> dsv3 train (init_from) -> export -> transformers, same logits."""

import json

import pytest
import torch
from helpers import hf_config, hf_load, random_hf_model, run_dsv3, tiny_overrides

transformers = pytest.importorskip("transformers")


def test_train_from_hf_folder_and_export_back(corpus_dir, data_cache, tmp_path):
    # the tokenizer comes from a dsv3 prepare of the same corpus (512 pieces at most)
    prep = (
        run_dsv3(
            [
                "prepare",
                "--config",
                "configs/tiny.yaml",
                *[o for o in tiny_overrides(corpus_dir, data_cache, tmp_path / "unused") if o.startswith("data.")],
                "model.vocab_size=512",
            ]
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    tokenizer = f"{prep}/tokenizer.model"
    hf_dir = tmp_path / "hf"
    hf_model = random_hf_model(hf_config(vocab_size=512, max_position_embeddings=128), seed=3)
    hf_model.save_pretrained(hf_dir)

    out = tmp_path / "run"
    overrides = [
        o
        for o in tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 3, "ckpt.every": 3})
        if not o.startswith("model.")
    ]
    run_dsv3(["train", "--no-sample", f"train.init_from={hf_dir}", f"data.tokenizer={tokenizer}", *overrides])
    resolved = (out / "config.yaml").read_text()
    assert "dim: 64" in resolved and "n_layers: 3" in resolved  # the model section came from the HF folder
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    # step-0 validation loss is the HF model's own loss on the same windows
    from data_pipeline.dataset import PackedDataset

    val = PackedDataset(prep, "val", 64)
    n = min(len(val), 2 * 4)
    batch = val.batch(list(range(n)))
    with torch.no_grad():
        logits = hf_model(batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert first["val_loss"] == pytest.approx(ref, rel=1e-4)

    export = tmp_path / "export"
    run_dsv3(["convert", "--to-hf", str(out), "--out", str(export)])
    trained_hf, info = hf_load(export)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    from dsv3 import load_model

    ours = load_model(out)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), trained_hf(ids).logits
        before = hf_model(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - before).abs().max().item() > 1e-3  # training changed the weights
