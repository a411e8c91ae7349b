"""DINO v1 / DINOv2 ViTs loaded from a checkpoint file the user names, and random ViTs for tests.

Nothing is ever downloaded: the official DINO files (e.g. dino_deitsmall16_pretrain.pth) load as is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..registry import register
from .precision import Precision
from .vit import TimmViTBackbone, file_sha256, load_official_state_dict


class FileViTBackbone(TimmViTBackbone):
    """A timm ViT whose weights come from a local checkpoint file in the official layout."""

    def __init__(
        self,
        weights: str,
        resolution: int = 224,
        batch_size: int = 32,
        cache_dir: str | None = None,
        precision: Precision = "auto",
        device: str = "auto",
    ):
        super().__init__(resolution, batch_size, cache_dir, precision, device)
        self.weights = weights
        self._sha: str | None = None

    def state_dict_for_model(self) -> dict[str, torch.Tensor]:
        return load_official_state_dict(Path(self.weights).expanduser(), self.plugin_name)

    def weights_identity(self) -> str:
        if self._sha is None:
            path = Path(self.weights).expanduser()
            if not path.is_file():  # same message as loading, raised at validation time
                load_official_state_dict(path, self.plugin_name)
            self._sha = file_sha256(path)
        return self._sha

    def check(self) -> None:
        """Fail before any work if the weights file is missing."""
        super().check()
        self.weights_identity()


def _file_backbone(cls_name: str, name: str, arch: str, report: str, file_hint: str, **timm_kwargs):
    cls = type(
        cls_name,
        (FileViTBackbone,),
        {
            "arch": arch,
            "report_name": report,
            "timm_kwargs": timm_kwargs,
            "__doc__": f"{report} (timm {arch}) from a local checkpoint, e.g. {file_hint}.",
            "__module__": __name__,
        },
    )
    return register("backbone", name)(cls)


DinoViTS8 = _file_backbone(
    "DinoViTS8", "dino_vits8", "vit_small_patch8_224", "DINO ViT-S/8", "dino_deitsmall8_300ep_pretrain.pth"
)
DinoViTS16 = _file_backbone(
    "DinoViTS16", "dino_vits16", "vit_small_patch16_224", "DINO ViT-S/16", "dino_deitsmall16_pretrain.pth"
)
DinoViTB8 = _file_backbone(
    "DinoViTB8", "dino_vitb8", "vit_base_patch8_224", "DINO ViT-B/8", "dino_vitbase8_pretrain.pth"
)
DinoViTB16 = _file_backbone(
    "DinoViTB16", "dino_vitb16", "vit_base_patch16_224", "DINO ViT-B/16", "dino_vitbase16_pretrain.pth"
)
DinoV2ViTS14 = _file_backbone(
    "DinoV2ViTS14",
    "dinov2_vits14",
    "vit_small_patch14_dinov2",
    "DINOv2 ViT-S/14",
    "dinov2_vits14_pretrain.pth",
    img_size=518,
)
DinoV2ViTB14 = _file_backbone(
    "DinoV2ViTB14",
    "dinov2_vitb14",
    "vit_base_patch14_dinov2",
    "DINOv2 ViT-B/14",
    "dinov2_vitb14_pretrain.pth",
    img_size=518,
)


@register("backbone", "random_vit")
class RandomViT(TimmViTBackbone):
    """Randomly initialised timm ViT of a given architecture (tests and smoke runs; no weights needed).

    Its precision defaults to fp32 (not auto), so that tests compute the same numbers on every CPU.
    """

    def __init__(
        self,
        arch: str = "vit_small_patch16_224",
        seed: int = 0,
        resolution: int = 224,
        batch_size: int = 32,
        cache_dir: str | None = None,
        depth: int | None = None,
        precision: Precision = "fp32",
        device: str = "auto",
    ):
        super().__init__(resolution, batch_size, cache_dir, precision, device)
        self.arch = arch
        self.seed = seed
        self.depth = depth
        self.timm_kwargs = {"depth": depth} if depth else {}
        self.report_name = f"random {arch}"

    def state_dict_for_model(self) -> None:
        torch.manual_seed(self.seed)  # timm initialises from the global generator
        return None

    def _build(self):
        with torch.random.fork_rng():
            return super()._build()

    def weights_identity(self) -> str:
        return f"random-seed{self.seed}"
