"""Gradient inversion: rebuild a client's training batch from the gradient its update implies.

Three attacks, all matching a dummy batch's gradient to the observed one on the entries the
server could read (unread entries simply drop out of the distance):

* ``dlg``: *Deep Leakage from Gradients* (Zhu et al. 2019): L-BFGS on the dummy inputs and
  dummy soft labels together, minimizing the squared distance of the gradients.
* ``idlg``: *improved DLG* (Zhao et al. 2020): the labels first, read off the last layer's
  gradient (for cross-entropy the true class's row is the negative one), then DLG on the inputs.
* ``cosine``: *Inverting Gradients* (Geiping et al. 2020): labels as in iDLG, then signed Adam
  on the inputs minimizing ``1 - cos(dummy gradient, observed gradient)`` plus a total-variation
  prior, inside the data's box; the attack of choice for batches above one.

The attacker knows the model (it sent it), the job (learning rate, weighting) and the input
range; it knows nothing of the batch but its size. Dummies start from seeded noise: the attack's
randomness is an experiment's, not a secret's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcrypt.core.params import ParamSpec

ATTACKS = ("dlg", "idlg", "cosine")


@dataclass(frozen=True)
class Reconstruction:
    """An attack's result: the rebuilt batch, its labels and how they were found."""

    images: np.ndarray
    labels: np.ndarray
    #: ``gradient`` (read off the last layer), ``optimized`` (DLG's dummy labels) or ``guess``
    #: (nothing was readable).
    label_source: str
    #: The final gradient distance (the attacker's own measure of success; NaN without data).
    distance: float
    seconds: float


