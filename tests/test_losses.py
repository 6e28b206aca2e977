"""The SAKE / SBTKNet losses against naive per-item implementations of the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch

from zsbir.context import BuildContext
from zsbir.losses.distillation import KnowledgePreservationLoss, SakeLoss
from zsbir.losses.metric import DomainQuadrupletLoss

C = 1000  # ImageNet classes


# ----------------------------------------------------------------------------- naive versions
def naive_soft_ce(student: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``sum_m -q_m log softmax(s)_m`` for one item, written out with exp/log sums."""
    q_den = sum(math.exp(v) for v in target_logits.tolist())
    q = [math.exp(v) / q_den for v in target_logits.tolist()]
    log_z = torch.log(torch.exp(student).sum())
    return -(torch.tensor(q, dtype=student.dtype) * (student - log_z)).sum()


def naive_sake(student, teacher, labels, domains, a, lambda1, lambda2, photos_only):
    """L_SAKE = 1/N sum_i sum_m -q_im log softmax(s_i)_m, q_i = softmax(l1 t_i + l2 a_{y_i})."""
    terms = []
    for i in range(student.shape[0]):
        if photos_only and int(domains[i]) != 0:
            continue
        logits = [lambda1 * float(teacher[i, m]) + lambda2 * float(a[int(labels[i]), m])
                  for m in range(student.shape[1])]
        terms.append(naive_soft_ce(student[i], torch.tensor(logits, dtype=torch.float64)))
    return sum(terms) / len(terms) if terms else student.sum() * 0


def naive_knowledge(student, teacher, temperature=1.0):
    """Eq. 5: 1/(4N) sum_i sum_{I in Q} -q(l(I)) log softmax(FC_soft(I))."""
    t = temperature
    terms = [naive_soft_ce(student[i] / t, teacher[i] / t) * t * t
             for i in range(student.shape[0])]
    return sum(terms) / len(terms)


def naive_quadruplet(emb, margin, normalize=False, squared=True):
    """Eq. 2 with d_s- = d(anchor, negative sketch); items [a, p+, p-, s-] * N."""
    def d(x, y):
        s = sum((x[k] - y[k]) ** 2 for k in range(len(x)))
        return s if squared else torch.sqrt(s)

    n = emb.shape[0] // 4
    total = 0
    for i in range(n):
        a, p, pn, sn = (emb[4 * i + j] for j in range(4))
        if normalize:
            a, p, pn, sn = (v / torch.sqrt((v * v).sum()) for v in (a, p, pn, sn))
        total = total + torch.clamp(d(a, p) - d(a, pn) + margin, min=0)
        total = total + torch.clamp(d(a, p) - d(a, sn) + margin, min=0)
    return total / (2 * n)


# ----------------------------------------------------------------------------- helpers
def make_batch(seed: int, b: int, n_seen: int = 7, classes: int = C, domains=None):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, classes, generator=g) * 3).double()
    teacher = torch.randn(b, classes, generator=g) * 4
    labels = torch.randint(0, n_seen, (b,), generator=g)
    if domains is None:
        domains = torch.randint(0, 2, (b,), generator=g)
    a = torch.rand(n_seen, classes, generator=g)
    batch = {"label": labels, "domain": torch.as_tensor(domains), "index": torch.arange(b)}
    return student, teacher, batch, a


