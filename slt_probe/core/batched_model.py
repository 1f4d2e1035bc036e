"""A model seen as a pure function of a flat parameter vector, evaluated for all chains at once.

Chains are the leading dimension of one flat buffer ``W`` (chains × d). The forward pass
sees per-parameter views of it through ``torch.func.functional_call``, so no module is
copied per step. The user's module is copied once (eval mode, the original untouched).

How the chains are computed is chosen once per model, on its first batch, as the fastest
path that works (``COMPUTE_PATHS``): ``vmap`` over chains, where every
``scaled_dot_product_attention`` call runs once, fused, over chains × batch
(``fused_attention``; the path is named "vmap, fused attention" when the model has such
calls); ``vmap`` with torch's math implementation of attention (materialises every chain's
attention weights); or a loop over chains with one backward pass for all of them
(recurrent layers have no batching rule). Where attention is routed, the fastest of that
path and the loop is kept. All give the same numbers. Not here: which coordinates are sampled
(``parameter_layout``), noise, batching, estimator arithmetic.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import num_examples, take
from .fused_attention import chains_join_the_batch
from .losses import Loss
from .memory_plan import MemoryPlan, SavedBytes, budget, plan
from .parameter_layout import ParameterLayout

_EVAL_CHUNK = 4096
COMPUTE_PATHS = ("vmap", "vmap, fused attention", "vmap, math attention", "loop over chains")
# "auto" tries these in order; the first is renamed "vmap" when no attention was routed
_AUTO_ORDER = ("vmap, fused attention", "vmap, math attention", "loop over chains")
# a fallback path replaces the earlier one only when it is this much faster per step
FALLBACK_MARGIN = 0.8
# precision -> autocast dtype ("tf32" keeps float32 tensors, its matrix products on a GPU's
# tensor cores read 10-bit mantissas)
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "tf32": None}


def select_output(out, output=None) -> Tensor:
    """The prediction in a model's output: ``output`` names it (an index, a key or a
    callable); by default a tensor is itself, a dict or Hugging Face ``ModelOutput`` gives
    its ``"logits"``, a tuple its first element.

    Examples:
        >>> select_output((torch.ones(2), torch.zeros(2))).tolist()
        [1.0, 1.0]
        >>> select_output({"logits": torch.zeros(1), "loss": torch.ones(())}).tolist()
        [0.0]
    """
    if callable(output):
        out = output(out)
    elif output is not None:
        try:
            out = out[output]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"output={output!r} names nothing in the model's output "
                             f"({type(out).__name__})") from err
    elif isinstance(out, Mapping):
        if "logits" not in out:
            raise ValueError(f"the model returns a mapping without 'logits' (keys "
                             f"{list(out)}); name the prediction with output=...")
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model's prediction must be a tensor, got {type(out).__name__}; "
                        "name it with output=... (an index, a key or a callable)")
    return out


@contextlib.contextmanager
def _tf32():
    """TF32 matrix products and convolutions inside, the previous setting restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = matmul.fp32_precision, cudnn.fp32_precision
    matmul.fp32_precision = cudnn.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = previous