def parameter_gradients(
    gradient: np.ndarray, spec: ParamSpec, model: nn.Module
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, values, readable)`` per trainable parameter of ``model`` from a flat gradient
    laid out as ``spec`` (NaN = unread; buffers are skipped)."""
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for tensor in spec.tensors:
        offsets[tensor.name] = (offset, offset + tensor.numel)
        offset += tensor.numel
    out = []
    for name, parameter in model.named_parameters():
        start, stop = offsets[name]
        values = torch.from_numpy(np.array(gradient[start:stop], dtype=np.float32)).reshape(parameter.shape)
        readable = torch.isfinite(values)
        out.append((name, torch.where(readable, values, torch.zeros_like(values)), readable))
    return out


def output_layer(model: nn.Module, num_classes: int) -> tuple[str, str | None]:
    """Names of the weight and bias of the last linear layer producing ``num_classes`` logits."""
    found: tuple[str, str | None] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            prefix = f"{name}." if name else ""
            found = (prefix + "weight", prefix + "bias" if module.bias is not None else None)
    if found is None:
        raise ValueError(f"the model has no linear layer with {num_classes} outputs to read labels from")
    return found


def infer_labels(
    gradients: Sequence[tuple[str, torch.Tensor, torch.Tensor]], model: nn.Module, batch_size: int, num_classes: int
) -> np.ndarray | None:
    """Labels from the output layer's gradient (iDLG; for batches, Wainakh et al.'s counting).

    For cross-entropy, the bias gradient of class ``c`` is ``sum_b (p_bc - [y_b = c])``: negative
    exactly for the classes in the batch (when the model is not yet confident), and the weight
    rows follow it when the layer's inputs are non-negative. Classes are ranked by their bias
    gradient if readable, else by the mean readable entry of their weight row; a batch with fewer
    negative classes than examples repeats the most negative ones. None if nothing is readable.
    """
    weight_name, bias_name = output_layer(model, num_classes)
    by_name = {name: (values, readable) for name, values, readable in gradients}
    score = None
    if bias_name is not None and bool(by_name[bias_name][1].all()):
        score = by_name[bias_name][0].double()
    else:
        values, readable = by_name[weight_name]
        counts = readable.sum(dim=1)
        if bool((counts > 0).all()):
            score = (values.double() * readable).sum(dim=1) / counts
    if score is None:
        return None
    order = torch.argsort(score)
    present = [int(c) for c in order if score[c] < 0] or [int(order[0])]
    labels = [present[i % len(present)] for i in range(batch_size)]
    return np.array(sorted(labels), dtype=np.int64)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (the image prior of Geiping et al.)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class GradientInversion:
    """A gradient-inversion attack; scikit-learn style, settings in ``__init__``.

    ``iterations`` bounds the optimizer's steps (L-BFGS function evaluations for ``dlg`` and
    ``idlg``, Adam steps for ``cosine``); ``restarts`` runs that many seeded starts and keeps the
    one with the smallest gradient distance (which the attacker can compute, no ground truth
    needed); ``tv_weight`` weighs the total-variation prior of ``cosine``. On the CPU the attack
    runs on ``threads`` threads (one by default: its tensors are small, and more threads mostly
    wait on each other, a hundredfold slower when the cores are busy).
    """

    def __init__(
        self,
        attack: str = "idlg",
        *,
        iterations: int | None = None,
        restarts: int = 1,
        tv_weight: float = 1e-2,
        lr: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
        if restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {restarts}")
        self.attack = attack
        self.iterations = iterations if iterations is not None else (2000 if attack == "cosine" else 300)
        self.restarts = restarts
        self.tv_weight = tv_weight
        self.lr = lr
        self.seed = seed
        self.device = torch.device(device)
        self.threads = threads

    def reconstruct(
        self,
        model: nn.Module,
        gradient: np.ndarray,
        spec: ParamSpec,
        *,
        batch_size: int,
        input_shape: Sequence[int],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> Reconstruction:
        """Rebuild a batch of ``batch_size`` inputs from ``gradient`` (flat, NaN where unread),
        the gradient of ``model``'s mean cross-entropy loss over that batch."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._reconstruct(model, gradient, spec, batch_size, tuple(input_shape), num_classes, bounds)
        finally:
            torch.set_num_threads(threads)

    def _reconstruct(
        self,
        model: nn.Module,
        gradient: np.ndarray,
        spec: ParamSpec,
        batch_size: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        bounds: tuple[float, float],
    ) -> Reconstruction:
        started = time.perf_counter()
        model = copy.deepcopy(model).to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        targets = [
            (name, values.to(self.device), readable.to(self.device))
            for name, values, readable in parameter_gradients(gradient, spec, model)
        ]
        generator = torch.Generator().manual_seed(self.seed)
        shape = (batch_size, *input_shape)
        low, high = bounds
        if not any(bool(readable.any()) for _, _, readable in targets):
            images = low + (high - low) * torch.rand(shape, generator=generator)
            labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
            return Reconstruction(images.numpy(), labels.numpy(), "guess", float("nan"), time.perf_counter() - started)
        labels = infer_labels(targets, model, batch_size, num_classes) if self.attack != "dlg" else None
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        for _ in range(self.restarts):
            dummy = (low + (high - low) * torch.rand(shape, generator=generator)).to(self.device)
            if labels is None:
                soft = torch.randn((batch_size, num_classes), generator=generator).to(self.device)
                distance, images, found = self._lbfgs(model, targets, dummy, soft, None)
            elif self.attack == "cosine":
                fixed = torch.from_numpy(labels).to(self.device)
                distance, images, found = self._cosine(model, targets, dummy, fixed, bounds)
            else:
                fixed = torch.from_numpy(labels).to(self.device)
                distance, images, found = self._lbfgs(model, targets, dummy, None, fixed)
            if best is None or distance < best[0] or not np.isfinite(best[0]):
                best = (distance, images, found)
        assert best is not None
        distance, images, found = best
        return Reconstruction(
            images.cpu().numpy(), found.cpu().numpy(), "optimized" if labels is None else "gradient",
            distance, time.perf_counter() - started,
        )

    def _gradient(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = model(x)
        if targets.dtype.is_floating_point:  # DLG's soft dummy labels
            loss = torch.mean(torch.sum(-torch.softmax(targets, dim=-1) * torch.log_softmax(logits, dim=-1), dim=-1))
        else:
            loss = nn.functional.cross_entropy(logits, targets)
        return torch.autograd.grad(loss, tuple(model.parameters()), create_graph=True)

    def _lbfgs(
        self,
        model: nn.Module,
        targets: list[tuple[str, torch.Tensor, torch.Tensor]],
        dummy: torch.Tensor,
        soft: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        dummy.requires_grad_(True)
        variables = [dummy] if soft is None else [dummy, soft.requires_grad_(True)]
        optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=100)
        good = (float("inf"), dummy.detach().clone(), soft.detach().clone() if soft is not None else labels)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            grads = self._gradient(model, dummy, soft if soft is not None else labels)  # type: ignore[arg-type]
            distance = sum(((g - t) ** 2 * r).sum() for g, (_, t, r) in zip(grads, targets))
            distance.backward()
            return distance

        for _ in range(max(1, self.iterations // 20)):
            distance = float(optimizer.step(closure).detach())  # type: ignore[union-attr]
            if not np.isfinite(distance) or not bool(torch.isfinite(dummy).all()):
                break  # the match diverged (e.g. a masked update): keep the last finite point
            stalled = bool(np.isfinite(good[0])) and good[0] - distance <= 1e-6 * good[0]
            good = (distance, dummy.detach().clone(), soft.detach().clone() if soft is not None else labels)
            if distance < 1e-12 or stalled:
                break
        distance, images, found = good
        if soft is not None:
            found = found.argmax(dim=-1)
        assert found is not None
        return distance, images, found

    def _cosine(
        self,
        model: nn.Module,
        targets: list[tuple[str, torch.Tensor, torch.Tensor]],
        dummy: torch.Tensor,
        labels: torch.Tensor,
        bounds: tuple[float, float],
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        dummy.requires_grad_(True)
        optimizer = torch.optim.Adam([dummy], lr=self.lr)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        norm = torch.sqrt(sum(((t * r) ** 2).sum() for _, t, r in targets)).clamp_min(1e-30)
        distance = float("nan")
        for _ in range(self.iterations):
            optimizer.zero_grad()
            grads = self._gradient(model, dummy, labels)
            dot = sum((g * t * r).sum() for g, (_, t, r) in zip(grads, targets))
            own = torch.sqrt(sum(((g * r) ** 2).sum() for g, (_, _, r) in zip(grads, targets))).clamp_min(1e-30)
            cosine = 1 - dot / (own * norm)
            loss = cosine + self.tv_weight * total_variation(dummy)
            loss.backward()
            dummy.grad.sign_()  # type: ignore[union-attr]
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                dummy.clamp_(*bounds)
            distance = float(cosine.detach())
        return distance, dummy.detach(), labels
