"""One safetensors file written in pieces (dsv3.checkpoint.safetensors_io,
dsv3.parallel.unsplit_save), read by the safetensors library."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dsv3.checkpoint.safetensors_io import Piece, SafetensorsLayout, chunk, write_collective

TENSORS = {
    "b": torch.arange(5, dtype=torch.bfloat16) / 3,
    "a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
    "steps": torch.tensor([[7, -1], [2**40, 3]]),
    "empty": torch.zeros(0, 3),
    "h": torch.tensor([1.5, -2.25, 0.125], dtype=torch.float16),
    "flags": torch.tensor([True, False, True]),
}


def entries():
    return {k: (v.dtype, tuple(v.shape)) for k, v in TENSORS.items()}


def pieces_of(parts: int, index: int):
    """What writer ``index`` of ``parts`` writes: its chunk of every tensor (a replicated tensor)."""
    for key, value in TENSORS.items():
        lo, hi = chunk(value.numel(), parts, index)
        if hi > lo:
            yield Piece(key, lo, value.reshape(-1)[lo:hi])


def test_pieces_from_three_writers_make_a_valid_file(tmp_path):
    layout = SafetensorsLayout(entries(), {"step": "12"})
    path = tmp_path / "x.safetensors"
    layout.create(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        written = sum(layout.write(fd, p) for i in (2, 0, 1) for p in pieces_of(3, i))  # any order
    finally:
        os.close(fd)
    assert written == layout.numel == 12 + 5 + 4 + 0 + 3 + 3
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(TENSORS)
    for key, value in TENSORS.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"step": "12"}
        assert torch.equal(f.get_slice("a")[1:3], TENSORS["a"][1:3])
    # the header: 8-byte size, JSON padded to 8 bytes, tensors aligned to their element size, no gaps
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and len(raw) == 8 + n + sum(v.numel() * v.element_size() for v in TENSORS.values())
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(tuple(h["data_offsets"]) for k, h in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for key, h in header.items():
        if key != "__metadata__":
            assert h["data_offsets"][0] % TENSORS[key].element_size() == 0, key
    assert [k for k in header if k != "__metadata__"][:2] == ["steps", "a"]  # 8-byte values first, then by order


def test_chunks_cover_a_range_once():
    for n in (0, 1, 7, 100):
        for parts in (1, 2, 3, 8):
            spans = [chunk(n, parts, i) for i in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1


def test_collective_write_without_a_process_group(tmp_path):
    path = tmp_path / "model.safetensors"
    order = ["a", "b", "h", "steps", "flags", "empty"]
    assert write_collective(path, entries(), 0, lambda mine: pieces_of(1, 0), order, {"k": "v"}) is None
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    assert not list(tmp_path.glob(".*.tmp"))


def test_collective_write_reports_missing_and_misplaced_pieces(tmp_path):
    path = tmp_path / "model.safetensors"
    order = list(TENSORS)

    def missing(mine):  # the last value of "a" is never written
        for p in pieces_of(1, 0):
            yield Piece(p.key, p.start, p.values.reshape(-1)[:-1]) if p.key == "a" else p

    error = write_collective(path, entries(), 0, missing, order)
    assert error == "internal error: the ranks wrote 26 values of model.safetensors for its 27"
    assert not path.exists() and not list(tmp_path.glob(".*.tmp"))

    def outside(mine):
        yield Piece("a", 10, TENSORS["a"].reshape(-1)[:4])

    error = write_collective(path, entries(), 0, outside, order)
    assert error == "ValueError: piece [10, 14) of a does not fit its 12 values of 4 bytes"
    assert not path.exists()


def test_collective_write_reports_an_unwritable_folder(tmp_path):
    error = write_collective(tmp_path / "missing" / "model.safetensors", entries(), 0, lambda mine: [], list(TENSORS))
    assert error.startswith("FileNotFoundError:")


def test_unsupported_dtype_is_refused():
    with pytest.raises(KeyError):
        SafetensorsLayout({"z": (torch.complex64, (2,))})


def _stepped_model():
    """A small model after two AdamW steps, every parameter updated: (model, optimizer)."""
    from test_init import full_model, small_cfg

    model = full_model(small_cfg(), seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(ids).float().pow(2).mean().backward()
        for p in model.parameters():  # the MTP modules are not in this loss
            if p.grad is None:
                p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad()
    return model, opt


def _to_meta(model, keep):
    """Put every parameter not starting with a prefix of ``keep`` on the meta device (another stage's)."""
    for name, p in list(model.named_parameters()):
        if not name.startswith(keep):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"))


def test_weights_and_optimizer_state_round_trip_and_a_stage_reads_only_its_own(tmp_path):
    """save_weights / save_optimizer_state in one process give model.state_dict() and the AdamW
    state under the plain names; read_layout_free on a model holding one stage returns that
    stage's entries only, equal to what was saved."""
    from dsv3.checkpoint import LAYOUT_FREE
    from dsv3.config import Config
    from dsv3.parallel.layout_free import read_layout_free
    from dsv3.parallel.unsplit_save import save_optimizer_state, save_weights

    model, opt = _stepped_model()
    names = [n for n, _ in model.named_parameters()]
    assert save_weights(tmp_path / "model.safetensors", model, names, 0, (0, 1), {"step": "2"}) is None
    assert save_optimizer_state(tmp_path / LAYOUT_FREE, model, names, opt, 0, (0, 1)) is None
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert list(weights) != [] and sorted(weights) == sorted(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    params = dict(model.named_parameters())
    saved = {
        n: {"fp32": p.detach().clone(), **{k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}}
        for n, p in params.items()
    }
    _to_meta(model, ("layers.2.", "norm.", "lm_head.", "mtp."))
    state, step = read_layout_free(tmp_path, Config(), model)
    assert step == 2
    assert sorted(state) == sorted(n for n, p in model.named_parameters() if not p.is_meta)
    assert 0 < len(state) < len(saved)
    for name, entry in state.items():
        assert sorted(entry) == ["exp_avg", "exp_avg_sq", "fp32"]
        assert all(torch.equal(entry[k], saved[name][k]) for k in entry), name


def test_a_rank_that_cannot_see_the_file_names_the_shared_filesystem(tmp_path, monkeypatch):
    """On a node that does not share the run directory the file rank 0 created is missing."""
    monkeypatch.setattr(SafetensorsLayout, "create", lambda self, path: None)
    error = write_collective(tmp_path / "model.safetensors", entries(), 0, lambda mine: pieces_of(1, 0), list(TENSORS))
    assert error == (
        f"OSError: {tmp_path / '.model.safetensors.tmp'} created by rank 0 is not visible on rank 0; "
        "train.out_dir must be on a filesystem every node shares"
    )
