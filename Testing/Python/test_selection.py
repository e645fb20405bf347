"""Selection: k-center greedy against a brute-force reference, budgets, determinism,
uncertainty on hand-built probability maps, and the review queue on a real project."""
import json
import math
import re

import numpy as np
import pytest
from conftest import tree_hash

from ALSegLib import rounds
from ALSegLib.errors import InputError
from ALSegLib.selection import coreset
from ALSegLib.selection.coreset import k_center_greedy
from ALSegLib.selection.features import case_features, histogram_features
from ALSegLib.selection.run import select_cases
from ALSegLib.selection.strategies import Pool, parse_budget, select
from ALSegLib.selection.uncertainty import Uncertainty, case_uncertainty, entropy_map, focus_region, label_disagreement


def brute_force(x, k, seeds=None, metric="cosine", weights=None, first=0):
    """The textbook algorithm in float64 with a full distance matrix."""
    x = np.asarray(x, np.float64)
    pts = x if seeds is None else np.vstack([x, seeds])
    if metric == "cosine":
        u = pts / np.linalg.norm(pts, axis=1, keepdims=True)
        d = 1 - u @ u.T
    else:
        d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    n = len(x)
    centers = list(range(n, len(pts)))
    picks = []
    for step in range(k):
        if step == 0 and not centers:
            i = first
        else:
            near = d[:n, centers].min(axis=1)
            score = near * (weights if weights is not None else 1)
            score[picks] = -np.inf
            i = int(np.argmax(score))
        picks.append(i)
        centers.append(i)
    return picks


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("trial", range(4))
def test_k_center_greedy_equals_brute_force(metric, trial):
    rng = np.random.default_rng(trial)
    x = rng.normal(size=(60, 8))
    seeds = rng.normal(size=(5, 8)) if trial % 2 else None
    weights = rng.uniform(0.1, 1, 60) if trial >= 2 else None
    first = int(np.argmax(weights)) if weights is not None else 0
    got = [c.index for c in k_center_greedy(x, 12, seeds=seeds, metric=metric, weights=weights)]
    assert got == brute_force(x, 12, seeds, metric, weights, first)


def brute_typicality(x, metric, neighbours, ref_idx):
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1 - u @ u[ref_idx].T
    else:
        d = np.sqrt(((x[:, None, :] - x[ref_idx][None, :, :]) ** 2).sum(-1))
    out = []
    for i, row in enumerate(d):
        others = sorted(v for j, v in zip(ref_idx, row) if j != i)
        out.append(1 / np.mean(others[:neighbours]))
    return np.array(out)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("references", [1000, 17])
def test_typicality_equals_brute_force_with_and_without_a_reference_subset(metric, references, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 6))
    monkeypatch.setattr(coreset, "TYPICALITY_CHUNK_BYTES", 4 * 17 * 7)  # several row blocks
    got = coreset.typicality(x, metric, neighbours=5, references=references)
    ref_idx = np.arange(50) if references >= 50 else np.linspace(0, 49, references).round().astype(int)
    np.testing.assert_allclose(got, brute_typicality(x, metric, 5, ref_idx), rtol=1e-4)
    assert np.array_equal(got, coreset.typicality(x, metric, neighbours=5, references=references))
    assert coreset.typicality(x[:1]).tolist() == [1.0]


def test_hybrid_leaves_out_an_isolated_case_that_coreset_and_uncertainty_pick_first():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 8)) * 3
    x = np.vstack([centers[i % 4] + 0.3 * rng.normal(size=8) for i in range(40)] + [rng.normal(size=8) * 3 + 20])
    cases = [f"c{i:03d}" for i in range(41)]
    unc = {c: Uncertainty(0.2, 0.3 + 0.001 * i, None) for i, c in enumerate(cases[2:])}  # the outlier is the most uncertain
    pool = Pool(cases[2:], cases[:2], x[2:].astype(np.float32), x[:2].astype(np.float32), unc, metric="euclidean")
    outlier = cases[-1]
    assert select("coreset", pool, 4)[0].case == outlier
    assert select("uncertainty", pool, 1)[0].case == outlier
    picks = select("hybrid", pool, 4)
    assert outlier not in {p.case for p in picks}
    # the picks cover the clusters the labeled cases (clusters 0 and 1) leave uncovered
    assert {int(c[1:]) % 4 for c in (p.case for p in picks[:2])} == {2, 3}


