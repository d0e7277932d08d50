"""The model in torch without its weights in memory: each module's weights are decoded from the
memory-mapped GGUF just before the module runs and dropped just after, so a forward pass holds one
module's weights at a time (the biggest being the embedding or the output head) instead of the
whole model as float32 (32 GB for an 8B model).

This is the big-model offloading of accelerate (its `AlignDevicesHook` with a `weights_map`) and of
llm-compressor's sequential pipeline, reduced to what windq needs: the module tree is transformers'
own model built on the meta device from the GGUF's config, so the forward is the architecture's and
nothing here knows one architecture from another; the weights are the ones transformers' GGUF
loader would have put there (libggml's decode, then transformers' tensor processor for the
architecture), or what a caller's `source` returns instead (the real loss puts a plan's quantized
weights there).

The Fisher needs gradients, and autograd would keep every weight alive until the backward pass
(as the saved operand of each matmul and as the leaf a weight's gradient lands on). Here no weight
is a leaf: a saved weight is packed as its tensor's name and decoded again when the backward needs
it, and each planned weight's gradient is formed where it arises, from the module's input and the
gradient of its output, then reduced to the row and column sums the Fisher keeps. Decoder layers
are checkpointed (run again in the backward pass), so their activations are not all kept either.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from windq.errors import UnsupportedModelError
from windq.models.gguf_model import GGUFModel

# rows of an output head's gradient formed at a time (the whole one is vocabulary × width)
HEAD_BLOCK = 4096


class StreamedModel:
    """transformers' model of a GGUF whose weights are read from the file as each module runs.

    `source(tensor)` gives a GGUF tensor as the torch parameter holds it (transformers' row order,
    float32); by default the file's own weights. Call it like the model (`sm(tokens).logits`)."""

    def __init__(self, model: GGUFModel, source: Callable[[str], np.ndarray] | None = None):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from windq.pipeline.calibrate import architecture, check_rope, parameter_slots, quiet_transformers, torch_config, weight_processor

        arch = architecture(model)
        check_rope(model)
        config = torch_config(model, arch.model_type)
        # transformers' loader ties the head to the embedding when the file has no output.weight
        config.tie_word_embeddings = "output.weight" not in model.tensors
        with quiet_transformers(), init_empty_weights():  # parameters on meta; buffers (rotary) real
            tm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tm.tie_weights()  # from_config on meta leaves a tied head its own (empty) parameter
        tm.eval()
        self.model = model
        self.tm = tm
        self.processor = weight_processor(model, tm)
        self.source = source or self.file_weights
        slots = parameter_slots(model, tm)  # refuses a file and a module tree that differ
        shared = sorted(t for t, s in slots.items() if s.part is not None)
        if shared:
            # a module's weights are loaded parameter by parameter; one parameter filled from two
            # tensors (transformers' MoE experts: gate and up) is not written for here
            raise UnsupportedModelError(
                f"{model.path.name}: {shared[0]} fills part of a torch parameter ({len(shared)} such: MoE experts); "
                "streaming runs models whose tensors are whole parameters: run without --stream"
            )
        by_param = {id(s.param): t for t, s in slots.items()}  # every slot is a whole parameter here
        # module → [(parameter name, its meta parameter, GGUF tensor)]: a tied head lists the embedding's
        self._slots = [
            (mod, [(pname, p, by_param[id(p)]) for pname, p in mod._parameters.items() if p is not None])
            for mod in tm.modules()
            if any(p is not None for p in mod._parameters.values())
        ]
        self._shapes = {t: meta.shape for _, slots in self._slots for _, meta, t in slots}
        # storage address of a decoded weight → (its tensor, the weight): holding the weight keeps its
        # address from being reused by an activation while the entry stands
        self._live: dict[int, tuple[str, object]] = {}
        self.passes = 0  # forward passes begun (a checkpoint's re-run inside a backward is not one)
        for mod, slots in self._slots:
            mod.register_forward_pre_hook(lambda m, args, slots=slots: self._load(m, slots))
            mod.register_forward_hook(lambda m, args, out, slots=slots: self._drop(m, slots))

    def file_weights(self, tensor: str) -> np.ndarray:
        return self.processor.process(self.model.dequantized(tensor), tensor).weights

    def weight(self, tensor: str, shape) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.source(tensor), dtype=np.float32)).view(shape)

    def _load(self, mod, slots) -> None:
        import torch

        for pname, meta, tensor in slots:
            w = self.weight(tensor, meta.shape)
            self._live[w.untyped_storage().data_ptr()] = (tensor, w)
            mod._parameters[pname] = torch.nn.Parameter(w, requires_grad=False)

    def _drop(self, mod, slots) -> None:
        for pname, meta, _ in slots:
            w = mod._parameters[pname]
            self._live.pop(w.untyped_storage().data_ptr(), None)
            mod._parameters[pname] = meta

    def __call__(self, tokens, **kw):
        import torch

        self._live.clear()  # nothing outlives a pass (a weight left by a failed one is not a weight now)
        self.passes += 1
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import set_checkpoint_early_stop

            # a checkpointed layer re-run in the backward pass would by default stop as soon as it
            # has given back what the backward needs, in the middle of a module: that module's weights
            # would never be dropped (measured: they were then taken for activations at their address)
            with set_checkpoint_early_stop(False), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return self.tm(tokens, use_cache=False, **kw)
        return self.tm(tokens, use_cache=False, **kw)

    def _pack(self, t):
        live = self._live.get(t.untyped_storage().data_ptr())
        if live is None:
            return t
        tensor = live[0]
        # a weight (or a view of it) that the backward pass needs: kept as its name and layout
        return (tensor, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        tensor, size, stride, offset = packed
        return self.weight(tensor, self._shapes[tensor]).as_strided(size, stride, offset)


@contextmanager
def streamed_fisher(sm: StreamedModel, planned: set[str]) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Inside the block, every backward pass through `sm` adds each planned weight's squared
    gradient, reduced to (row sums, column sums) in transformers' row order, to the yielded dict.

    A weight's gradient is formed from its module's input x and output gradient δ: δᵀx for a Linear
    (in row blocks for a wide head), δ scattered onto the looked-up rows for an Embedding (through
    the module's own forward on those rows alone, so a scaled embedding is differentiated as it
    runs). A tensor used twice (an output head tied to the embedding) gets its two gradients summed
    before squaring, as autograd sums them on a shared parameter."""
    import torch

    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kinds = {}
    for mod, slots in sm._slots:
        for pname, meta, tensor in slots:
            if tensor in planned and pname == "weight":
                if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                    raise UnsupportedModelError(
                        f"{sm.model.path.name}: {tensor} is held by a {type(mod).__name__}; the streamed Fisher knows Linear and Embedding"
                    )
                kinds.setdefault(tensor, []).append(mod)
    tied = {t for t, mods in kinds.items() if len(mods) > 1}
    # for a tied tensor: the rows the embedding looked up this pass, and the head's gradient on them
    pending: dict[str, dict] = {t: {} for t in tied}
    handles = []

    def add(tensor: str, rows_idx, g2_rows: np.ndarray, g2_cols: np.ndarray, shape) -> None:
        r, c = sums.setdefault(tensor, (np.zeros(shape[0]), np.zeros(shape[1])))
        if rows_idx is None:
            r += g2_rows
        else:
            np.add.at(r, rows_idx, g2_rows)
        c += g2_cols

    # A Linear inside a checkpointed decoder layer runs twice per pass: in the forward, and again
    # when the backward reaches its layer. Its input is taken from the second run, so that no
    # layer's inputs are held from the forward to the backward (they were: measured 7 MB per layer
    # of width 1,024 at 128 tokens). The output's gradient can arrive before that re-run (the last
    # Linear of a layer gets it as soon as the backward enters the layer), so the weight's gradient
    # is formed by whichever of the two arrives second. Outside the layers (the head) the input is
    # kept from the forward, which is the only run.
    checkpointed: set[int] = set()

    def not_rerun(tensor: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{sm.model.path.name}: {tensor}'s layer was not run again in the backward pass")

    waiting: dict[int, dict] = {}  # module → this pass's {"pass", and "x" or "d" once each has arrived}

    def weight_grad(mod, tensor, x, g) -> None:
        shape = (mod.out_features, mod.in_features)
        d = g.reshape(-1, mod.out_features).double()
        xs = x.reshape(-1, mod.in_features).double()
        p = pending.get(tensor)
        for lo in range(0, shape[0], HEAD_BLOCK):
            gw = d[:, lo : lo + HEAD_BLOCK].T @ xs
            sq = gw.square()
            add(tensor, None, np.pad(sq.sum(1).numpy(), (lo, shape[0] - lo - sq.shape[0])), sq.sum(0).numpy(), shape)
            if p is not None:  # the embedding's rows: kept to square with its own gradient
                rows = p["rows"]
                inblk = (rows >= lo) & (rows < lo + sq.shape[0])
                p.setdefault("head", torch.zeros(len(rows), shape[1], dtype=torch.float64))[inblk] = gw[rows[inblk] - lo]

    def linear_hook(mod, args, out, tensor):
        x = args[0].detach()  # shares the input's memory (q, k and v see one tensor)
        w = waiting.get(id(mod))
        if w is not None and w["pass"] == sm.passes and "x" not in w:  # the checkpoint's re-run
            if "d" in w:
                weight_grad(mod, tensor, x, w.pop("d"))
                del waiting[id(mod)]
            else:
                w["x"] = x
            return
        if w is not None and "d" in w:  # a gradient that found no re-run: its weight's Fisher would be short
            raise not_rerun(tensor)
        w = {"pass": sm.passes}
        if id(mod) in checkpointed:
            waiting[id(mod)] = w
        else:
            w["x"] = x

        def on_grad(g):
            if "x" in w:
                weight_grad(mod, tensor, w.pop("x"), g.detach())
                waiting.pop(id(mod), None)
            else:
                w["d"] = g.detach()
            return None

        out.register_hook(on_grad)

    def embedding_hook(mod, args, out, tensor):
        ids = args[0]
        rows, inverse = torch.unique(ids, return_inverse=True)
        sub = mod.weight.detach()[rows].clone().requires_grad_(True)
        shape = tuple(mod.weight.shape)
        # the module's own forward (its class's, past the hooks) on its looked-up rows alone: the
        # same output, with a gradient
        # (whose padding row, which gets no gradient, is renumbered with the rest)
        whole, pad = mod._parameters["weight"], mod.padding_idx
        mod._parameters["weight"] = sub
        if pad is not None:
            at = (rows == pad).nonzero()
            mod.padding_idx = int(at[0, 0]) if len(at) else None
        try:
            out2 = type(mod).forward(mod, inverse)
        finally:
            mod._parameters["weight"], mod.padding_idx = whole, pad
        if tensor in pending:
            pending[tensor]["rows"] = rows

        def on_grad(p):
            g = p.grad.detach().double()
            q = pending.get(tensor)
            if q is not None and "head" in q:
                # the head's part on these rows was added as if alone: replace it with the sum's square
                h = q.pop("head")
                corr = (h + g).square() - h.square()
            else:
                corr = g.square()
            add(tensor, rows.numpy(), corr.sum(1).numpy(), corr.sum(0).numpy(), shape)
            p.grad = None

        sub.register_post_accumulate_grad_hook(on_grad)
        return out2

    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in sm.tm.modules() if isinstance(m, GradientCheckpointingLayer)]
    checkpointed.update(id(m) for layer in layers for m in layer.modules())
    for tensor, mods in kinds.items():
        for mod in mods:
            hook = embedding_hook if isinstance(mod, torch.nn.Embedding) else linear_hook
            # ahead of the hook that drops the module's weights
            handles.append(mod.register_forward_hook(lambda m, a, o, t=tensor, hook=hook: hook(m, a, o, t), prepend=True))
    # Backpropagation keeps every layer's activations for the backward pass: at 512 tokens that,
    # not the weights, is most of the memory (measured on the default model: peak RssAnon of one
    # Fisher pass 1,651 MB without, 1,227 MB with). transformers' activation checkpointing keeps each
    # decoder layer's input only and runs the layer again when the backward reaches it (its weights
    # read again by the hooks above). Only the layers are put in training mode, which is what turns
    # it on; their dropout and attention modules stay in eval.
    sm.tm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in layers:
        layer.training = True
    try:
        yield sums
        lost = [t for t, mods in kinds.items() for m in mods if "d" in waiting.get(id(m), {})]
        if lost:
            raise not_rerun(lost[0])
    finally:
        for layer in layers:
            layer.training = False
        sm.tm.activation_checkpointing_disable()
        for h in handles:
            h.remove()
