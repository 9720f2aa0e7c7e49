"""The PEFT life cycle shared by every method: apply -> train -> delta_state -> load_delta -> merge.

Like Hugging Face peft, each method injects its modules into a frozen backbone (here a timm
VisionTransformer), trains them together with the classification head `model.head`, and stores only
what differs per task. Modules are patched in place by swapping an instance's class to a subclass
that adds the method's branch (as models/tome.py does): parameter names of the backbone stay those
of timm, the method's own parameters get their own names, and pickling / deepcopy work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.settings import PEFT_SETTINGS, PeftConfig


class PeftError(ValueError):
    """A PEFT method cannot be applied, loaded or merged as asked."""


class PeftMethod:
    """One PEFT method behind the uniform surface; subclasses override `inject` (and `fold`).

    The method's parameters are found by name, not by requires_grad (which a caller may toggle):
    every parameter with a path component in `scopes`, e.g. "blocks.3.adapter.up.weight" for
    ("adapter",). The default delta is exactly the trainable tensors: the method's plus the head's.
    """

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ()
    head_only: ClassVar[bool] = False  # nothing before the head trains: its inputs are fixed features

    @property
    def config_cls(self) -> type[PeftConfig]:
        """The method's settings (models/settings.py: `PEFT_SETTINGS`, importable without torch)."""
        return PEFT_SETTINGS[self.name]

    def config(self, cfg: PeftConfig | Mapping[str, Any] | None = None) -> PeftConfig:
        """Validate `cfg` (None -> the paper's defaults; a mapping -> parsed by the config class)."""
        if cfg is None:
            return self.config_cls()
        if isinstance(cfg, self.config_cls):
            return cfg
        if isinstance(cfg, Mapping):
            return self.config_cls(**cfg)
        raise PeftError(f"{self.name}: expected {self.config_cls.__name__} or a mapping, got {type(cfg).__name__}")

    def apply(self, model: VisionTransformer, cfg: PeftConfig | Mapping[str, Any] | None = None) -> nn.Module:
        """Freeze the backbone, inject the method's trainable modules; the head always trains."""
        cfg = self.config(cfg)
        model.requires_grad_(False)
        with torch.device(next(model.parameters()).device):  # new modules where the backbone lives (meta included)
            self.inject(model, cfg)
        for p in self.trainable_parameters(model).values():
            p.requires_grad_(True)
        return model

    def inject(self, model: VisionTransformer, cfg: PeftConfig) -> None:
        """Add the method's modules to the model (in place). Default: nothing (head only)."""

    def method_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The method's own parameters, head excluded."""
        scopes = set(self.scopes)
        return {name: p for name, p in model.named_parameters() if scopes.intersection(name.split("."))}

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters that train: the method's own plus the head's, in model order."""
        own = self.method_parameters(model)
        return {name: p for name, p in model.named_parameters() if name in own or name.startswith("head.")}

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything a task must store on top of the shared backbone (detached copies)."""
        return {name: p.detach().clone() for name, p in self.trainable_parameters(model).items()}

    def load_delta(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """Load a `delta_state` into a model that went through `apply` with the same config."""
        copy_into(model, state, expected=set(self.trainable_parameters(model)), method=self.name)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into plain timm weights and remove its modules (mergeable methods only)."""
        if not self.mergeable:
            raise PeftError(f"{self.name} is not mergeable: its branch is not a linear map of the input")
        self.fold(model)
        return model

    def fold(self, model: nn.Module) -> None:
        """Add the method's weight increments into the backbone and restore the plain modules."""

    def adapter_files(self, delta: Mapping[str, torch.Tensor], cfg: PeftConfig) -> dict[str, bytes]:
        """The delta in a format other tools load (Hugging Face peft's adapter folder for LoRA); {}: none."""
        return {}

    @staticmethod
    def delta_nbytes(state: Mapping[str, torch.Tensor]) -> int:
        """Bytes a delta takes when stored raw (e.g. as safetensors, headers aside)."""
        return sum(t.numel() * t.element_size() for t in state.values())


def copy_into(model: nn.Module, state: Mapping[str, torch.Tensor], expected: set[str], method: str) -> None:
    """Copy `state` into the model's parameters, requiring exactly the names in `expected`."""
    params = dict(model.named_parameters())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise PeftError(
            f"{method}: delta does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was the model applied with the same method and config?)"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                shapes = f"{tuple(value.shape)}, model has {tuple(params[name].shape)}"
                raise PeftError(f"{method}: {name} has shape {shapes} (same config as at training?)")
            params[name].copy_(value)


def swap_class(module: nn.Module, cls: type[nn.Module]) -> None:
    """Make `module` an instance of `cls`, a direct subclass of its class that only changes forward."""
    if type(module) not in cls.__bases__:
        raise PeftError(f"cannot patch a {type(module).__name__} as {cls.__name__} (already patched by a method?)")
    module.__class__ = cls


def encoder_linears(model: VisionTransformer) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) for every block's qkv, proj, fc1, fc2, in depth order."""
    for i, block in enumerate(model.blocks):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            yield f"blocks.{i}.{name}", block.get_submodule(name)


class BranchedLinear(nn.Linear):
    """A Linear plus a parallel branch: y = x W^T + b + branch(x).

    x: (..., in_features) -> (..., out_features). `branch.delta_weight()` -> (out, in), when the
    branch is linear, lets `unbranch` fold it into W exactly (up to float rounding).
    """

    branch: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.branch(x)


def add_branch(linear: nn.Linear, branch: nn.Module) -> None:
    """Turn `linear` into a BranchedLinear with `branch` (its parameters train, W and b stay frozen)."""
    swap_class(linear, BranchedLinear)
    linear.branch = branch


@torch.no_grad()
def unbranch(linear: BranchedLinear) -> None:
    """W += branch.delta_weight() (and b += branch.delta_bias(), when it has one); drop the branch; the module is
    a plain nn.Linear again."""
    linear.weight += linear.branch.delta_weight().to(linear.weight.dtype)
    bias = getattr(linear.branch, "delta_bias", lambda: None)()
    if bias is not None:
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros_like(bias, dtype=linear.weight.dtype), requires_grad=False)
        linear.bias += bias.to(linear.bias.dtype)
    del linear.branch
    linear.__class__ = nn.Linear


def unbranch_all(model: nn.Module) -> None:
    """Fold every BranchedLinear of the model."""
    for module in list(model.modules()):
        if isinstance(module, BranchedLinear):
            unbranch(module)