def test_k_center_records_distances_and_chunks_seeds(monkeypatch):
    rng = np.random.default_rng(7)
    x, seeds = rng.normal(size=(40, 6)), rng.normal(size=(9, 6))
    whole = k_center_greedy(x, 10, seeds=seeds, metric="euclidean")
    monkeypatch.setattr(coreset, "CHUNK_BYTES", 4 * 40 * 2)  # two seeds per chunk
    chunked = k_center_greedy(x, 10, seeds=seeds, metric="euclidean")
    assert [c.index for c in chunked] == [c.index for c in whole]
    # each recorded distance is the distance to the nearest seed or earlier pick, and they never grow
    for step, c in enumerate(whole):
        covered = np.vstack([seeds, x[[p.index for p in whole[:step]]]])
        assert c.distance == pytest.approx(np.linalg.norm(covered - x[c.index], axis=1).min(), rel=1e-4)
    assert all(a.distance >= b.distance - 1e-6 for a, b in zip(whole, whole[1:]))


def test_k_center_edge_cases():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    picks = k_center_greedy(x, 10, metric="cosine")  # k capped at N; duplicates and a zero row are fine
    assert sorted(c.index for c in picks) == [0, 1, 2, 3] and k_center_greedy(x, 0) == []
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ValueError, match="dimensions"):
        k_center_greedy(x, 1, seeds=np.ones((1, 3)))
    with pytest.raises(ValueError, match="metric"):
        k_center_greedy(x, 1, metric="manhattan")


@pytest.mark.parametrize("budget,total,expected", [
    ("0", 100, 0), (0, 100, 0), ("1", 100, 1), (5, 3, 5), ("5%", 100, 5), ("5%", 30, 2), ("5%", 10, 1),
    ("2.5%", 100, 3), ("0%", 50, 0), ("100%", 7, 7), ("1%", 0, 0), (" 10% ", 55, 6),
])
def test_budgets(budget, total, expected):
    assert parse_budget(budget, total) == expected


@pytest.mark.parametrize("bad", ["-1", "1.5", "abc", "101%", "-5%", "%", ""])
def test_bad_budgets_refused(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad, 100)


def hand_pool(n=30, labeled=3, seed=0):
    rng = np.random.default_rng(seed)
    cases = [f"c{i:03d}" for i in range(n)]
    feats = rng.normal(size=(n, 5)).astype(np.float32)
    unc = {c: Uncertainty(float(rng.uniform(0, 0.3)), float(rng.uniform(0, 1)), None) for c in cases[labeled:]}
    return Pool(cases[labeled:], cases[:labeled], feats[labeled:], feats[:labeled], unc)


@pytest.mark.parametrize("strategy", ["random", "uncertainty", "coreset", "hybrid", "hybrid-weighted"])
def test_strategies_deterministic_with_reasons_and_budget_caps(strategy):
    pool = hand_pool()
    a, b = select(strategy, pool, 6, seed=3), select(strategy, pool, 6, seed=3)
    assert a == b and len(a) == 6 and len({p.case for p in a}) == 6
    assert {p.case for p in a} <= set(pool.candidates)
    assert all(isinstance(p.reason, str) and p.reason for p in a)
    assert select(strategy, pool, 0) == []
    assert len(select(strategy, pool, 1)) == 1
    assert sorted(p.case for p in select(strategy, pool, 1000)) == pool.candidates  # more than the pool: all of it


