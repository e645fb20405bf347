"""FilterMatch building blocks: strong view keeps image and pseudo-label aligned and shapes
intact, the filter drops exactly the lowest-q fraction by mean entropy, the schedule."""
import itertools
import math

import pytest
import torch

from ALSegLib.nnunet.filtermatch import (
    StrongAugmentation,
    cases_to_drop,
    downsample_labels,
    filter_epochs,
    mean_entropy,
    pseudo_labels,
    strong_view,
    unlabeled_weight,
)


def positional_batch(shape):
    """Images whose every voxel holds its own index, and labels equal to them."""
    n = math.prod(shape)
    x = torch.arange(n, dtype=torch.float32).reshape(shape)
    return x, x.long()


def flips_and_half_turns(t, dims):
    """All variants of ``t`` reachable by flips and 180° turns in ``dims``."""
    out = []
    for fa, fb in itertools.product((False, True), repeat=2):
        v = t
        if fa:
            v = torch.flip(v, (dims[0],))
        if fb:
            v = torch.flip(v, (dims[1],))
        out.append(v)
    return out  # a 180° turn equals flipping both axes


@pytest.mark.parametrize("shape", [(3, 1, 4, 6, 8), (3, 1, 5, 7, 7), (4, 1, 6, 6), (4, 1, 5, 9)])
@pytest.mark.parametrize("seed", range(4))
def test_geometry_keeps_voxel_correspondence_and_shape(shape, seed):
    x, y = positional_batch(shape)
    config = StrongAugmentation(p_rotate=1.0, p_flip=0.5, p_brightness=0, p_contrast=0, p_gamma=0, p_noise=0, p_blur=0)
    xs, ys = strong_view(x, y, config, torch.Generator().manual_seed(seed))
    assert xs.shape == x.shape and ys.shape == y.shape
    assert torch.equal(xs, ys.float())  # every image voxel still sits on its own label voxel
    dims = (x.ndim - 3, x.ndim - 2)  # in-plane axes of one sample
    for i in range(shape[0]):
        if shape[-1] != shape[-2]:  # non-square: only flips / half turns are allowed
            assert any(torch.equal(ys[i], v) for v in flips_and_half_turns(y[i], dims))


def test_square_patches_also_get_quarter_turns():
    x, y = positional_batch((16, 1, 6, 6))
    config = StrongAugmentation(p_rotate=1.0, p_flip=0.0, p_brightness=0, p_contrast=0, p_gamma=0, p_noise=0, p_blur=0)
    _, ys = strong_view(x, y, config, torch.Generator().manual_seed(0))
    quarter = [torch.rot90(y[0], k, (1, 2)) for k in (1, 3)]
    assert any(torch.equal(ys[i], q) for i in range(16) for q in quarter)


def test_intensity_changes_the_image_only():
    x, y = positional_batch((4, 1, 4, 6, 8))
    x = x / x.max()
    config = StrongAugmentation(p_rotate=0, p_flip=0, p_brightness=1, p_contrast=1, p_gamma=1, p_noise=1, p_blur=1)
    xs, ys = strong_view(x, y, config, torch.Generator().manual_seed(1))
    assert torch.equal(ys, y)
    assert not torch.allclose(xs, x)
    assert torch.isfinite(xs).all()


def test_mismatched_batches_refused():
    with pytest.raises(ValueError):
        strong_view(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5, dtype=torch.long))


def test_mean_entropy():
    uniform = torch.full((4, 5, 6, 7), 0.25)
    onehot = torch.zeros(4, 5, 6, 7)
    onehot[2] = 1
    assert mean_entropy(uniform) == pytest.approx(1.0)
    assert mean_entropy(uniform, normalise=False) == pytest.approx(math.log(4))
    assert mean_entropy(onehot) == pytest.approx(0.0, abs=1e-6)
    # the mean does not grow with the image: the same mixture in a bigger volume scores the same
    small = torch.cat([uniform[:, :2], onehot[:, :2]], dim=1)
    big = small.repeat(1, 3, 2, 2)
    assert mean_entropy(big) == pytest.approx(mean_entropy(small))


def test_cases_to_drop_is_exactly_the_lowest_fraction():
    scores = {f"c{i:02d}": s for i, s in enumerate([0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4])}
    assert cases_to_drop(scores, 0.15) == ["c01"]  # floor(1.5) = 1
    assert cases_to_drop(scores, 0.3) == ["c01", "c03", "c06"]  # tie at 0.1 broken by id
    assert cases_to_drop(scores, 0.0) == [] and len(cases_to_drop(scores, 1.0)) == 10
    with pytest.raises(ValueError):
        cases_to_drop(scores, 1.5)


def test_filter_schedule_never_after_the_last_epoch():
    assert filter_epochs(100, 100, 300) == [100, 200]
    assert filter_epochs(0, 1, 3) == [0, 1]
    assert filter_epochs(5, 10, 5) == []


def test_unlabeled_weight_warmup_switch_and_ramp():
    assert unlabeled_weight(4, start=5) == 0.0
    assert unlabeled_weight(5, start=5, weight=0.5) == 0.5  # hard switch, as the reference
    ramp = [unlabeled_weight(e, start=5, weight=1.0, ramp_epochs=10) for e in range(5, 20)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:])) and ramp[0] < 0.1 and ramp[-1] == 1.0


def test_downsampled_targets():
    y = torch.randint(0, 3, (2, 1, 8, 8, 8))
    out = downsample_labels(y, [(8, 8, 8), (4, 4, 4), (2, 2, 2)])
    assert [tuple(t.shape) for t in out] == [(2, 1, 8, 8, 8), (2, 1, 4, 4, 4), (2, 1, 2, 2, 2)]
    assert out[0] is y and out[1].dtype == y.dtype


def test_pseudo_labels_confidence_mask():
    # two classes, 4 voxels: top probabilities 0.5, 0.73, 0.88, 0.98
    logits = torch.tensor([[0.0, 1.0, 0.0, 4.0], [0.0, 0.0, 2.0, 0.0]]).reshape(1, 2, 2, 2)
    assert pseudo_labels(logits).flatten().tolist() == [0, 0, 1, 0]
    masked = pseudo_labels(logits, confidence=0.8, ignore_label=9)
    assert masked.shape == (1, 1, 2, 2) and masked.flatten().tolist() == [9, 9, 1, 0]
    with pytest.raises(ValueError, match="ignore label"):
        pseudo_labels(logits, confidence=0.8)


def test_filtermatch_config_checks():
    from ALSegLib.nnunet.filtermatch import FilterMatchConfig

    for bad in ({"confidence": 1.0}, {"confidence": -0.1}, {"unlabeled_batch": 0}, {"teacher": "mean"}):
        with pytest.raises(ValueError):
            FilterMatchConfig(**bad)
    config = FilterMatchConfig(confidence=0.9, unlabeled_batch=4)
    from dataclasses import asdict
    assert FilterMatchConfig.from_json(asdict(config)) == config
