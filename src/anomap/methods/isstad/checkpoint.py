"""Reading a user's MAE (encoder + decoder) or ViT (encoder only) checkpoint for the isstad model.

Nothing is downloaded: the file is a local ``.pth`` (read with ``torch.load(weights_only=True)``, never
unpickling code) or ``.safetensors``. MAE key names are mapped onto ours (``decoder_blocks.N`` ->
``decoder1.blocks.N`` ...); checkpoint decoder blocks beyond ``dec_depth_stage1`` are dropped, as the
published stage 1 does with the 8-block MAE decoder.

This module knows the model only through its state_dict and config, so it does not import the model;
:func:`anomap.methods.isstad.method.load_mae_checkpoint` copies the tensors in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from anomap.errors import CheckpointError
from anomap.fileio import read_state_dict
from anomap.methods.isstad.config import IsstadConfig

_DECODER_NAMES = {"decoder_embed.": "embed.", "decoder_pos_embed": "pos_embed", "decoder_blocks.": "blocks.",
                  "decoder_norm.": "norm.", "decoder_pred.": "pred.", "mask_token": "mask_token"}
_IGNORED = ("head.", "fc_norm.")  # classification heads of fine-tuned ViTs


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    fix = "give a local MAE/ViT state_dict (.pth or .safetensors) or unset mae_checkpoint_path"
    return read_state_dict(path, "MAE checkpoint", fix)


def _map_key(key: str, depth1: int) -> str | None:
    """MAE key -> our key (``encoder.*`` / ``decoder1.*``); None for keys that are dropped on purpose."""
    if key.startswith(("encoder.", "decoder1.")):
        return key
    if key.startswith(_IGNORED):
        return None
    for old, new in _DECODER_NAMES.items():
        if key.startswith(old):
            rest = new + key[len(old):]
            if rest.startswith("blocks.") and int(rest.split(".")[1]) >= depth1:
                return None  # deeper checkpoint decoder: extra blocks are dropped, as published
            return "decoder1." + rest
    return "encoder." + key


def read_mae_checkpoint(path: str | Path, ours: Mapping[str, Tensor],
                        config: IsstadConfig) -> dict[str, Tensor]:
    """A MAE/ViT file's tensors under our names (``encoder.*``, ``decoder1.*``), checked against ``ours``.

    Every encoder tensor of ``ours`` (the model's state_dict) must be in the file with our shape; when
    the file has decoder tensors, every stage-1 decoder tensor must be too.

    Raises:
        CheckpointError: the file is unreadable, or tensors are missing, unexpected or of another
            shape (named, with the model sizes of ``config``).
    """
    path = Path(path)
    state = _read_state_dict(path)
    mapped: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state.items():
        new = _map_key(key, config.dec_depth_stage1)
        if new is None:
            continue
        if new in ours:
            mapped[new] = value
        else:
            unexpected.append(key)
    has_decoder = any(k.startswith("decoder1.") for k in mapped)
    needed = [k for k in ours if k.startswith("encoder.") or (has_decoder and k.startswith("decoder1."))]
    missing = [k for k in needed if k not in mapped]
    wrong = [f"{k} {tuple(mapped[k].shape)} != {tuple(ours[k].shape)}" for k in needed
             if k in mapped and mapped[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatch {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        cfg = config
        raise CheckpointError(
            f"the MAE checkpoint does not fit isstad (image_size {cfg.image_size}, patch {cfg.patch_size}, "
            f"enc {cfg.enc_dim}/{cfg.enc_depth}/{cfg.enc_heads}, dec {cfg.dec_dim}/{cfg.dec_depth_stage1}): "
            + "; ".join(problems) + ".",
            path=path,
            fix="use --set preset=paper for ViT-L/16 MAE weights, or match the model sizes to the file",
        )
    return mapped