def test_strategy_choices_follow_their_definition():
    pool = hand_pool()
    scores = {c: u.score for c, u in pool.uncertainty.items()}
    ranked = sorted(scores, key=lambda c: (-scores[c], c))
    unc = select("uncertainty", pool, 5)
    assert [p.case for p in unc] == ranked[:5] and "top" in unc[0].reason
    every = np.vstack([pool.features, pool.labeled_features])
    mean = every.astype(np.float64).mean(axis=0).astype(np.float32)  # cosine reads centred features
    typ = coreset.typicality(every - mean)[: len(pool.candidates)]
    floor = np.quantile(typ, 0.25)
    typical = [c for c, t in zip(pool.candidates, typ) if t >= floor]
    hybrid = select("hybrid", pool, 3)  # within the top max(3k, 25 %) = 9 most uncertain typical cases
    assert {p.case for p in hybrid} <= set([c for c in ranked if c in typical][:9])
    assert all("typical of the pool" in p.reason for p in hybrid)
    core = select("coreset", pool, 4)
    expected = brute_force(pool.features - mean, 4, pool.labeled_features - mean, "cosine")
    assert [p.case for p in core] == [pool.candidates[i] for i in expected]
    # the first pick's reason gives its own distance to the nearest labeled case, and words that fit its ratio
    u = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    first = pool.candidates.index(core[0].case)
    nearest = float((1 - u(pool.features - mean)[first] @ u(pool.labeled_features - mean).T).min())
    m = re.fullmatch(r"(far from every case already covered|away from the cases already covered|close to cases already "
                     r"covered) \(distance ([0-9.e+-]+), ([0-9.]+)x the pool's median\)", core[0].reason)
    assert m, core[0].reason
    assert float(m.group(2)) == pytest.approx(nearest, rel=6e-3)  # printed with 3 significant digits
    ratio = float(m.group(3))
    assert m.group(1) == ("far from every case already covered" if ratio >= 1.5 else
                          "away from the cases already covered" if ratio >= 0.75 else "close to cases already covered")
    assert select("random", pool, 5, seed=1) != select("random", pool, 5, seed=2)


def test_without_labeled_cases_coreset_starts_from_a_seeded_draw_and_hybrid_from_the_most_uncertain():
    pool = hand_pool(labeled=0)
    pool.labeled_features = None
    assert select("coreset", pool, 3, seed=0) == select("coreset", pool, 3, seed=0)
    top = max(pool.candidates, key=lambda c: pool.uncertainty[c].score)
    first = select("hybrid", pool, 3)[0]
    assert first.case == top and "no labeled case yet" in first.reason


def test_strategies_refuse_missing_inputs():
    pool = hand_pool()
    pool.uncertainty = {c: pool.uncertainty[c] for c in pool.candidates[:-1]}
    with pytest.raises(ValueError, match="1 missing"):
        select("hybrid", pool, 2)
    with pytest.raises(ValueError, match="feature vector"):
        select("coreset", Pool(["a", "b"]), 1)
    with pytest.raises(ValueError, match="unknown strategy"):
        select("best", pool, 1)


# --- uncertainty on hand-built probability maps ----------------------------------------------


def test_entropy_is_normalised_and_focused_on_the_structure():
    p = np.zeros((3, 1, 10, 10), np.float32)
    p[0] = 1.0  # certain background everywhere...
    p[:, 0, 4:6, 4:6] = np.array([0.0, 0.5, 0.5])[:, None, None]  # ...except a 2x2 coin toss between classes 1 and 2
    h = entropy_map(p)
    assert h[0, 0, 0] == pytest.approx(0.0, abs=1e-6) and h[0, 4, 4] == pytest.approx(math.log(2) / math.log(3), rel=1e-5)
    u = case_uncertainty(p, [0, 1, 2], band=1)
    assert u.entropy == pytest.approx(4 * math.log(2) / math.log(3) / 100, rel=1e-4)
    region = focus_region(p, band=1)
    assert region.sum() == 4 + 8  # the 2x2 block and its 4-connected ring
    assert u.focused_entropy == pytest.approx(4 * math.log(2) / math.log(3) / 12, rel=1e-4)
    assert u.disagreement is None and u.score == pytest.approx((0.5 * u.focused_entropy + 0.2 * u.entropy) / 0.7)
    uniform = np.full((4, 2, 3, 3), 0.25, np.float32)
    assert case_uncertainty(uniform).entropy == pytest.approx(1.0, rel=1e-5)


