"""Tiny SAM models for the tests, built from segment-anything's own classes.

Nothing is downloaded. :func:`train_tiny_sam` trains a tiny ``Sam`` (embed 64,
depth 2, image 256) for a few hundred steps on CT phantom slices with box and
point prompts (and boxes just past the organ's end, whose answer is an empty
mask), through the same preprocessing and prompt conventions as ALSeg's
pipeline, so that propagation and its stop rules can be tested on a model that
actually segments. About a minute on two CPU cores.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from ALSegLib import phantoms
from ALSegLib.pseudolabels.sam import (
    PROFILES,
    SamArchitecture,
    build_sam,
    encoder_input,
    prompt_tensors,
    slice_frame,
)
from ALSegLib.pseudolabels.slices import CT_WINDOWS, Window, to_uint8

TINY = SamArchitecture(
    image_size=256, patch_size=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
    encoder_global_attn_indexes=(1,), window_size=4, mlp_ratio=2.0, prompt_embed_dim=64, mask_in_chans=8,
    decoder_depth=2, decoder_mlp_dim=128, iou_head_depth=3, iou_head_hidden_dim=64,
)
SIZE = 48  # phantom side in voxels
SPACING = phantoms.SPACING["CT"][:2][::-1]  # (row, col) mm of an axial slice


def tiny_sam(seed: int = 0, arch: SamArchitecture = TINY):
    torch.manual_seed(seed)
    return build_sam(arch)


def save(model, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def organ_mask(label: np.ndarray) -> np.ndarray:
    """The whole organ (its lesion included), as a box prompt around it would show it."""
    return (label == phantoms.LABELS["organ"]) | (label == phantoms.LABELS["lesion"])


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float64)


def training_samples(indices, rng: np.random.Generator):
    """(uint8 slice, target mask, box, point or None) from CT phantoms, including 'past the end' negatives."""
    window = Window("window", *CT_WINDOWS["soft_tissue"])
    out = []
    for i in indices:
        image, label = phantoms.make_phantom(int(i), "CT", seed=7, size=SIZE)
        u8 = to_uint8(sitk.GetArrayFromImage(image), window)
        organ = organ_mask(sitk.GetArrayFromImage(label))
        ks = np.flatnonzero(organ.any(axis=(1, 2)))
        if not len(ks):
            continue
        for k in ks:
            if organ[k].sum() < 4:
                continue
            ys, xs = np.nonzero(organ[k])
            j = rng.integers(len(ys))
            out.append((u8[k], organ[k], _box(organ[k]), (xs[j], ys[j])))
        for k, nearest in ((ks[0] - 1, ks[0]), (ks[0] - 2, ks[0]), (ks[-1] + 1, ks[-1]), (ks[-1] + 2, ks[-1])):
            if 0 <= k < SIZE:
                out.append((u8[k], np.zeros_like(organ[k]), _box(organ[nearest]), None))
    return out


def train_tiny_sam(steps: int = 200, batch: int = 16, seed: int = 0, cases: int = 10, log=None):
    """A tiny SAM trained to segment the phantom organ from a box (and a point) on a slice."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_sam(TINY).train()
    data = training_samples(range(100, 100 + cases), rng)
    frame = slice_frame((SIZE, SIZE), SPACING, TINY.image_size, PROFILES["sam"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    low = TINY.image_size // 4
    t0 = time.perf_counter()
    for step in range(steps):
        pick = rng.integers(len(data), size=batch)
        u8 = np.stack([data[j][0] for j in pick])
        x = encoder_input(u8, frame, model, PROFILES["sam"])
        emb = model.image_encoder(x)
        targets = torch.as_tensor(np.stack([data[j][1] for j in pick]), dtype=torch.float32)[:, None]
        targets = (F.interpolate(targets, (low, low), mode="bilinear", align_corners=False)[:, 0] > 0.5).float()
        losses, dices = [], []
        for b, j in enumerate(pick):
            _, _, box, point = data[j]
            kind = rng.choice(["box", "box+point", "point"], p=[0.4, 0.3, 0.3]) if point is not None else "box"
            box = box + rng.integers(-2, 3, size=4)  # prompts are never exact
            pts, box_t = prompt_tensors(frame, None if kind == "point" else box[None],
                                        None if kind == "box" else np.array([[point]], np.float64),
                                        None if kind == "box" else np.array([[1]]), model.device)
            sparse, dense = model.prompt_encoder(points=pts, boxes=box_t, masks=None)
            # one click is ambiguous: SAM's multimask outputs, trained on the best of them
            lo, iou = model.mask_decoder(image_embeddings=emb[b: b + 1], image_pe=model.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=kind == "point")
            lo, iou = lo[0], iou[0]  # (M, h, w), (M,)
            t = targets[b].expand_as(lo)
            prob = lo.sigmoid()
            dice = 1 - (2 * (prob * t).sum((1, 2)) + 1) / (prob.sum((1, 2)) + t.sum((1, 2)) + 1)
            bce = F.binary_cross_entropy_with_logits(lo, t, reduction="none").mean((1, 2))
            hard = (lo > 0).float()
            union = ((hard + t) > 0).float().sum((1, 2))
            true_iou = torch.where(union > 0, (hard * t).sum((1, 2)) / union.clamp_min(1), torch.ones_like(union))
            per_mask = bce + dice
            best = int(per_mask.argmin())
            losses.append(per_mask[best] + F.mse_loss(iou, true_iou.detach()))
            dices.append(1 - float(dice[best].detach()))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.3f}, dice {np.mean(dices):.3f}, {time.perf_counter() - t0:.0f} s")
    return model.eval()