def grads_of(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def assert_same(fast_fn, naive_fn, x: torch.Tensor, tol: float = 1e-5) -> None:
    """Same value and same gradient w.r.t. ``x`` (the fast path runs in float32)."""
    v_fast, g_fast = grads_of(fast_fn, x.float())
    v_naive, g_naive = grads_of(naive_fn, x.double())
    assert v_fast.dtype == torch.float32
    torch.testing.assert_close(v_fast.double(), v_naive, rtol=tol, atol=tol)
    torch.testing.assert_close(g_fast.double(), g_naive, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- sake
SAKE_CASES = [
    # seed, batch, classes, lambda1, lambda2, photos_only
    (0, 6, 1000, 1.0, 0.3, True),
    (1, 5, 1000, 1.0, 0.3, False),
    (2, 9, 50, 0.0, 0.3, True),    # semantic-only
    (3, 4, 50, 1.0, 0.0, False),   # plain teacher loss L_T
    (4, 8, 50, 2.0, 5.0, True),
    (5, 1, 50, 1.0, 1.0, False),
]


@pytest.mark.parametrize("seed,b,classes,lambda1,lambda2,photos_only", SAKE_CASES)
def test_sake_matches_naive(seed, b, classes, lambda1, lambda2, photos_only):
    student, teacher, batch, a = make_batch(seed, b, classes=classes)
    batch["domain"][0] = 0  # at least one photo
    loss = SakeLoss.from_matrix(a, lambda1=lambda1, lambda2=lambda2, photos_only=photos_only)
    assert_same(
        lambda s: loss({"imagenet_logits": s}, batch, teacher),
        lambda s: naive_sake(s, teacher, batch["label"], batch["domain"], a, lambda1, lambda2,
                             photos_only),
        student,
    )


def test_sake_rows_indexed_by_label():
    """Only row y_i of A matters: changing other rows leaves the loss unchanged, changing
    row y_i changes it; a one-hot row with a huge lambda2 pins q_i on that column."""
    student, teacher, batch, a = make_batch(11, 4, n_seen=5, classes=30, domains=[0, 0, 0, 0])
    batch["label"] = torch.tensor([3, 3, 3, 3])
    out = {"imagenet_logits": student.float()}
    base = SakeLoss.from_matrix(a, lambda2=0.3)(out, batch, teacher)
    a2 = a.clone()
    a2[[0, 1, 2, 4]] = torch.rand(4, 30) * 10
    assert torch.equal(SakeLoss.from_matrix(a2, lambda2=0.3)(out, batch, teacher), base)
    a2[3, 7] += 5
    assert not torch.allclose(SakeLoss.from_matrix(a2, lambda2=0.3)(out, batch, teacher), base)
    onehot = torch.zeros(5, 30)
    onehot[3, 12] = 1.0
    loss = SakeLoss.from_matrix(onehot, lambda1=0.0, lambda2=1e4)(out, batch, None)
    expected = -torch.log_softmax(student.float(), dim=1)[:, 12].mean()
    torch.testing.assert_close(loss, expected)


def test_sake_no_photos_is_zero_with_finite_gradient():
    student, teacher, batch, a = make_batch(7, 6, domains=[1] * 6)
    s = student.float().requires_grad_(True)
    value = SakeLoss.from_matrix(a)({"imagenet_logits": s}, batch, teacher)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    # photos_only=False still counts the sketches
    value = SakeLoss.from_matrix(a, photos_only=False)({"imagenet_logits": s}, batch, teacher)
    assert value.item() > 0


def test_sake_photos_only_ignores_sketch_rows():
    student, teacher, batch, a = make_batch(8, 6, domains=[0, 1, 0, 1, 1, 0])
    loss = SakeLoss.from_matrix(a)
    base = loss({"imagenet_logits": student.float()}, batch, teacher)
    student[1] += 100 * torch.randn(C, dtype=torch.float64)
    teacher[3] = -teacher[3]
    assert torch.equal(loss({"imagenet_logits": student.float()}, batch, teacher), base)


def test_sake_lambda2_zero_needs_no_wordnet():
    student, teacher, batch, _ = make_batch(9, 4)
    batch["domain"][0] = 0
    ctx = BuildContext(seen_classes=["a", "b"])  # names WordNet would not know
    loss = SakeLoss(lambda1=1.0, lambda2=0.0, ctx=ctx)
    assert loss.semantics is None
    expected = naive_sake(student, teacher, batch["label"], batch["domain"], torch.zeros(7, C),
                          1.0, 0.0, True)
    torch.testing.assert_close(loss({"imagenet_logits": student.float()}, batch, teacher).double(),
                               expected, rtol=1e-5, atol=1e-5)


def test_sake_semantics_from_ctx(monkeypatch):
    """lambda2 != 0 with ctx computes A once, from ctx.seen_classes and the mapping file."""
    import sys
    import types

    calls = []

    def semantic_matrix(class_names, mapping_file=None, cache_dir=None):
        calls.append((class_names, mapping_file, cache_dir))
        return torch.ones(len(class_names), C)

    monkeypatch.setitem(sys.modules, "zsbir.semantics",
                        types.SimpleNamespace(semantic_matrix=semantic_matrix))
    ctx = BuildContext(seen_classes=["cat", "dog", "car"])
    loss = SakeLoss(lambda2=0.3, mapping_file="map.tsv", ctx=ctx)
    assert calls == [(["cat", "dog", "car"], "map.tsv", ctx.cache_dir)]
    assert loss.semantics.shape == (3, C) and loss.semantics.dtype == torch.float32
    assert "semantics" in dict(loss.named_buffers())
    assert "semantics" not in loss.state_dict()  # not persisted in checkpoints
    with pytest.raises(ValueError, match="rows"):
        loss.set_semantics(torch.ones(4, C))
    SakeLoss(lambda2=0.0, ctx=ctx)
    assert len(calls) == 1


def test_sake_buffer_follows_to():
    loss = SakeLoss.from_matrix(torch.rand(3, C))
    loss = loss.to(torch.float64)  # buffers follow module casts / moves
    assert loss.semantics.dtype == torch.float64


def test_sake_errors():
    student, teacher, batch, a = make_batch(10, 4)
    out = {"imagenet_logits": student.float()}
    with pytest.raises(RuntimeError, match="semantic matrix"):
        SakeLoss(lambda2=0.3)(out, batch, teacher)
    with pytest.raises(ValueError, match="teacher"):
        SakeLoss.from_matrix(a)(out, batch, None)
    with pytest.raises(ValueError, match="match"):
        SakeLoss.from_matrix(a)(out, batch, teacher[:, :10])
    with pytest.raises(ValueError, match="columns"):
        SakeLoss.from_matrix(a[:, :10])(out, batch, teacher)
    with pytest.raises(KeyError, match="imagenet_logits"):
        SakeLoss.from_matrix(a)({"embedding": student}, batch, teacher)
    with pytest.raises(ValueError, match="lambda1"):
        SakeLoss(lambda1=-1.0)
    from zsbir.registry import declared

    assert declared(SakeLoss, "requires", {"lambda1": 1.0}) == {"teacher"}
    assert declared(SakeLoss, "requires", {"lambda1": 0.0}) == frozenset()  # WordNet alone
    assert SakeLoss.output_keys == {"imagenet_logits"}


# ----------------------------------------------------------------------------- knowledge
@pytest.mark.parametrize("seed,b,classes,temperature", [
    (0, 8, 1000, 1.0), (1, 4, 1000, 1.0), (2, 12, 40, 2.0), (3, 16, 40, 0.5),
])
def test_knowledge_preservation_matches_naive(seed, b, classes, temperature):
    student, _, batch, _ = make_batch(seed, b, classes=classes)
    # class-mean teacher: the same row for every item of a class
    g = torch.Generator().manual_seed(100 + seed)
    class_logits = torch.randn(7, classes, generator=g) * 3
    teacher = class_logits[batch["label"]]
    loss = KnowledgePreservationLoss(temperature=temperature)
    assert_same(lambda s: loss({"imagenet_logits": s}, batch, teacher),
                lambda s: naive_knowledge(s, teacher, temperature), student)


def test_knowledge_preservation_counts_all_items_by_default():
    student, teacher, batch, _ = make_batch(5, 8, domains=[1] * 8)
    assert KnowledgePreservationLoss()({"imagenet_logits": student.float()}, batch, teacher) > 0
    kp = KnowledgePreservationLoss(photos_only=True)
    assert kp({"imagenet_logits": student.float()}, batch, teacher).item() == 0.0


def test_knowledge_preservation_is_sake_teacher_loss():
    """At T = 1 it equals SAKE's L_teacher (lambda1 = 1, lambda2 = 0) over all items."""
    student, teacher, batch, _ = make_batch(6, 8)
    out = {"imagenet_logits": student.float()}
    kp = KnowledgePreservationLoss()(out, batch, teacher)
    lt = SakeLoss(lambda1=1.0, lambda2=0.0, photos_only=False)(out, batch, teacher)
    torch.testing.assert_close(kp, lt)
    assert KnowledgePreservationLoss.requires == frozenset({"teacher"})
    assert KnowledgePreservationLoss.output_keys == {"imagenet_logits"}
    with pytest.raises(ValueError, match="temperature"):
        KnowledgePreservationLoss(temperature=0.0)


# ----------------------------------------------------------------------------- quadruplet
@pytest.mark.parametrize("seed,n,d,margin,normalize,squared", [
    (0, 1, 3, 0.2, False, True),
    (1, 4, 8, 0.2, False, True),
    (2, 16, 16, 0.5, True, True),
    (3, 5, 4, 1.0, False, False),
    (4, 7, 6, 0.3, True, False),
    (5, 3, 2, 0.0, False, True),
])
def test_domain_quadruplet_matches_naive(seed, n, d, margin, normalize, squared):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4 * n, d, generator=g) * 0.7
    loss = DomainQuadrupletLoss(margin=margin, normalize=normalize, squared=squared)
    assert_same(lambda e: loss({"embedding": e}, {}, None),
                lambda e: naive_quadruplet(e, margin, normalize, squared), emb)


def test_domain_quadruplet_uses_the_negative_sketch():
    """d_s- is measured to the negative sketch (position 3), not the negative photo."""
    emb = torch.zeros(4, 2)
    emb[1] = torch.tensor([0.1, 0.0])   # positive photo: close
    emb[2] = torch.tensor([5.0, 0.0])   # negative photo: far (hinge inactive)
    emb[3] = torch.tensor([0.0, 0.05])  # negative sketch: closer than the positive
    value = DomainQuadrupletLoss(margin=0.2)({"embedding": emb}, {}, None)
    torch.testing.assert_close(value, torch.tensor((0.01 - 0.0025 + 0.2) / 2))


def test_domain_quadruplet_inactive_hinges_give_zero():
    g = torch.Generator().manual_seed(3)
    n, d = 6, 5
    emb = torch.randn(n, 4, d, generator=g) * 0.01
    emb[:, 2] += 10.0  # negatives far away
    emb[:, 3] -= 10.0
    e = emb.reshape(4 * n, d).requires_grad_(True)
    value = DomainQuadrupletLoss(margin=0.2)({"embedding": e}, {}, None)
    assert value.item() == 0.0
    value.backward()
    assert (e.grad == 0).all()


def test_domain_quadruplet_errors():
    loss = DomainQuadrupletLoss()
    for b in (0, 3, 6, 10):
        with pytest.raises(ValueError, match="multiple of 4"):
            loss({"embedding": torch.randn(b, 8)}, {}, None)
    with pytest.raises(ValueError, match="margin"):
        DomainQuadrupletLoss(margin=-0.1)
    assert DomainQuadrupletLoss.roles == frozenset(
        {"anchor", "positive", "negative", "negative_sketch"})
    with pytest.raises(ValueError, match="negative_sketch"):  # a triplet batch has no 4th role
        loss({"embedding": torch.randn(6, 8)},
             {"tuples": torch.arange(6).view(2, 3), "roles": ("anchor", "positive", "negative")},
             None)


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 5), (2, 9)])
def test_domain_quadruplet_reads_tuples_by_role(seed, n):
    """Rows scattered over the batch and roles in another column order: the loss reads
    ``batch["tuples"]`` by role and equals the naive loss on the quadruplets laid out in
    order (values and gradients)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4 * n, 6, generator=g)
    perm = torch.randperm(4 * n, generator=g)
    scattered = torch.empty_like(emb)
    scattered[perm] = emb  # row i in order sits at row perm[i]
    order = [2, 0, 3, 1]  # columns: negative, anchor, negative_sketch, positive
    roles = ("anchor", "positive", "negative", "negative_sketch")
    tuples = perm.view(n, 4)[:, order]
    batch = {"tuples": tuples, "roles": tuple(roles[j] for j in order)}
    loss = DomainQuadrupletLoss(margin=0.3)
    assert_same(lambda e: loss({"embedding": e}, batch, None),
                lambda e: naive_quadruplet(e[perm], 0.3), scattered)


def test_registered_names():
    from zsbir.registry import losses

    assert losses._components["sake"].obj is SakeLoss
    assert losses._components["knowledge_preservation"].obj is KnowledgePreservationLoss
    assert losses._components["domain_quadruplet"].obj is DomainQuadrupletLoss