def test_empty_prediction_and_disagreement_with_the_pseudo_label():
    p = np.zeros((2, 1, 6, 6), np.float32)
    p[0] = 1.0
    u = case_uncertainty(p, [0, 7], pseudo_label=np.zeros((1, 6, 6), np.uint8))
    assert u.focused_entropy == u.entropy == pytest.approx(0.0, abs=1e-6) and u.disagreement == 0.0
    pseudo = np.zeros((1, 6, 6), np.uint8)
    pseudo[0, :2, :2] = 7
    assert case_uncertainty(p, [0, 7], pseudo_label=pseudo).disagreement == 1.0
    a, b = np.zeros((4, 4), int), np.zeros((4, 4), int)
    a[:2], b[:1] = 3, 3  # Dice 2*4/(8+4) = 2/3
    assert label_disagreement(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="class values"):
        case_uncertainty(p, [0], pseudo_label=pseudo)


# --- on a real project: histogram features, the queue, refusals ------------------------------


def test_histogram_features_are_deterministic_and_modality_aware(project):
    case = project.cases()[0]
    img = project.read_image(case)
    f = histogram_features(img, "CT")
    assert f.shape == (34,) and f.dtype == np.float32 and f[:32].sum() == pytest.approx(1.0, rel=1e-5)
    assert np.array_equal(f, histogram_features(img, "CT"))
    assert not np.array_equal(f, histogram_features(img, "MRI"))
    source, matrix = case_features(project, project.cases(), "auto")
    assert source == "histogram" and matrix.shape == (6, 34)


def test_select_writes_the_queue_and_never_proposes_labeled_pending_or_excluded_cases(project, run_cli):
    cases = project.cases()
    project.add_human_label(cases[0], project.read_label(cases[0], "reference"), source="simulated")
    code, out, err = run_cli("select", project.root, "--budget", "2", "--strategy", "coreset", "--exclude", cases[5])
    assert code == 0, err
    first = rounds.read_round(project, 1)
    picked = [q["case"] for q in first["queue"]]
    assert len(picked) == 2 and not set(picked) & {cases[0], cases[5]}
    assert first["selection"]["features"] == "histogram" and first["stages"]["select"]
    assert all(q["reason"] for q in first["queue"]) and picked[0] in out
    assert all(q["open_with"] is None for q in first["queue"])  # no pseudo-label or prediction to open with
    code, out, _ = run_cli("queue", project.root, "--json")
    assert code == 0 and [i["case"] for i in json.loads(out)] == picked
    # the second selection skips the cases waiting for review, and gets a new round
    second = select_cases(project, "50%", "coreset", exclude=[cases[5]])
    assert second["round"] == 2 and len(second["queue"]) == 2  # half of 5 cases, rounded up; only 2 left
    assert set(q["case"] for q in second["queue"]) == set(cases[1:5]) - set(picked)
    # a human label ends a case's wait; nothing else is left to propose
    project.add_human_label(picked[0], project.read_label(picked[0], "reference"))
    status = {i["case"]: i["status"] for i in rounds.queue_items(project)}
    assert status[picked[0]] == "labeled" and status[picked[1]] == "pending"
    third = select_cases(project, 3, "random", exclude=[cases[5]])
    assert third["queue"] == [] and third["selection"]["candidates"] == 0
    code, out, _ = run_cli("queue", project.root)
    assert picked[0] not in out and picked[1] in out


def test_selection_refusals_leave_the_project_untouched(project, run_cli):
    before = tree_hash(project.root)
    for args, words in [
        (("--budget", "lots"), "budget"),
        (("--budget", "2", "--exclude", "nope"), "nope"),
        (("--budget", "2", "--strategy", "hybrid"), "predict"),  # no model has probabilities
        (("--budget", "2", "--strategy", "coreset", "--features", "sam"), "missing for 6 of 6"),
        (("--budget", "2", "--strategy", "coreset", "--features", "nnunet", "--model", "m"), "alseg predict"),
        (("--budget", "2", "--strategy", "coreset", "--features", "nnunet"), "needs --model"),
    ]:
        code, out, err = run_cli("select", project.root, *args)
        assert code == 2 and words in err, (args, err)
    code, _, err = run_cli("queue", project.root, "--round", "4")
    assert code == 2 and "round 4" in err
    assert tree_hash(project.root) == before


