"""``verify``: a torch training step and its migration side by side, with a float64 referee.

A float32 run of torch and one of JAX can disagree for two reasons: a translation error, or
round-off that the model amplifies. Some parameters have a gradient that is zero in exact
arithmetic: an attention key bias (softmax ignores a shift shared by all keys of a query; so does
the key third of ``nn.MultiheadAttention.in_proj_bias``). In float32 their gradient is round-off,
Adam divides it by its own square root and takes lr-sized steps in a direction each framework's
round-off picks, and a bias that starts at zero then shows relative errors of 1 to 2 between the
frameworks. Neither run is wrong; torch's float32 run is as far from the exact answer as JAX's.

So besides comparing the two float32 runs (the bars of :mod:`mlperf_tutor.core.parity`), ``verify``
runs torch in float64 (a double copy of model, optimizer state and batches) as the referee and the
migrated step in float64 too (a second migration of the double model under ``jax.enable_x64``),
and measures each float32 run's deviation from torch's float64 run. A parameter passes a step when

* its relative error against torch's float32 run is at most ``STEP_RTOL`` (the plain bar), or
* ``dev(jax32) <= REFEREE_FACTOR * dev(torch32) + REFEREE_FLOOR`` (the referee's rule), where
  ``dev(run) = ||run - torch64|| / ||torch64||`` after the step: the port is no further from the
  float64 answer than torch's own float32 run is (within a factor of 10, plus 1e-6).

The loss passes a step when ``|jax32 - torch32| <= OUTPUT_ATOL`` or, with the same rule in absolute
terms, ``|jax32 - torch64| <= REFEREE_FACTOR * |torch32 - torch64| + REFEREE_FLOOR``. A planted
translation error (tanh GELU for the exact one, a wrong LayerNorm eps, a dropped bias) moves the
port far from the float64 answer while torch stays near it, so it still fails.

The report names the round-off-only parameters: those whose float32 gradient in torch differs
from the float64 gradient by at least the float64 gradient's own size (it is mostly round-off), or
whose float32 torch run ends farther than ``STEP_RTOL`` from the float64 one.

Randomness: dropout masks cannot be equal across frameworks, so ``verify`` turns every random op
off in both runs and lists them. Rates held by modules are set to 0 (``nn.Dropout*``,
``nn.MultiheadAttention``'s and the recurrent layers' ``dropout``, float rate attributes such as
transformers' ``drop_prob``); dropout calls with a literal rate (``F.dropout(x, 0.1,
training=True)``) and attention dropout run with rate 0 (a ``TorchFunctionMode`` in torch, the
interpreter's ``random_off`` in JAX). Random numbers that no rate switches off (stochastic depth
from ``torch.rand`` or ``bernoulli_``) put the innermost module that draws them in eval mode in both
runs (only its own ``training`` flag, not its children's), which is how such code skips them; if
the numbers are still drawn then, or the model's own forward or ``loss_fn`` draws them (neither
has a module to put in eval mode), ``verify`` refuses, naming the op and the source line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable

import numpy as np

from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, VerificationError
from mlperf_tutor.frameworks import require

REFEREE_FACTOR = 10.0  # the port may deviate from float64 this many times more than torch does
REFEREE_FLOOR = 1e-6  # ... plus this (relative for parameters, absolute for the loss)
# Float attributes that hold a dropout or drop-path rate in common model code (transformers,
# timm-style blocks); verify sets them to 0 as it does nn.Dropout's p.
RATE_ATTRIBUTES = (
    "dropout",
    "dropout_p",
    "dropout_rate",
    "attention_dropout",
    "attn_dropout",
    "activation_dropout",
    "hidden_dropout",
    "drop_prob",
    "drop_path",
    "drop_path_rate",
    "drop_rate",
    "layerdrop",
)


def _without_dropout(model) -> list[str]:
    """Set every dropout rate held by the model's modules to 0 in place: ``nn.Dropout*``'s
    ``p``, and float attributes named in :data:`RATE_ATTRIBUTES` (``nn.MultiheadAttention``
    and ``nn.LSTM``/``nn.GRU``'s ``dropout``, transformers' ``drop_prob``, ...). Returns the
    names of those that had one, with the attribute."""
    import torch

    changed = []
    for name, module in model.named_modules():
        label = name or "(model)"
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed.append(label)
            continue
        for attribute in RATE_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float) and value > 0:
                setattr(module, attribute, 0.0)
                changed.append(f"{label} ({attribute})")
    return changed


def _dropout_off_mode():
    """A ``TorchFunctionMode`` that runs ``F.dropout``/``torch.dropout`` as the identity and
    attention with ``dropout_p=0``: the torch side of the interpreter's ``random_off``."""
    import torch
    import torch.nn.functional as F

    identity = {F.dropout, torch.dropout, torch.dropout_}
    attention = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}

    class DropoutOff(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in identity:
                return args[0] if args else kwargs["input"]
            if func in attention:
                if len(args) > 4:
                    args = (*args[:4], 0.0, *args[5:])
                else:
                    kwargs["dropout_p"] = 0.0
            return func(*args, **kwargs)

    return DropoutOff()


def _x64():
    """The context in which jax computes in float64."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def _random_sites(migrated) -> list[tuple[str, str, str | None]]:
    return migrated.translation._train.random_sites()


def _switch_off_randomness(model, optimizer, loss_fn, batch, scheduler, migrate):
    """Migrate the (copied) model with every random op turned off; see the module docstring.

    Returns (migrated, the random sites that run with rate 0, modules put in eval mode)."""
    from mlperf_tutor.migrate.aten_random_ops import RANDOM_OFF

    migrated = migrate(model, optimizer, loss_fn, batch, scheduler)
    modules = dict(model.named_modules())
    evaluated: list[str] = []
    for _ in range(2):  # at most one round of eval flags, then a check
        stuck = [s for s in _random_sites(migrated) if s[0] not in RANDOM_OFF]
        if not stuck:
            break
        # The model itself cannot be put in eval mode: export trains a model in eval mode.
        outside = [s for s in stuck if not s[2] or s[2] in evaluated]
        if outside or evaluated:
            op, where, path = (outside or stuck)[0]
            how = {
                None: "loss_fn draws them outside the model",
                "": "the model's own forward draws them (verify can put a submodule in eval "
                "mode, not the model itself)",
            }.get(path, f"module '{path}' draws them even in eval mode")
            raise VerificationError(
                f"verify cannot turn off the random op {op} at {where}: {how}. Torch and JAX "
                "cannot draw the same numbers, so the runs cannot be compared; draw them only "
                "when self.training is true (as stochastic depth and F.dropout(..., "
                "training=self.training) do), or verify a loss_fn without them"
            )
        for _, _, path in stuck:
            if path not in evaluated:
                modules[path].training = False
                evaluated.append(path)
        migrated = migrate(model, optimizer, loss_fn, batch, scheduler)
    for graph in (migrated.translation._train, migrated.translation._eval):
        graph.random_off = True
    sites = [f"{op} in {p or 'loss_fn'} ({where})" for op, where, p in _random_sites(migrated)]
    return migrated, sites, evaluated


def _as_double(batch):
    import torch
    from torch.utils import _pytree as pytree

    def leaf(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.double()
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            return x.astype(np.float64)
        return x

    return pytree.tree_map(leaf, batch)


def _double(model, optimizer, scheduler):
    """A float64 deep copy of model, optimizer (its float state too) and scheduler."""
    import torch

    model, optimizer, scheduler = copy.deepcopy((model, optimizer, scheduler))
    model.double()  # in place: the optimizer keeps pointing at the same Parameter objects
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim:
                state[key] = value.double()
    return model, optimizer, scheduler


@dataclasses.dataclass(frozen=True)
class _StepOptions:
    """What the user's torch step does besides model + optimizer + scheduler (the keyword
    options of :func:`~mlperf_tutor.migrate.torch_to_jax`), done the same way on both sides."""

    clip_grad_norm: float | None = None
    accumulate: int = 1
    autocast: str | None = None

    def migrate(self, migrate_fn: Callable) -> Callable:
        return functools.partial(migrate_fn, **dataclasses.asdict(self))

    def torch_step(self, model, optimizer, scheduler, loss_fn, batch, mode) -> float:
        """``accumulate`` backward passes of ``loss / k`` over ``tensor.chunk(k)`` micro-batches
        (under ``torch.autocast`` when asked), ``clip_grad_norm_`` over the optimizer's
        parameters, ``optimizer.step()``, ``scheduler.step()``; returns the mean loss."""
        import torch
        from torch.utils import _pytree as pytree

        from mlperf_tutor.migrate.export import AUTOCAST_DTYPES, _as_torch

        batch = _as_torch(batch)
        k = self.accumulate
        leaves, spec = pytree.tree_flatten(batch)
        chunks = [
            leaf.chunk(k) if isinstance(leaf, torch.Tensor) else [leaf] * k for leaf in leaves
        ]
        optimizer.zero_grad()
        total = 0.0
        for i in range(k):
            micro = pytree.tree_unflatten([c[i] for c in chunks], spec)
            cast = (
                torch.autocast("cpu", dtype=AUTOCAST_DTYPES[self.autocast])
                if self.autocast
                else contextlib.nullcontext()
            )
            with mode, cast:
                loss = loss_fn(model, micro)
            (loss / k).backward()
            total += float(loss.detach())
        if self.clip_grad_norm is not None:
            held = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(held, self.clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return total / k


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclasses.dataclass
class VerifyReport:
    """Per-step comparison of a torch training step and its migration.

    Attributes:
        rows: per step: torch loss, jax loss, |difference|, the worst parameter's relative
            error against torch's float32 run (after the step) and its name; with the referee
            also that parameter's deviation from torch's float64 run in torch float32
            ("torch dev") and in the port ("jax dev"), the largest relative gap between the two
            float64 runs over the parameters that are not round-off-only ("f64 gap"), and
            whether every parameter and the loss passed ("ok").
        dropout_off: modules (and attributes) whose dropout rate verify set to 0 in both.
        referee: whether the float64 referee judged (False: the plain bars only).
        roundoff: the round-off-only parameters (see :mod:`.verify`).
        failures: "step N: name (...)" for every parameter or loss that failed.
        random_off: random ops of the graph that ran with rate 0 in both.
        eval_modules: modules put in eval mode in both to skip their random numbers.
        referee_error: why the float64 runs could not be made (then the plain bars judge).
    """

    rows: list[dict]
    dropout_off: list[str]
    referee: bool = False
    roundoff: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    random_off: list[str] = dataclasses.field(default_factory=list)
    eval_modules: list[str] = dataclasses.field(default_factory=list)
    referee_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def __str__(self) -> str:
        head = (
            f"{'step':>4}  {'torch loss':>12}  {'jax loss':>12}  {'|diff|':>9}  "
            f"{'worst param rel':>15}"
        )
        if self.referee:
            head += f"  {'torch dev':>9}  {'jax dev':>9}  {'f64 gap':>9}"
        lines = [head + "  worst param"]
        for r in self.rows:
            line = (
                f"{r['step']:>4}  {r['torch loss']:>12.6f}  {r['jax loss']:>12.6f}  "
                f"{r['loss diff']:>9.2e}  {r['worst rel']:>15.2e}"
            )
            if self.referee:
                line += f"  {r['torch dev']:>9.2e}  {r['jax dev']:>9.2e}  {r['f64 gap']:>9.2e}"
            lines.append(f"{line}  {r['worst param']}")
        if self.dropout_off:
            lines.append(f"dropout set to 0 in both for: {', '.join(self.dropout_off)}")
        if self.random_off:
            lines.append(f"random ops run with rate 0 in both: {'; '.join(self.random_off)}")
        if self.eval_modules:
            lines.append(
                "eval mode in both (they draw random numbers no rate switches off): "
                + ", ".join(self.eval_modules)
            )
        if self.roundoff:
            lines.append(
                "round-off-only parameters (float32 is mostly round-off for them; judged by the "
                f"float64 referee): {', '.join(self.roundoff)}"
            )
        if self.referee_error:
            lines.append(f"no float64 referee ({self.referee_error}); plain bars only")
        for failure in self.failures[:10]:
            lines.append(f"failed: {failure}")
        if len(self.failures) > 10:
            lines.append(f"... and {len(self.failures) - 10} more failures")
        bars = f"loss max-abs <= {OUTPUT_ATOL:g}, parameters relative <= {STEP_RTOL:g}"
        if self.referee:
            bars += (
                f"; or, against torch float64: jax dev <= {REFEREE_FACTOR:g} x torch dev + "
                f"{REFEREE_FLOOR:g}"
            )
        lines.append(f"{'PASS' if self.ok else 'FAIL'} (bars: {bars})")
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("step")


def verify(
    model,
    optimizer,
    loss_fn: Callable,
    batches: Iterable,
    scheduler=None,
    *,
    quiet: bool = False,
    raise_on_failure: bool = True,
    referee: bool = True,
    clip_grad_norm: float | None = None,
    accumulate: int = 1,
    autocast: str | None = None,
) -> VerifyReport:
    """Run the torch step and its migration side by side and compare every step.

    Works on deep copies: ``model``, ``optimizer`` and ``scheduler`` are left untouched. Each
    step is ``loss_fn(model, batch).backward(); optimizer.step(); scheduler.step()`` in torch
    (with the recipe's ``clip_grad_norm``, ``accumulate`` and ``autocast`` when given: see
    :func:`~mlperf_tutor.migrate.torch_to_jax`, which gets the same options) and the migrated
    ``step`` in JAX, from the same state. Random ops are turned off in both
    and listed (see :mod:`mlperf_tutor.migrate.verify`).

    Args:
        model, optimizer, loss_fn, scheduler: as for
            :func:`~mlperf_tutor.migrate.torch_to_jax`.
        batches: the batches, one per step (dicts/tuples of numpy arrays or tensors).
        quiet: do not print the table.
        raise_on_failure: raise :class:`VerificationError` when a step fails; otherwise just
            return the report.
        referee: judge with the float64 referee (torch float64 and JAX x64 runs beside the
            float32 ones): a parameter passes within ``STEP_RTOL`` of torch float32, or when its
            deviation from torch float64 is at most ``REFEREE_FACTOR`` (10) times torch float32's
            plus ``REFEREE_FLOOR`` (1e-6). False: the plain bars of
            :mod:`mlperf_tutor.core.parity` only (loss max-abs ``OUTPUT_ATOL``, parameters
            relative ``STEP_RTOL``).
        clip_grad_norm, accumulate, autocast: the step options of
            :func:`~mlperf_tutor.migrate.torch_to_jax`, applied to both runs.

    Raises:
        VerificationError: a step failed (with ``raise_on_failure``), or a random op cannot be
            turned off for the comparison (named, with its source line).
    """
    import mlperf_tutor.migrate as migrate

    for adapter in require("mlperf_tutor.migrate.verify", "torch", "jax"):
        adapter.pin_precision()
    options = _StepOptions(clip_grad_norm, accumulate, autocast)
    model, optimizer, scheduler = copy.deepcopy((model, optimizer, scheduler))
    dropout_off = _without_dropout(model)
    batches = list(batches)
    # Looked up at call time, so tests can plant a faulty migration.
    migrated, random_off, eval_modules = _switch_off_randomness(
        model, optimizer, loss_fn, batches[0], scheduler, options.migrate(migrate.torch_to_jax)
    )
    ref = None
    referee_error = None
    if referee:
        try:
            ref = _Referee(
                model, optimizer, scheduler, loss_fn, batches[0], migrate.torch_to_jax, options
            )
        except Exception as error:  # a model that cannot run in float64: plain bars only
            referee_error = f"{type(error).__name__}: {error}"
    named = dict(model.named_parameters())
    rows, failures, roundoff = [], [], set()
    for step, batch in enumerate(batches):
        torch_loss = options.torch_step(
            model, optimizer, scheduler, loss_fn, batch, _dropout_off_mode()
        )
        grads32 = {n: p.grad.double().numpy() for n, p in named.items() if p.grad is not None}
        jax_loss = migrated.run(batch)
        row = {"step": step, "torch loss": torch_loss, "jax loss": jax_loss}
        row["loss diff"] = abs(torch_loss - jax_loss)
        loss_ok = row["loss diff"] <= OUTPUT_ATOL
        if ref is not None:
            ref_loss = ref.step(batch)
            judged = REFEREE_FACTOR * abs(torch_loss - ref_loss) + REFEREE_FLOOR
            loss_ok = loss_ok or abs(jax_loss - ref_loss) <= judged
        if not loss_ok:
            failures.append(f"step {step}: loss (|diff| {row['loss diff']:.2e})")
        worst, worst_name, worst_devs, gap, params_ok = -1.0, "", (0.0, 0.0), 0.0, True
        for name, value in migrated.params.items():
            got, want = np.asarray(value, np.float64), named[name].detach().double().numpy()
            rel = _rel(got, want)
            ok = rel <= STEP_RTOL
            devs = (0.0, 0.0)
            if ref is not None:
                exact = ref.param(name)
                devs = (_rel(want, exact), _rel(got, exact))
                g64 = ref.grad(name)
                if devs[0] > STEP_RTOL or (
                    g64 is not None
                    and name in grads32
                    and np.linalg.norm(grads32[name] - g64) >= np.linalg.norm(g64)
                ):
                    roundoff.add(name)
                if name not in roundoff:
                    gap = max(gap, _rel(ref.jax_param(name), exact))
                ok = ok or devs[1] <= REFEREE_FACTOR * devs[0] + REFEREE_FLOOR
            if not ok:
                params_ok = False
                failures.append(
                    f"step {step}: {name} (rel {rel:.2e}"
                    + (f", torch dev {devs[0]:.2e}, jax dev {devs[1]:.2e})" if ref else ")")
                )
            if rel > worst:
                worst, worst_name, worst_devs = rel, name, devs
        row.update({"worst rel": worst, "worst param": worst_name})
        if ref is not None:
            row.update({"torch dev": worst_devs[0], "jax dev": worst_devs[1], "f64 gap": gap})
        row["ok"] = loss_ok and params_ok
        rows.append(row)
    report = VerifyReport(
        rows,
        dropout_off,
        referee=ref is not None,
        roundoff=sorted(roundoff),
        failures=failures,
        random_off=random_off,
        eval_modules=eval_modules,
        referee_error=referee_error,
    )
    if not quiet:
        print(report)
    if raise_on_failure and not report.ok:
        raise VerificationError(f"the migrated step diverged from torch:\n{report}")
    return report


class _Referee:
    """The float64 runs: torch on a double copy, and its migration under ``jax.enable_x64``."""

    def __init__(self, model, optimizer, scheduler, loss_fn, batch, migrate_fn, options):
        self.model, self.optimizer, self.scheduler = _double(model, optimizer, scheduler)
        self.loss_fn = loss_fn
        self.options = options
        self.named = dict(self.model.named_parameters())
        with _x64():
            self.migrated = options.migrate(migrate_fn)(
                self.model, self.optimizer, loss_fn, _as_double(batch), self.scheduler
            )
            for graph in (self.migrated.translation._train, self.migrated.translation._eval):
                graph.random_off = True

    def step(self, batch) -> float:
        batch = _as_double(batch)
        loss = self.options.torch_step(
            self.model, self.optimizer, self.scheduler, self.loss_fn, batch, _dropout_off_mode()
        )
        with _x64():
            self.migrated.run(batch)
        return loss

    def param(self, name: str) -> np.ndarray:
        return self.named[name].detach().numpy()

    def grad(self, name: str) -> np.ndarray | None:
        grad = self.named[name].grad
        return None if grad is None else grad.detach().numpy()

    def jax_param(self, name: str) -> np.ndarray:
        return np.asarray(self.migrated.params[name])
