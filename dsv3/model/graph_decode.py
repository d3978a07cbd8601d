"""Decoding steps at fixed shapes, captured once as a CUDA graph and replayed.

A decoding step of one token per row is a few hundred small kernels (about 14 per layer for
attention, 10-20 for the feed-forward); on a GPU, at batch 1, launching them costs more than
running them. An ordinary step also changes shape every token: it reads ``cache.length`` on the
host, writes the new latent at that position and attends over the filled positions only.

:class:`GraphedDecoder` makes every shape of the step fixed, so that one capture replays for
every token: the token ids, rope positions, the cache slot the step writes and the key mask
live in device buffers that the step itself advances; attention reads all ``max_len`` cache
positions and the mask hides those not written yet (masked scores get probability 0, so the
result equals the ordinary step's to rounding). On CUDA the step is captured with
``torch.cuda.CUDAGraph`` after two warm-up runs (which build the derived decode weights of
:mod:`dsv3.model.decode` outside the graph) and replayed for each token; on other devices the
same fixed-shape step runs eagerly (no capture: that is how the CPU tests check it against the
ordinary step). The prompt runs through the ordinary path.

A decoder keeps its cache and graph for further prompts of the same batch and ``max_len``
(:func:`decoder_for` keeps one per model); when a prompt is prefilled it captures again if a
parameter or buffer of the model was changed or replaced since its capture (the graph replays
the weights it was captured with, including the derived copies: do not change weights between
the steps of one generation).
"""

from __future__ import annotations

import torch

from dsv3.errors import DsvError

#: warm-up runs before a capture, on a side stream (lazy state and the derived weights are built there)
WARMUP_STEPS = 2


