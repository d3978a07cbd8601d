"""dsv3: train DeepSeek-V3-architecture mixture-of-experts language models.

Python API (docs/design.md)::

    from dsv3 import load_model, load_tokenizer
    model = load_model(path)      # run dir or checkpoint folder -> eval-mode CPU fp32 model
    logits = model(input_ids)     # (B, T) int64 -> (B, T, vocab_size) float32
    tok = load_tokenizer(path)    # .encode(str) -> list[int], .decode(list[int]) -> str
"""

from dsv3.checkpoint import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
__version__ = "0.1.0"
