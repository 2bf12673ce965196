"""Model and training configuration: one dataclass tree, loaded from YAML.

Architecture lives in YAML (`configs/*.yaml`, shipped inside the package as `ostnet_fast.configs`);
`load_config` takes a shipped name (`ostnet-vox-256`) or a path to a YAML file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "ostnet-vox-256"


@dataclass
class KPDetectorConfig:
    temperature: float = 0.1
    block_expansion: int = 32
    max_features: int = 1024
    scale_factor: float = 0.25
    num_blocks: int = 5


@dataclass
class DenseMotionConfig:
    block_expansion: int = 64
    max_features: int = 1024
    num_blocks: int = 5
    scale_factor: float = 0.25
    kp_variance: float = 0.01


@dataclass
class GeneratorConfig:
    block_expansion: int = 64
    max_features: int = 512
    num_down_blocks: int = 3
    num_bottleneck_blocks: int = 6
    estimate_occlusion_map: bool = True
    final_kernel_size: int = 1


@dataclass
class ScaleTransformConfig:
    num_fiducials: int = 20
    hidden_dim: int = 256
    z_dim: int = 128
    num_layers: int = 4
    max_offset: float = 0.5


@dataclass
class ModelConfig:
    num_kp: int = 15
    num_channels: int = 3
    image_size: int = 256
    estimate_jacobian: bool = True
    kp_detector: KPDetectorConfig = field(default_factory=KPDetectorConfig)
    dense_motion: DenseMotionConfig = field(default_factory=DenseMotionConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scale_transform: ScaleTransformConfig = field(default_factory=ScaleTransformConfig)


@dataclass
class LossWeights:
    perceptual: list[float] = field(default_factory=lambda: [10.0] * 5)
    equivariance_value: float = 10.0
    equivariance_jacobian: float = 10.0
    keypoint_distance: float = 10.0


@dataclass
class TransformParams:
    sigma_affine: float = 0.05
    sigma_tps: float = 0.005
    points_tps: int = 5


@dataclass
class TrainConfig:
    batch_size: int = 8
    num_repeats: int = 75
    num_epochs: int = 100
    epoch_milestones: list[int] = field(default_factory=lambda: [60, 90])
    lr: float = 2.0e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    grad_clip: float = 1.0
    scales: list[float] = field(default_factory=lambda: [1, 0.5, 0.25, 0.125])
    loss_weights: LossWeights = field(default_factory=LossWeights)
    keypoint_distance_gamma: float = 0.1
    augmentation_delta: float = 0.3
    transform_params: TransformParams = field(default_factory=TransformParams)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = DEFAULT_CONFIG

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys so typos fail loudly."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_DATACLASSES = {c.__name__: c for c in (KPDetectorConfig, DenseMotionConfig, GeneratorConfig,
                                         ScaleTransformConfig, ModelConfig, LossWeights,
                                         TransformParams, TrainConfig)}


def size_multiple(model: ModelConfig) -> int:
    """Image sides must be multiples of this: the generator halves the image num_down_blocks times, and the
    keypoint detector and dense motion run hourglasses of num_blocks halvings on the image scaled by
    scale_factor (256 with the shipped configs' 0.25 and 5 blocks: multiples of 128)."""
    need = 2 ** model.generator.num_down_blocks
    for part in (model.kp_detector, model.dense_motion):
        # AntiAliasInterpolation2d subsamples with stride round(1 / scale_factor)
        stride = 1 if part.scale_factor == 1 else int(round(1 / part.scale_factor))
        need = math.lcm(need, stride * 2 ** part.num_blocks)
    return need


def validate_model(model: ModelConfig, where: str = "config.model") -> None:
    """Refuse an architecture that cannot be built or run, with the offending key (ValueError)."""
    positive = {"num_kp": model.num_kp, "num_channels": model.num_channels, "image_size": model.image_size,
                "generator.num_down_blocks": model.generator.num_down_blocks,
                "scale_transform.num_fiducials": model.scale_transform.num_fiducials}
    for part in ("kp_detector", "dense_motion"):
        sub = getattr(model, part)
        positive.update({f"{part}.block_expansion": sub.block_expansion, f"{part}.max_features": sub.max_features,
                         f"{part}.num_blocks": sub.num_blocks})
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
    for part in ("kp_detector", "dense_motion"):
        scale = getattr(model, part).scale_factor
        if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"{where}.{part}.scale_factor must be in (0, 1], got {scale!r}")
    m = size_multiple(model)
    if model.image_size % m:
        raise ValueError(f"{where}.image_size {model.image_size} is not a multiple of {m}, which this "
                         f"architecture needs (e.g. {m * max(1, round(model.image_size / m))})")


def config_from_dict(data: dict[str, Any], name: str = "custom") -> Config:
    data = dict(data)
    data.pop("name", None)
    cfg = _build(Config, data, "config")
    cfg.name = name
    validate_model(cfg.model)
    return cfg


def _config_dir():
    """Shipped configs: the installed `ostnet_fast.configs` package, else the repo's configs/ folder."""
    try:
        return resources.files("ostnet_fast.configs")
    except ModuleNotFoundError:  # running from a source tree without installing
        return Path(__file__).resolve().parent.parent / "configs"


def available_configs() -> list[str]:
    return sorted(p.name[:-5] for p in _config_dir().iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path | Config | None = None) -> Config:
    """Load a shipped config by name (e.g. 'ostnet-vox-256') or a YAML file by path."""
    if isinstance(name_or_path, Config):
        return name_or_path
    name_or_path = DEFAULT_CONFIG if name_or_path is None else str(name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        shipped = _config_dir() / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ValueError(f"unknown config {name_or_path!r}; shipped: {available_configs()}, "
                             "or give a path to a .yaml file")
        text, name = shipped.read_text(), name_or_path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config {name_or_path} is not valid YAML ({' '.join(str(e).split())})") from None
    if not data:
        raise ValueError(f"config {name_or_path} is empty (start from a shipped one: {available_configs()})")
    return config_from_dict(data, name=name)
