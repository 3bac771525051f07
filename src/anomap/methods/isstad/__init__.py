"""isstad: ISSTAD (Jin, Guo, Zhu; arXiv 2303.17354), METHODS.md §2. See ``method`` for the details."""

from anomap.methods.isstad.config import PIXEL_MAPS, STAGE1, STAGE2, IsstadConfig
from anomap.methods.isstad.method import Isstad, load_mae_checkpoint, random_resized_crop, ssim

__all__ = ["PIXEL_MAPS", "STAGE1", "STAGE2", "Isstad", "IsstadConfig", "load_mae_checkpoint",
           "random_resized_crop", "ssim"]
