"""The hyperparameters of every model-layer method, as frozen pydantic models with the papers' defaults.

They live apart from the methods' modules for one reason: this module imports no torch or timm, so a pipeline
YAML is validated in about a second, before the heavy imports. Each method's module takes its settings from
here (`models/peft/lora.py` uses `LoraSettings`); adding a PEFT method adds its settings class and one line in
`PEFT_SETTINGS` here, its module and one line in `models.peft.PEFT_METHODS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# Deployment scales s searched on the validation split when ToCom is plugged or merged into a task model.
TOCOM_SCALES = (0.05, 0.08, 0.1, 0.12, 0.15)

Pruner = Literal["resrep", "csgd"]  # the keys of models.prune.PRUNERS
Bits = Literal[1, 2, 4, 8]


# --- backbone ---


class ViTSpec(BaseModel):
    """A backbone named by its timm registry string, with the input size, shape overrides and starting weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = "vitpipe_tiny_patch4_32"
    img_size: int = Field(32, gt=0)
    overrides: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="starting weights: timm:<name.tag>, or a local / s3:// "
                                "safetensors or .pth file (MAE, LocalMIM, DeiT layouts); None: random init")
    weights_sha256: str | None = Field(None, description="sha256 of the weights file; filled in when the "
                                       "pipeline is planned (part of every downstream key), or pinned here")

    def build(self, num_classes: int = 0) -> VisionTransformer:
        from vitpipe.models.vit import build_vit

        return build_vit(self.arch, num_classes=num_classes, img_size=self.img_size, **self.overrides)


# --- pretraining objectives (models/mim.py, models/contrastive.py, models/pretrain_objectives.py) ---


class LocalMIMConfig(BaseModel):
    """LocalMIM hyper-parameters; defaults are the paper's (ViT-B: taps at blocks 2, 4, 10, 12)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    taps: tuple[int, ...] = Field((1, 3, -3, -1), description="0-based block indices; negative count from the top")
    scales: tuple[float, ...] = Field((4.0, 2.0, 1.0, 0.5), description="target scale per tap vs the patch grid")
    weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    dec_dim: int = Field(256, gt=0, description="width of each tap's decoder; the paper's 256 is a third of "
                         "ViT-B's width: keep it well below a narrower encoder's (docs/methods.md)")
    dec_heads: int = Field(8, gt=0)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    nbins: int = Field(9, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LocalMIMConfig:
        if not len(self.taps) == len(self.scales) == len(self.weights) > 0:
            raise ValueError("taps, scales and weights must have the same non-zero length")
        if any(s <= 0 or not math.log2(s).is_integer() for s in self.scales):
            raise ValueError(f"scales must be powers of two, got {self.scales}")
        return self


class InfoCLConfig(BaseModel):
    """InfoCL hyper-parameters; defaults are the paper's CIFAR values (SimCLR + RC, lambda 1.0)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Literal["simclr", "byol"] = "simclr"
    regularizer: Literal["none", "rc", "lbe"] = "rc"
    lam: float | None = Field(None, ge=0, description="regularizer weight; None: SimCLR 1.0, BYOL 0.1")
    temperature: float = Field(0.5, gt=0)
    proj_dim: int = Field(128, gt=0)
    byol_momentum: float = Field(0.996, ge=0, le=1)
    rc_widths: tuple[int, ...] = Field((64, 256, 128, 64), min_length=1, description="RC decoder channel widths")
    lbe_sigma: float = Field(0.1, ge=0, description="std of the Gaussian encoder's noise eps")
    lbe_bandwidth: float = Field(20.0, gt=0, description="20 for CIFAR, 80 for ImageNet")
    lbe_depths: tuple[float, ...] = Field((0.5, 0.75, 1.0), description="feature depths as fractions of D")
    lbe_weights: tuple[float, ...] = (0.25, 0.5, 1.0)

    @model_validator(mode="after")
    def _check(self) -> InfoCLConfig:
        if len(self.lbe_depths) != len(self.lbe_weights) or not self.lbe_depths or self.lbe_depths[-1] != 1.0:
            raise ValueError("lbe_depths and lbe_weights must have the same length, ending at depth 1.0")
        return self

    @property
    def weight(self) -> float:
        """lambda, resolved to the paper's value for the base loss when not given."""
        if self.lam is not None:
            return self.lam
        return 1.0 if self.base == "simclr" else 0.1