class GraphedDecoder:
    """Decode B rows one token per row per step at fixed shapes (a CUDA graph on CUDA).

    Args:
        model: a :class:`dsv3.model.Transformer` on one device: not compiled, not dispatched
            across devices by accelerate, without forward hooks (the eager inference path of
            :mod:`dsv3.model.decode` must apply to every module).
        batch: B, the rows.
        max_len: cache positions (prompt plus new tokens), at most ``max_seq_len``.
        capture: capture a CUDA graph; default: when the model is on a CUDA device.

    Raises:
        DsvError: the model is not a plain :class:`~dsv3.model.Transformer` on one device, or
            ``capture`` is asked for off CUDA.
    """

    def __init__(self, model, batch: int, max_len: int, capture: bool | None = None):
        _check(model)
        device = model.input_device()
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise DsvError(f"CUDA graph capture needs the model on a CUDA device, not {device}; decode without it")
        self.model, self.batch, self.max_len, self.device = model, batch, max_len, device
        self.cache = model.new_cache(batch, max_len)
        # the step's inputs and state, at fixed addresses
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1) the new tokens
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # cache position they are written at
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1) their rope positions
        self.key_ok = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S) keys a row may see
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (B, V) the captured step's output buffer
        self._weights: list[tuple[int, int]] = []  # the model's tensors as captured (:meth:`_tensor_state`)

    @property
    def length(self) -> int:
        """Positions filled so far (prompt and appended tokens)."""
        return self.cache[0].length

    @torch.inference_mode()
    def prefill(
        self,
        ids: torch.Tensor,
        pad: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the prompts through the ordinary path into the cache (from position 0).

        Args:
            ids: (B, P) int64 prompts.
            pad: optional (B,) int64 left padding of each row (the prompt layout of
                :func:`dsv3.generation.generate_batch`): rope positions start at 0 on each
                row's first real token, and padding columns stay masked.
            attn_mask, position_ids: as :meth:`~dsv3.model.Transformer.forward` takes them
                for such a batch.

        Returns:
            (B, V) float32 logits of the last position.

        Raises:
            ValueError: the prompts leave no cache position for a new token.
        """
        P = ids.shape[1]
        if P >= self.max_len:
            raise ValueError(f"a prompt of {P} positions leaves no room in a cache of {self.max_len}")
        for c in self.cache:
            c.slot, c.length = None, 0
        logits = self.model(ids, cache=self.cache, attn_mask=attn_mask, position_ids=position_ids)[:, -1]
        pad = torch.zeros(self.batch, dtype=torch.long, device=self.device) if pad is None else pad.to(self.device)
        cols = torch.arange(self.max_len, device=self.device)[None, :]
        self.key_ok.copy_((cols >= pad[:, None]) & (cols < P))
        self.slot.fill_(P)
        self.positions.copy_((P - pad)[:, None])
        for c in self.cache:
            c.slot = self.slot
        if self.graph is not None and self._tensor_state() != self._weights:
            self.graph = self.logits = None  # the model changed since the capture: capture again
        return logits

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the logits of the next one.

        Args:
            ids: (B, 1) int64 (or (B,)) the tokens to append.

        Returns:
            (B, V) float32 logits; under a CUDA graph, its output buffer, which the next step
            overwrites (read or copy it first).

        Raises:
            ValueError: before :meth:`prefill`, or the cache is full.
            DsvError: the first step's capture failed (CUDA).
        """
        n = self.length
        if self.cache[0].slot is None:
            raise ValueError("run prefill() before step()")
        if n >= self.max_len:
            raise ValueError(f"decode cache holds {self.max_len} positions; {n + 1} needed")
        self.ids.copy_(ids.reshape(self.batch, 1))
        if not self.capture:
            logits = self._run()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        for c in self.cache:
            c.length = n + 1
        return logits

    def _run(self) -> torch.Tensor:
        """The fixed-shape step on the buffers: (B, V) float32 logits."""
        self.key_ok.index_fill_(1, self.slot.view(1), True)  # the new token sees itself
        mask = self.key_ok[:, None, None, :]  # (B, 1, 1, S)
        logits = self.model(self.ids, cache=self.cache, attn_mask=mask, position_ids=self.positions)[:, -1]
        self.slot.add_(1)
        self.positions.add_(1)
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (restoring the state after each run), then capture one step."""
        state = (self.slot, self.positions, self.key_ok)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._run()
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records the kernels without running them: the state stays
                logits = self._run()
        except RuntimeError as e:  # e.g. an operation that reads a device value on the host
            msg = f"capturing the decoding step as a CUDA graph failed ({e}); decode without --cuda-graph"
            raise DsvError(msg) from e
        self.graph, self.logits, self._weights = graph, logits, self._tensor_state()

    def _tensor_state(self) -> list[tuple[int, int]]:
        """(address, version) of every parameter and buffer of the model (version -1 for an
        inference tensor, which has none)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return [(t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors]


def _check(model) -> None:
    """Raise :class:`DsvError` unless ``model`` is a plain Transformer that the fixed-shape step can run."""
    from dsv3.model.transformer import Transformer

    if not isinstance(model, Transformer):
        msg = "fixed-shape (CUDA graph) decoding runs the eager dsv3 Transformer; drop --compile or --cuda-graph"
        raise DsvError(msg)
    if hasattr(model, "hf_device_map"):
        raise DsvError(
            "fixed-shape (CUDA graph) decoding needs the whole model on one device; "
            "drop --max-memory and --offload-folder, or decode without --cuda-graph"
        )
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        raise DsvError("fixed-shape (CUDA graph) decoding cannot run modules with forward hooks; remove the hooks")


def decoder_for(model, batch: int, max_len: int, capture: bool | None = None) -> GraphedDecoder:
    """The model's :class:`GraphedDecoder` for ``batch`` rows of ``max_len`` positions: the one
    kept on the model from an earlier call when it has these shapes (its cache and graph
    reused), else a new one, which replaces it. Arguments and errors as :class:`GraphedDecoder`."""
    _check(model)
    kept = model.__dict__.get("_dsv3_graphed")
    want = model.input_device().type == "cuda" if capture is None else capture
    dtype = model.embed_tokens.weight.dtype
    if kept is None or (kept.batch, kept.max_len, kept.capture, kept.device, kept.cache[0].buf.dtype) != (
        batch,
        max_len,
        want,
        model.input_device(),
        dtype,
    ):
        kept = model.__dict__["_dsv3_graphed"] = None  # (frees the old cache and graph first)
        kept = model.__dict__["_dsv3_graphed"] = GraphedDecoder(model, batch, max_len, capture)
    return kept
