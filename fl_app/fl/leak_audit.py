"""Leak audit: record (and optionally restrict) everything a site's client sends, and the DP optimiser's
released gradients, so that a test -- or a hospital's IT -- can check that every tensor leaving the site
came out of the DP mechanism.

* :class:`ResultAuditFilter` is an NVFlare ``Filter``. Added as a client *task result* filter it sees each
  result exactly as it leaves the client (after the job's own filters): it writes the DXO (kind, every
  tensor, its meta incl. metrics) and the headers to ``<out_dir>/<site>/result_<n>.pt``; as a *task data*
  filter it records what the site received (``data_<n>.pt``). With ``allowed_metrics`` set it also
  removes any metric not in the list (a site-side allow-list).
* :func:`enable_optimizer_audit` (used by :class:`fl_app.fl.local_dp.SiteDP` when
  ``$SYNTHBRAIN_DP_AUDIT_DIR`` is set) records, for every DP-SGD step, the gradients the Opacus
  ``DPOptimizer`` hands to the underlying optimiser (clipped per sample, summed, noised, averaged), and the
  underlying optimiser's state at the start of each round: the audit can then *replay* the round from
  the received weights and these released gradients alone and must obtain exactly the update that was
  sent (:func:`replay_round`).
* :func:`finetune_release_problems`: for a job that fine-tunes a declared subset from the public checkpoint
  (``profile.finetune``): every tensor that left the site is in the subset and was optimised by the DP
  optimiser (so the accountant covers it), and every frozen tensor the site holds is byte-identical to the
  checkpoint.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

__all__ = [
    "AUDIT_ENV",
    "ResultAuditFilter",
    "enable_optimizer_audit",
    "finetune_release_problems",
    "replay_round",
]

AUDIT_ENV = "SYNTHBRAIN_DP_AUDIT_DIR"


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    return copy.deepcopy(v)


class ResultAuditFilter(Filter):
    """Record every task result (or task data) passing through; optionally enforce a metrics allow-list.

    Args:
        out_dir: where to write the records (one folder per site).
        direction: ``"result"`` (outgoing) or ``"data"`` (incoming); only names the files.
        allowed_metrics: if given, metrics outside this list are removed before the result leaves.
    """

    def __init__(
        self, out_dir: str, direction: str = "result", allowed_metrics: list[str] | None = None
    ) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.direction = direction
        self.allowed_metrics = allowed_metrics
        self._n = 0

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name() or "unknown"
        rec: dict[str, Any] = {
            "headers": {k: repr(v) for k, v in (shareable.get("__headers__") or {}).items()}
        }
        rec["return_code"] = shareable.get_return_code()
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # an error reply carries no DXO
            rec["dxo"] = None
            rec["error"] = repr(exc)
        else:
            metrics = dxo.meta.get("initial_metrics")
            if self.allowed_metrics is not None and isinstance(metrics, dict):
                dropped = sorted(set(metrics) - set(self.allowed_metrics))
                if dropped:
                    for k in dropped:
                        metrics.pop(k)
                    self.log_warning(fl_ctx, f"audit filter removed metrics not on the allow-list: {dropped}")
                    shareable = dxo.update_shareable(shareable)
            rec["dxo"] = {
                "data_kind": dxo.data_kind,
                "data": {k: _cpu(torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v)
                         for k, v in (dxo.data or {}).items()},
                "meta": {k: _cpu(v) for k, v in dxo.meta.items()},
            }  # fmt: skip
        d = Path(self.out_dir) / site
        d.mkdir(parents=True, exist_ok=True)
        torch.save(rec, d / f"{self.direction}_{self._n:03d}.pt")
        self._n += 1
        return shareable


def enable_optimizer_audit(dp_optimizer: Any, named_params: dict[int, str], out_dir: str | Path) -> Any:
    """Record what a Opacus ``DPOptimizer`` releases to its underlying optimiser, step by step.

    Args:
        dp_optimizer: the ``DPOptimizer`` from ``make_private``.
        named_params: ``id(parameter) -> name`` of the (unwrapped) model.
        out_dir: records go to ``out_dir/steps_<round>.pt`` via the returned object's ``flush(round)``.

    Returns:
        an object with ``flush(round_num)`` writing the round's record (start optimiser state, the
        optimiser's parameter order by name, and each step's released gradients).
    """
    inner = dp_optimizer.original_optimizer
    order = [named_params[id(p)] for g in inner.param_groups for p in g["params"]]
    orig_step = inner.step

    class _Rec:
        def __init__(self) -> None:
            self.start_state: dict | None = None
            self.steps: list[dict[str, torch.Tensor]] = []
            self.step_lrs: list[list[float]] = []  # each step's learning rates (schedules, warm-up)

        def flush(self, round_num: int) -> None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"optimizer": type(inner).__name__, "param_order": order, "start_state": self.start_state,
                 "steps": self.steps, "step_lrs": self.step_lrs, "noise_multiplier": dp_optimizer.noise_multiplier,
                 "max_grad_norm": dp_optimizer.max_grad_norm,
                 "expected_batch_size": dp_optimizer.expected_batch_size},
                out / f"steps_{int(round_num):03d}.pt",
            )  # fmt: skip
            self.start_state = None
            self.steps = []
            self.step_lrs = []

    rec = _Rec()

    def step(*args: Any, **kwargs: Any) -> Any:
        if rec.start_state is None:
            rec.start_state = copy.deepcopy(inner.state_dict())
        grads = {}
        for g in inner.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    grads[named_params[id(p)]] = p.grad.detach().cpu().clone()
        rec.steps.append(grads)
        rec.step_lrs.append([float(g["lr"]) for g in inner.param_groups])
        return orig_step(*args, **kwargs)

    inner.step = step
    return rec


def replay_round(received: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Re-run a round's optimiser steps from the received weights and the *released* gradients only.

    Args:
        received: the global weights the site received (``{name: tensor}``, parameters and buffers).
        record: a ``steps_<round>.pt`` record of :func:`enable_optimizer_audit`.

    Returns:
        the weights after the replayed steps (buffers as received): their difference to ``received``
        must equal the update the site sent if nothing but the DP optimiser changed the model.
    """
    params = {k: received[k].detach().clone().float().requires_grad_(True) for k in record["param_order"]}
    cls = getattr(torch.optim, record["optimizer"])
    state = record["start_state"]
    if state is None:  # no step taken this round
        return {k: v.detach().clone() for k, v in received.items()}
    groups, i = [], 0
    for g in state["param_groups"]:
        n = len(g["params"])
        hp = {k: v for k, v in g.items() if k != "params"}
        groups.append({"params": [params[record["param_order"][j]] for j in range(i, i + n)], **hp})
        i += n
    opt = cls(groups)
    opt.load_state_dict(state)
    step_lrs = record.get("step_lrs") or [None] * len(record["steps"])
    for grads, lrs in zip(record["steps"], step_lrs, strict=True):
        if lrs is not None:  # the learning rate the site used at this step (warm-up, schedules)
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for k, p in params.items():
            if k in grads:
                p.grad = grads[k].clone()
        opt.step()
    out = {k: v.detach().clone() for k, v in received.items()}
    out.update({k: p.detach().clone() for k, p in params.items()})
    return out