class PretrainObjectiveConfig(BaseModel):
    """Weights of the objectives in the total loss (0 leaves one out) and each objective's own config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: dict[str, float] = Field(default_factory=lambda: {"localmim": 1.0, "infocl": 1.0})
    localmim: LocalMIMConfig = LocalMIMConfig()
    infocl: InfoCLConfig = InfoCLConfig()

    @model_validator(mode="after")
    def _check(self) -> PretrainObjectiveConfig:
        known = sorted(set(type(self).model_fields) - {"weights"})  # one config field per objective
        unknown = set(self.weights) - set(known)
        if unknown:
            raise ValueError(f"unknown pretraining objective(s) {sorted(unknown)}, known: {known}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"objective weights must be >= 0 with at least one > 0, got {self.weights}")
        return self


# --- structured pruning (models/prune/) ---


class PruneSettings(BaseModel):
    """Keep ratios (0 < k <= 1) of MLP hidden units and of heads, and each method's strength."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of MLP hidden units kept per block")
    head_keep_ratio: float | None = Field(None, gt=0, le=1, description="fraction of heads kept; None: keep_ratio")
    lam: float = Field(1e-4, gt=0, description="ResRep group-lasso strength lambda")
    criterion: Literal["saliency", "norm"] = Field("saliency", description="ResRep: what chooses the forget set")
    selection: Literal["layer", "global"] = Field(
        "layer", description="ResRep: layer keeps the ratio in every block; global keeps the same total, the groups "
        "that matter least model-wide forgotten (at least one kept per block), as ResRep's global selection")
    steps: int = Field(2, ge=1, description="training forwards; the structure is reached at the last one")
    centripetal: float = Field(3e-3, ge=0, description="C-SGD centripetal strength epsilon")
    seed: int = 0

    @property
    def heads_ratio(self) -> float:
        return self.keep_ratio if self.head_keep_ratio is None else self.head_keep_ratio


# --- PEFT methods (models/peft/, one settings class per method) ---


class PeftConfig(BaseModel):
    """Base of every method's config: frozen, unknown keys rejected, defaults = the paper's values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_merging: ClassVar[bool] = True  # ToMe can patch the adapted blocks (models.tome)
    # the values of the method's scale s that its paper searches per task (`scale_grid: paper`); empty: none
    paper_scale_grid: ClassVar[tuple[float, ...]] = ()


class LoraSettings(PeftConfig):
    """rank r, scale alpha / r (alpha = r: scale 1), module-name suffixes to target."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("qkv",)


class AdaptFormerSettings(PeftConfig):
    """Bottleneck width d (8 in the VTAB tables), branch scale s, dropout after the ReLU."""

    dim: int = 8
    scale: float = 0.1
    dropout: float = 0.1
    bias: bool = True


class BiAdapterSettings(PeftConfig):
    """Width d, bits per weight (1, 2, 4 or 8), the quantizer's levels, branch scale s, dropout after the ReLU.

    levels "lloyd_max" (METHODS.md): the MSE-optimal levels, the conditional means (+-0.798 sigma at 1 bit);
    "official": the authors' quantizer (PETL-ViT binary_adapter/utils.py), whose levels are the medians of their
    cells (+-0.674 sigma at 1 bit), so that their checkpoints load as trained. docs/methods.md.
    """

    paper_scale_grid: ClassVar[tuple[float, ...]] = (0.01, 0.1, 1.0, 10.0)
    dim: int = 32
    bits: Bits = 1
    levels: Literal["lloyd_max", "official"] = "lloyd_max"
    scale: float = 0.1
    dropout: float = 0.1


class FacTSettings(PeftConfig):
    """rank r, path scale s (per task in the paper: 0.1-10), dropout on the core path."""

    paper_scale_grid: ClassVar[tuple[float, ...]] = (0.01, 0.1, 1.0, 10.0, 100.0)
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1


class FacTTKSettings(FacTSettings):
    """TK defaults from the authors' VTAB configs: r = 32, s = 0.1."""

    rank: int = 32
    scale: float = 0.1


class ConvpassSettings(PeftConfig):
    """Bypass width (8), scale s (per task in the paper), dropout before Up."""

    token_merging: ClassVar[bool] = False  # the bypass convolves tokens on their 2-D grid, which merging dissolves
    paper_scale_grid: ClassVar[tuple[float, ...]] = (0.01, 0.1, 1.0, 10.0, 100.0)
    dim: int = 8
    scale: float = 1.0
    dropout: float = 0.1


class ConsolidatorSettings(PeftConfig):
    """Group counts of the branches, and the branch's details. Defaults: the authors' VTAB-1k setup (one branch of
    384 groups with a bias, uniform(+-1e-3) init, DropPath on its output, no channel shuffle); vitpipe's earlier
    variant is groups (384, 768), shuffle, no bias, zero init, input dropout 0.1, no DropPath."""

    groups: tuple[int, ...] = (384,)
    shuffle: bool = Field(False, description="ShuffleNet's channel shuffle before each grouped map")
    bias: bool = Field(True, description="a trainable bias on the branch output (merged into the Linear's)")
    init: Literal["uniform", "zeros"] = Field("uniform", description="branch weights: uniform(+-1e-3) or zero")
    drop_path: float = Field(0.1, ge=0, lt=1, description="DropPath on the branch output (per task in the paper)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input")


class VptSettings(PeftConfig):
    """Number of prompts per block p, dropout on the prompts."""

    token_merging: ClassVar[bool] = False  # its prompt tokens would be merged into image tokens
    num_prompts: int = 10
    dropout: float = 0.1


# method name -> its settings; methods without hyperparameters train the head (and their own fixed set) only
PEFT_SETTINGS: dict[str, type[PeftConfig]] = {
    "linear": PeftConfig,
    "full": PeftConfig,
    "bitfit": PeftConfig,
    "lora": LoraSettings,
    "adaptformer": AdaptFormerSettings,
    "bi_adapter": BiAdapterSettings,
    "fact_tt": FacTSettings,
    "fact_tk": FacTTKSettings,
    "convpass": ConvpassSettings,
    "consolidator": ConsolidatorSettings,
    "vpt": VptSettings,
}