class BatchedModel:
    """The user's model as ``loss(W, x, y)`` over chains: a private eval-mode copy whose
    trainable parameters are read from a flat (chains × d) buffer.

    Args:
        model: the user's module (copied once).
        loss: the resolved loss.
        output: which part of the model's output is the prediction (``select_output``).
        compile: compile the batched gradient with ``torch.compile``.
        chain_batch: compute at most this many chains at once; ``"auto"`` (default): as
            many as fit ``max_memory`` (``memory_plan``), planned on the first batch. The
            numbers are those of one group.
        max_memory: the budget for sampling, bytes or a size like ``"8GB"`` (default: a
            fraction of the memory free now); also sizes the evaluation passes.
        precision: ``"float32"`` (default), ``"bfloat16"``/``"float16"`` autocast for the
            forward and backward passes (losses then accumulated in float32/float64), or
            ``"tf32"``: float32 with TF32 matrix products and convolutions (CUDA only).
        device: where to sample (default: where the model's parameters are).
        path: one of ``COMPUTE_PATHS``, or ``"auto"`` (the fastest that works, chosen on
            the first batch).
        exclude_from_copy: objects the model refers to that the private copy must not
            copy (a training framework's trainer, say); the copy refers to None instead.
    """

    def __init__(self, model: nn.Module, loss: Loss, *, output=None, compile: bool = False,
                 chain_batch: int | str | None = "auto", max_memory=None,
                 precision: str = "float32", device=None, path: str = "auto",
                 exclude_from_copy=()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if path != "auto" and path not in COMPUTE_PATHS:
            raise ValueError(f"path must be 'auto' or one of {COMPUTE_PATHS}, got {path!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if chain_batch not in (None, "auto") and (
                isinstance(chain_batch, bool) or not isinstance(chain_batch, int)
                or chain_batch < 1):
            raise ValueError(f"chain_batch must be a positive int, 'auto' or None, got "
                             f"{chain_batch!r}")
        self.layout = ParameterLayout.of(model)
        self.loss = loss
        self.output = output
        self.chain_batch = chain_batch
        self.max_memory = max_memory
        self.memory_plan: MemoryPlan | None = None
        self._planning = chain_batch == "auto" or max_memory is not None
        self._activations: tuple[float, float] | None = None
        self._budget: tuple[int, str] | None = None
        self.largest_pass = 0.0  # bytes of the largest evaluation pass sized so far
        self.autocast_dtype = PRECISIONS[precision]
        self.precision_name = precision
        # Half-precision weights are sampled in float32: SGLD's steps (ε/2·nβ·∇L, √ε·ξ)
        # are far below float16/bfloat16 resolution, which would bias λ̂.
        self.model_dtype = self.layout.dtype
        self.upcast = self.model_dtype in (torch.float16, torch.bfloat16)
        target = torch.device(device) if device is not None else self.layout.device
        if target.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {target} was asked for but CUDA is not available here")
        if precision == "tf32" and target.type != "cuda":
            raise ValueError(f"precision='tf32' is a CUDA setting (tensor-core matrix "
                             f"products); the model is sampled on {target}: use 'float32' "
                             "or 'bfloat16'")
        self.layout = dataclasses.replace(
            self.layout, dtype=torch.float32 if self.upcast else self.layout.dtype,
            device=target)
        self.names, self.shapes, self.dim = self.layout.names, self.layout.shapes, self.layout.dim
        self.device, self.dtype = self.layout.device, self.layout.dtype
        memo = {id(obj): None for obj in exclude_from_copy}
        self.module = copy.deepcopy(model, memo).eval().to(self.device)
        if self.upcast:
            self.module.float()
        for p in self.module.parameters():
            p.requires_grad_(False)
        trainable_names = set(self.names)
        self.frozen = {n: p for n, p in self.module.named_parameters() if n not in trainable_names}
        self.frozen.update(dict(self.module.named_buffers()))
        self.path: str | None = None  # chosen (or checked) on the first batch
        self._candidates = _AUTO_ORDER if path == "auto" else (path,)
        self.path_note = ""
        self.path_timings: dict[str, float] = {}
        self._routed = None  # the attention calls the last batched evaluation routed
        self.compiled = False
        self._compile = compile
        self._compiled_grads = None

    @classmethod
    def for_settings(cls, model: nn.Module, loss: Loss, settings, output=None,
                     exclude_from_copy=()) -> "BatchedModel":
        """The batched model an ``EstimateSettings`` asks for (compiled only on the native
        backend)."""
        return cls(model, loss, output=output, exclude_from_copy=exclude_from_copy,
                   compile=settings.compile and settings.backend == "native",
                   chain_batch=settings.chain_batch, max_memory=settings.max_memory,
                   precision=settings.precision,
                   device=settings.device, path=settings.compute_path)

    # -- parameters -------------------------------------------------------------------
    def flatten(self, model: nn.Module | None = None) -> Tensor:
        """Flat copy of the trainable parameters of ``model`` (default: the wrapped copy)."""
        return self.layout.flatten(model or self.module).to(self.device)

    def load_point(self, state: Mapping[str, Tensor]) -> Tensor:
        """w* from a state_dict with this architecture: its trainable parameters as a flat
        vector (returned), its buffers and frozen parameters copied into the evaluated
        copy (``load_buffers``), so a checkpoint's batch-norm statistics come with it."""
        w_star = self.layout.flatten_state(state)
        self.load_buffers(state)
        return w_star

    def load_buffers(self, state: Mapping[str, Tensor]) -> None:
        """Copy the buffers and frozen parameters of ``state`` (e.g. batch-norm running
        statistics of a checkpoint) into the evaluated copy."""
        with torch.no_grad():
            for k, v in state.items():
                if k in self.frozen:
                    if v.shape != self.frozen[k].shape:
                        raise ValueError(f"state_dict[{k!r}] has shape {tuple(v.shape)}, "
                                         f"expected {tuple(self.frozen[k].shape)}")
                    self.frozen[k].copy_(v)

    def views(self, w: Tensor) -> dict[str, Tensor]:
        return self.layout.views(w)

    # -- evaluation -----------------------------------------------------------------
    def _context(self, batched: bool = True, second_order: bool = False):
        """Settings for evaluating the model: ``batched`` for calls under ``vmap`` over
        chains; ``second_order`` for Hessian products at one w, which take torch's math
        attention where attention is routed (the fused kernels have no second derivative)."""
        stack = contextlib.ExitStack()
        # attention modules' fused inference kernels have no derivative and no batching rule
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, previous)
        if self.path == "vmap, math attention" or (
                second_order and self.path == "vmap, fused attention"):
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        elif batched and self.path == "vmap, fused attention":
            self._routed = stack.enter_context(chains_join_the_batch())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.precision_name == "tf32":
            stack.enter_context(_tf32())
        return stack

    def _forward(self, params: dict[str, Tensor], x) -> Tensor:
        if isinstance(x, Mapping):
            out = functional_call(self.module, (params, self.frozen), (), dict(x))
        else:
            out = functional_call(self.module, (params, self.frozen), (x,))
        out = select_output(out, self.output)
        return out.float() if self.autocast_dtype is not None else out

    def _batch_loss(self, params: dict[str, Tensor], x, y: Tensor) -> Tensor:
        return self.loss.batch(self._forward(params, x), y)

    def _chain_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-chain mean losses from (chains, batch, …) outputs."""
        chains, batch = out.shape[0], out.shape[1]
        if self.loss.vectorised:
            flat_out = out.reshape(chains * batch, *out.shape[2:])
            flat_y = y.reshape(chains * batch, *y.shape[2:])
            return self.loss.per_example(flat_out, flat_y).view(chains, batch).mean(1)
        return vmap(self.loss.batch)(out, y)

    def _grads_vmap(self, w: Tensor, x, y: Tensor) -> tuple[Tensor, Tensor]:
        """vmap only the forward, then one reverse pass for all chains (measured ~30 %
        faster than ``vmap(grad)`` on small models: no per-call functorch wrapping, and the
        loss runs once on the flattened outputs)."""
        leaves = {n: v.detach().requires_grad_() for n, v in self.views(w).items()}
        with torch.enable_grad(), self._context():
            out = vmap(self._forward, in_dims=(0, 0))(leaves, x)
            losses = self._chain_losses(out, y)
            grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in self.names],
                                        allow_unused=True)
        # One strided copy per parameter into the flat buffer (reshape + cat would copy
        # the non-contiguous gradients of batched matmuls twice).
        flat = torch.zeros_like(w) if any(g is None for g in grads) else torch.empty_like(w)
        for view, g in zip(self.views(flat).values(), grads):
            if g is not None:
                view.copy_(g)
        return losses.detach(), flat

    def _grads_loop(self, w: Tensor, x, y: Tensor) -> tuple[Tensor, Tensor]:
        """One forward per chain, one backward for all: for layers without batching rules."""
        leaf = w.detach().requires_grad_()
        with torch.enable_grad(), self._context():
            rows = leaf.unbind(0)  # one stacking backward, not a (chains × d) one per chain
            outs = [self._forward(self.views(rows[c]), take(x, c)) for c in range(len(w))]
            losses = self._chain_losses(torch.stack(outs), y)
            (flat,) = torch.autograd.grad(losses.sum(), [leaf])
        return losses.detach(), flat

    def _grads_functional(self, w: Tensor, x, y: Tensor) -> tuple[Tensor, Tensor]:
        """``vmap(grad)``: the form ``torch.compile`` can trace."""
        grads, losses = vmap(grad_and_value(self._batch_loss), in_dims=(0, 0, 0))(
            self.views(w), x, y)
        flat = torch.cat([grads[n].reshape(w.shape[0], -1) for n in self.names], dim=1)
        return losses, flat

    def _grads(self, w: Tensor, x, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.path == "loop over chains":
            return self._grads_loop(w, x, y)
        if self._compiled_grads is not None:
            return self._compiled_grads(w, x, y)
        return self._grads_vmap(w, x, y)

    def _choose_path(self, w: Tensor, x, y: Tensor) -> None:
        """Try each path on this batch in order. Plain ``vmap`` (no attention routed) is kept
        when it works; otherwise every path that works is timed on these chains and the
        fastest is kept (batching the chains can be slower than a loop over them on a CPU,
        and math attention materialises every chain's attention weights; it is not tried
        where fused attention works, being no lighter)."""
        errors, working = [], []
        for path in self._candidates:
            if path == "vmap, math attention" and "vmap, fused attention" in working:
                continue
            self.path, self._routed = path, None
            try:
                with warnings.catch_warnings():  # a failing attempt's warnings are noise
                    warnings.simplefilter("ignore")
                    self._grads(w[:1], take(x, slice(0, 1)), y[:1])
            except (RuntimeError, NotImplementedError) as err:
                errors.append(f"{path}: {str(err).splitlines()[0][:160]}")
                continue
            if path == "vmap, fused attention" and not (self._routed and self._routed.count):
                path = "vmap"  # nothing to route: the plain path
            working.append(path)
            if path == "vmap":
                break
        if not working:
            self.path = None
            raise RuntimeError(f"the model cannot be evaluated for sampling: {errors[0]}")
        self.path = working[0]
        if len(working) > 1:
            self.path_timings = {p: self._time_path(p, w, x, y) for p in working}
            fastest = min(working, key=self.path_timings.get)
            # a clear margin, so the choice does not flip with a busy machine's noise
            if self.path_timings[fastest] < FALLBACK_MARGIN * self.path_timings[self.path]:
                self.path = fastest
        notes = list(errors)
        if self.path_timings:
            notes.append("timed per step: " + ", ".join(
                f"{p} {t * 1e3:.3g} ms" for p, t in self.path_timings.items()))
        self.path_note = "; ".join(notes)
        if errors:
            warnings.warn(f"this model cannot run with {errors[0].split(':')[0]} "
                          f"({self.path_note}); its chains run as '{self.path}' (same "
                          "numbers, another speed)", RuntimeWarning, stacklevel=4)
        if self._compile and self.path == "vmap":
            self._try_compile()
        elif self._compile:
            # the compiled form is vmap(grad(...)), which the other paths are not
            self.path_note = "; ".join(filter(None, [
                self.path_note, f"compile=True applies to the plain vmap path only; "
                                f"'{self.path}' runs eagerly"]))

    def _time_path(self, path: str, w: Tensor, x, y: Tensor, repeats: int = 2) -> float:
        """Seconds per gradient of all chains on ``path`` (the best of a few, after one
        untimed call); the path in use is left as it was."""
        chosen, self.path = self.path, path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._grads(w, x, y)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    self._grads(w, x, y)
                    times.append(time.perf_counter() - started)
        finally:
            self.path = chosen
        return min(times)

    def loss_and_grad(self, w: Tensor, x, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-chain minibatch losses (chains,) and flat gradients (chains, d) at ``w``.

        ``x`` and ``y`` carry one minibatch per chain on their leading dimension; the
        chains are computed in groups of ``chain_batch`` (planned on the first call).
        """
        if self.path is None and self._planning:
            self.memory_plan = self._plan(w, x, y)
        group = self.group(len(w))
        if self.path is None:
            self._choose_path(w[:group], take(x, slice(0, group)), y[:group])
        if group >= len(w):
            return self._grads(w, x, y)
        parts = [self._grads(w[a:a + group], take(x, slice(a, a + group)), y[a:a + group])
                 for a in range(0, len(w), group)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def group(self, num_chains: int) -> int:
        """How many chains are computed at once."""
        if self.memory_plan is not None:
            return self.memory_plan.chain_batch
        return self.chain_batch if isinstance(self.chain_batch, int) else num_chains

    # -- memory -----------------------------------------------------------------------
    def _measure_activations(self, w: Tensor, x, y: Tensor) -> tuple[float, float]:
        """Bytes autograd keeps for one chain's pass at a single point ``w`` (d,): per
        example and per call, from passes over the first one and two examples."""
        if self._activations is None:
            inputs = list(x.values()) if isinstance(x, Mapping) else [x]
            known = [w, y, *inputs, *self.frozen.values(), *self.module.parameters()]
            totals = []
            for k in (1, 2) if num_examples(x) > 1 else (1,):
                leaf = w.detach().requires_grad_()
                with torch.enable_grad(), self._context(False), SavedBytes(known) as saved:
                    self.loss.per_example(self._forward(self.views(leaf),
                                                        take(x, slice(0, k))), y[:k]).sum()
                totals.append(saved.total)
            per_example = totals[-1] - totals[0] if len(totals) > 1 else totals[0]
            self._activations = (float(max(per_example, 0)),
                                 float(max(totals[0] - per_example, 0)))
        return self._activations

    def _draft(self, w: Tensor, x, y: Tensor, num_chains: int, batch_size: int,
               requested: int | None) -> MemoryPlan:
        if self._budget is None:
            self._budget = budget(self.max_memory, self.device)
        per_example, per_call = self._measure_activations(w, x, y)
        model_bytes = sum(t.numel() * t.element_size() for t in
                          [*self.module.parameters(), *self.module.buffers()])
        return plan(budget_bytes=self._budget[0], budget_source=self._budget[1],
                    model_bytes=model_bytes, dim=self.dim,
                    bytes_per_number=self.dtype.itemsize, activations_per_example=per_example,
                    activations_per_call=per_call, num_chains=num_chains,
                    batch_size=batch_size, requested=requested)

    def _plan(self, w: Tensor, x, y: Tensor) -> MemoryPlan:
        """The plan for sampling ``len(w)`` chains on minibatches like ``x`` (chains, B, …)."""
        first_x, first_y = take(x, 0), y[0]
        requested = self.chain_batch if isinstance(self.chain_batch, int) else None
        return self._draft(w[0], first_x, first_y, len(w), num_examples(first_x), requested)

    def _examples_per_pass(self, w: Tensor, x, y: Tensor, passes: float) -> int:
        """Examples per chain in one evaluation pass at ``w`` ((d,) or (chains, d))."""
        chains = 1 if w.dim() == 1 else len(w)
        cap = max(1, _EVAL_CHUNK // chains)
        if not self._planning:
            return cap
        draft = self.memory_plan or self._draft(w if w.dim() == 1 else w[0], x, y, chains,
                                                1, 1)
        examples = draft.examples_per_pass(chains, passes, cap)
        self.largest_pass = max(self.largest_pass, draft.pass_bytes(
            min(examples, num_examples(x)), chains, passes))
        return examples

    def memory_record(self) -> dict | None:
        """The memory plan and the largest evaluation pass it sized (None unplanned)."""
        return self.memory_plan.to_dict(self.largest_pass) if self.memory_plan else None

    def _try_compile(self) -> None:
        try:
            self._compiled_grads = torch.compile(self._grads_functional, dynamic=False)
            self.compiled = True
        except Exception as err:  # noqa: BLE001 - any backend failure means eager
            warnings.warn(f"torch.compile unavailable ({err}); sampling eagerly", stacklevel=4)

    def losses(self, w: Tensor, x, y: Tensor) -> Tensor:
        """Per-chain minibatch losses at ``w`` (no gradient)."""
        with torch.no_grad(), self._context():
            if self.path == "loop over chains":
                outs = [self._forward(self.views(w[c]), take(x, c)) for c in range(len(w))]
                return self._chain_losses(torch.stack(outs), y)
            return self._chain_losses(vmap(self._forward, in_dims=(0, 0))(self.views(w), x), y)

    def full_losses(self, w: Tensor, x, y: Tensor) -> Tensor:
        """L_n at each chain's ``w`` (chains, d) over all of ``(x, y)``, chunked."""
        total = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        n = num_examples(x)
        chunk = self._examples_per_pass(w, x, y, passes=1)
        with torch.no_grad(), self._context():
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                xb, yb = take(x, part), y[part]
                size = num_examples(xb)
                if self.path == "loop over chains":
                    values = torch.stack([self.loss.batch(self._forward(self.views(w[c]), xb), yb)
                                          for c in range(w.shape[0])])
                else:
                    values = vmap(self._batch_loss, in_dims=(0, None, None))(
                        self.views(w), xb, yb)
                total += values.double() * size
        return total / n

    def _sum_over_chunks(self, w: Tensor, x, y: Tensor, derivative, shape=None,
                         second_order: bool = False) -> Tensor:
        """Mean over all of ``(x, y)`` of ``derivative(summed chunk loss, leaf)`` at a single
        point ``w`` (d,), chunked (float64); ``shape`` of what it returns (default (d,))."""
        total = torch.zeros(shape or (self.dim,), dtype=torch.float64, device=w.device)
        n = num_examples(x)
        chunk = self._examples_per_pass(w, x, y, passes=4 if second_order else 2)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            leaf = w.detach().requires_grad_()
            with torch.enable_grad(), self._context(False, second_order):
                value = self.loss.per_example(self._forward(self.views(leaf), take(x, part)),
                                              y[part]).sum()
                result = derivative(value, leaf)
            if result is not None:
                total += result.double()
        return total / n

    def full_gradient(self, w: Tensor, x, y: Tensor) -> Tensor:
        """∇L_n at a single point ``w`` (d,) over all of ``(x, y)``, chunked (float64)."""
        return self._sum_over_chunks(
            w, x, y, lambda value, leaf: torch.autograd.grad(value, [leaf],
                                                             allow_unused=True)[0])

    def hessian_vector_product(self, w: Tensor, v: Tensor, x, y: Tensor) -> Tensor:
        """∇²L_n(w)·v at a single point ``w`` (d,) over all of ``(x, y)``, chunked (float64).

        Exact (double backward) where every layer has a second derivative; otherwise the
        central difference of two gradients at w ± δv, which on a loss with kinks reads the
        curvature at the scale δ rather than at a point."""
        direction = v.to(w.dtype)

        def exact(value, leaf):
            (grad,) = torch.autograd.grad(value, [leaf], create_graph=True)
            return torch.autograd.grad(grad @ direction, [leaf], allow_unused=True)[0]

        try:
            return self._sum_over_chunks(w, x, y, exact, second_order=True)
        except (RuntimeError, NotImplementedError):
            norm = float(v.norm())
            if norm == 0:
                return torch.zeros(self.dim, dtype=torch.float64, device=w.device)
            delta = 1e-3 * (1.0 + float(w.norm())) / norm
            step = (delta * v).to(w.dtype)
            return (self.full_gradient(w + step, x, y)
                    - self.full_gradient(w - step, x, y)) / (2 * delta)

    def hessian_matrix_product(self, w: Tensor, vectors: Tensor, x, y: Tensor) -> Tensor:
        """∇²L_n(w)·V for the columns of ``vectors`` (d, k) at once over all of ``(x, y)``
        (float64, (d, k)): one double-backward pass per chunk batched over the columns,
        column by column where a layer has no batching rule for it."""
        basis = vectors.to(w.dtype).T.contiguous()

        def batched(value, leaf):
            (grad,) = torch.autograd.grad(value, [leaf], create_graph=True)
            return torch.autograd.grad(grad, [leaf], grad_outputs=basis,
                                       is_grads_batched=True, allow_unused=True)[0]

        try:
            return self._sum_over_chunks(w, x, y, batched, shape=(len(basis), self.dim),
                                         second_order=True).T
        except (RuntimeError, NotImplementedError):
            return torch.stack([self.hessian_vector_product(w, column, x, y)
                                for column in vectors.T], dim=1)

    def mean_hessian_product(self, w: Tensor, vectors: Tensor, source) -> Tensor:
        """∇²L_n(w)·V (d, k) over every chunk of a data ``source`` (float64)."""
        total = torch.zeros(self.dim, vectors.shape[1], dtype=torch.float64, device=w.device)
        for xb, yb in source.chunks():
            xb, yb = self.inputs(xb), yb.to(self.device)
            total += self.hessian_matrix_product(w, vectors, xb, yb) * len(yb)
        return total / source.n

    def inputs(self, x):
        """``x`` on the model's device, in float32 where half-precision weights are
        sampled in float32."""
        if isinstance(x, Mapping):
            return {k: self.inputs(v) for k, v in x.items()}
        x = x.to(self.device)
        if self.upcast and x.dtype == self.model_dtype:
            x = x.float()
        return x

    @property
    def precision(self) -> str:
        if self.upcast:
            return f"float32 (the model's {self.model_dtype} weights are sampled in float32)"
        if self.autocast_dtype is not None:
            return (f"{self.precision_name} autocast for forward and backward; weights, steps "
                    "and losses in float32/float64")
        if self.precision_name == "tf32":
            return "float32 with TF32 matrix products and convolutions"
        return str(self.dtype).replace("torch.", "")

    def output_sample(self, w: Tensor, x) -> Tensor:
        """The model's output on the first few examples at ``w`` (d,): its shape and dtype.
        Raises a named TypeError when the data's dtype does not match the model's."""
        first = next(iter(x.values())) if isinstance(x, Mapping) else x
        if first.dtype.is_floating_point and first.dtype != self.dtype:
            raise TypeError(f"the model's parameters are {self.dtype} but the data x is "
                            f"{first.dtype}; convert one of them (e.g. x.to({self.dtype}) or "
                            f"model.to({first.dtype}))")
        with torch.no_grad(), self._context(batched=False):
            return self._forward(self.views(w), take(x, slice(0, 2)))

    def per_example_losses(self, w: Tensor, x, y: Tensor) -> Tensor:
        """Loss of every example at a single point ``w`` (d,), float64, shape (n,)."""
        out = []
        n = num_examples(x)
        chunk = self._examples_per_pass(w, x, y, passes=1)
        with torch.no_grad(), self._context(batched=False):
            views = self.views(w)
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                values = self.loss.per_example(self._forward(views, take(x, part)), y[part])
                if values.shape != (len(y[part]),):
                    raise ValueError("loss_fn must reduce to one value per example; per-example "
                                     f"losses came back with shape {tuple(values.shape)}")
                out.append(values.double())
        losses = torch.cat(out)
        if not math.isfinite(float(losses.mean())):
            raise ValueError("the loss at the given model is NaN or inf; check the model and data")
        return losses