def finetune_release_problems(
    sent: dict[str, Any],
    received: dict[str, torch.Tensor],
    checkpoint: dict[str, torch.Tensor],
    trainable: list[str],
    record: dict[str, Any] | None = None,
) -> list[str]:
    """What is wrong with one round's release of a fine-tuning job (empty list: nothing).

    Args:
        sent: the tensors the site sent (a :class:`ResultAuditFilter` record's ``dxo["data"]``).
        received: the global model the site received that round (``{name: tensor}``).
        checkpoint: the public checkpoint the job started from (``{name: tensor}``).
        trainable: the job's declared trainable parameter names.
        record: the round's :func:`enable_optimizer_audit` record (DP sites): every sent tensor must be one
            the DP optimiser updated, i.e. one the accountant covers.

    Returns:
        one line per problem: a tensor outside the subset left the site; a sent tensor was not optimised by
        the DP optimiser; a frozen tensor differs (in bytes, dtype or shape) from the checkpoint.
    """
    keep = set(trainable)
    problems = [
        f"{k}: left the site but is not a declared trainable tensor" for k in sorted(set(sent) - keep)
    ]
    if record is not None:
        covered = set(record["param_order"])
        problems += [f"{k}: sent but not updated by the DP optimiser (not covered by the accountant)"
                     for k in sorted(set(sent) - covered)]  # fmt: skip
    for k, v in received.items():
        if k in keep:
            continue
        ref = checkpoint.get(k)
        t = torch.as_tensor(v)
        if ref is None or ref.dtype != t.dtype or ref.shape != t.shape or not torch.equal(ref.cpu(), t.cpu()):
            problems.append(f"{k}: frozen but not byte-identical to the checkpoint")
    return problems


def audit_dir() -> str | None:
    """``$SYNTHBRAIN_DP_AUDIT_DIR`` if set (audit mode of the site clients), else None."""
    return os.environ.get(AUDIT_ENV) or None