def test_a_broken_feature_file_is_named(project):
    folder = project.root / "features" / "sam"
    folder.mkdir(parents=True)
    for case in project.cases():
        np.save(folder / f"{case}.npy", np.ones(4, np.float32))
    (folder / f"{project.cases()[2]}.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match=f"{project.cases()[2]}.npy"):
        case_features(project, project.cases(), "sam")


def test_bottleneck_pool_takes_the_last_convolution_before_its_instance_norm():
    """After nnU-Net's instance norm and leaky ReLU each channel's spatial mean is almost
    the same for every input; the pre-norm output tells inputs apart."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from ALSegLib.nnunet.features import BottleneckPool

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 2, (2, 2), False,
                        torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}).eval()
    post = []
    net.encoder.stages[-1].register_forward_hook(lambda m, i, o: post.append(o.mean(dim=(2, 3))[0].clone()))
    pool = BottleneckPool(net)
    pre = []
    with torch.no_grad():
        for i in range(6):
            pool.reset()
            x = torch.randn(1, 1, 32, 32) * (1 + i) + torch.linspace(0, 3 * i, 32)[None, None, :, None]
            net(x)
            pre.append(pool.vector())
    pre, post = np.stack(pre), torch.stack(post).numpy()
    assert pre.shape == (6, 32) and np.isfinite(pre).all()

    def spread(v):  # between-input std relative to the typical magnitude
        return float(v.std(axis=0).mean() / np.abs(v).mean())
    assert spread(pre) > 2 * spread(post)  # 3.6x with this seed
    pool.close()


def test_entropy_of_float16_probabilities_stays_in_0_1():
    from ALSegLib.selection.uncertainty import entropy_map

    # four near-uniform classes just above 1/4 (float16 rounds 0.2502 to 0.25024): they sum past 1, and
    # -p log p still rises there, so the unclipped entropy exceeds log 4
    p = np.full((4, 4, 4), 0.2502, dtype=np.float16)
    assert float(p.astype(np.float32).sum(axis=0).max()) > 1.0
    h = entropy_map(p)
    assert h.max() <= 1.0 and h.min() >= 0.0 and h.max() > 0.999


def test_cosine_selection_reads_features_centred_on_their_common_mean():
    """Pooled activations share a large offset (the demo's phantoms: channel means 0.36 against a
    spread of 0.013 between cases): raw cosine put every pair 0.000 apart. Two groups that differ only
    along that offset are one direction to raw cosine; centred, coreset picks the uncovered group and
    the reason's distance is a real one, far beyond the pool's median."""
    rng = np.random.default_rng(5)
    offset = np.abs(rng.normal(size=16)) + 1.0
    group_a = [offset * 1.00 + 0.002 * rng.normal(size=16) for _ in range(10)]
    group_b = [offset * 1.06 + 0.002 * rng.normal(size=16) for _ in range(10)]
    x = np.vstack(group_a + group_b).astype(np.float32)
    cases = [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
    raw = 1 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    assert raw.max() < 1e-3  # what the strategies saw before
    labeled = [0, 1]  # two cases of group a are labeled
    rest = [i for i in range(20) if i not in labeled]
    pool = Pool([cases[i] for i in rest], [cases[i] for i in labeled], x[rest], x[labeled])
    pick = select("coreset", pool, 1)[0]
    assert pick.case.startswith("b")
    assert pick.reason.startswith("away from the cases already covered") and "distance 0.000" not in pick.reason
    assert float(pick.reason.split("distance ")[1].split(",")[0]) > 0.5
    # the labeled rows are shifted by the same mean: a labeled copy of a candidate is at distance 0
    twin = Pool([cases[i] for i in rest], ["copy"], x[rest], x[rest[:1]])
    assert select("coreset", twin, len(rest))[-1].score == pytest.approx(0.0, abs=1e-5)
    # without labeled cases the yardstick is the pool's own spacing, so the words still carry a ratio
    first_two = select("coreset", Pool(cases, [], x, None), 2, seed=3)
    assert "x the pool's median" in first_two[1].reason and first_two[1].case[0] != first_two[0].case[0]
