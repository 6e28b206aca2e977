"""The contract suite (zsbir.testing) over every registered name of every kind: zsbir's
built-ins and every installed plugin's, one test id per kind/name; and the suite itself
catches components that break their kind's contract."""

from __future__ import annotations

import pytest

from zsbir import registry, testing
from zsbir.testing import ContractSkip, assert_contract, check_component, contract_cases

CASES = contract_cases()


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_contract(kind: str, name: str) -> None:
    assert_contract(kind, name)


def test_every_kind_and_name_is_a_case():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))
    want = {f"{r.kind}/{n}" for r in registry.registries() for n in r.names()}
    assert set(ids) == want
    builtin_kinds = {i.split("/")[0] for i in ids if i.split("/", 1)[1] in
                     registry.get_registry(i.split("/")[0]).builtin_names()}
    # every built-in kind with built-in names has its own contract
    assert builtin_kinds <= set(testing.CONTRACTS)
    assert {p.id for p in contract_cases(dist="zsbir")} <= set(ids)


BAD_SRC = """
import numpy as np
import torch
from zsbir.losses.base import Loss

class VectorLoss(Loss):
    '''Returns one value per item: not a scalar.'''
    def forward(self, out, batch, teacher):
        return out["embedding"].sum(dim=1)

class DetachedLoss(Loss):
    '''Returns a constant: no gradient.'''
    def forward(self, out, batch, teacher):
        return torch.tensor(1.0)

class OffByOne:
    '''A reranker whose scores differ from its reference.'''
    tag, needs_model, uses_queries = "off", False, False
    def fit(self, gallery, queries=None):
        self.g = np.asarray(gallery)
        return self
    def scores(self, queries, gallery):
        return np.asarray(queries) @ np.asarray(gallery).T + 1.0

def off_by_one() -> OffByOne:
    '''Cosine plus one.'''
    return OffByOne()

off_by_one.reference = lambda q, g, params: np.asarray(q) @ np.asarray(g).T

class BatchNormed:
    '''A pair scorer whose scores are centred over the block: batch-dependent.'''
    tag, outputs = "centred", ("embedding",)
    def score_pairs(self, query, gallery):
        s = (query["embedding"] * gallery["embedding"]).sum(1)
        return s - s.mean()
"""


@pytest.mark.parametrize(("kind", "name", "message"), [
    ("losses", "vector_loss", "not a scalar"),
    ("losses", "detached_loss", "no gradient"),
    ("rerankers", "off_by_one", "naive reference"),
    ("pair_scorers", "centred", "depends on the other pairs"),
])
def test_the_suite_catches_a_broken_component(fake_plugins, kind, name, message):
    fake_plugins("fake-bad-contracts", {
        "zsbir.losses": {"vector_loss": "fakeplug_contract:VectorLoss",
                         "detached_loss": "fakeplug_contract:DetachedLoss"},
        "zsbir.rerankers": {"off_by_one": "fakeplug_contract:off_by_one"},
        "zsbir.pair_scorers": {"centred": "fakeplug_contract:BatchNormed"}},
        {"fakeplug_contract": BAD_SRC})
    assert f"{kind}/{name}" in {p.id for p in contract_cases(dist="fake-bad-contracts")}
    with pytest.raises(AssertionError, match=message):
        check_component(kind, name)


def test_a_plugin_kind_is_checked_by_its_kind_spec(fake_plugins):
    src = ("from zsbir.registry import KindSpec\n"
           "def _contract(obj, comp):\n"
           "    assert obj.size > 0, f'{comp.name}: size must be positive'\n"
           "SPEC = KindSpec(summary='Croppers.', contract=_contract)\n"
           "class Crop:\n"
           "    '''Crops.'''\n"
           "    example = {'size': 4}\n"
           "    def __init__(self, size: int = 0):\n"
           "        self.size = size\n"
           "def empty(size: int = 0) -> Crop:\n"
           "    '''An empty crop.'''\n"
           "    return Crop(size)\n")
    fake_plugins("fake-croppers", {"zsbir.kinds": {"croppers": "fakeplug_crop:SPEC"},
                                   "zsbir.croppers": {"crop": "fakeplug_crop:Crop",
                                                      "empty": "fakeplug_crop:empty"}},
                 {"fakeplug_crop": src})
    assert [p.id for p in contract_cases(dist="fake-croppers")] == ["croppers/crop",
                                                                    "croppers/empty"]
    check_component("croppers", "crop")  # its declared example: size 4
    with pytest.raises(AssertionError, match="empty: size must be positive"):
        check_component("croppers", "empty")


def test_a_dataset_protocol_is_skipped_by_design():
    with pytest.raises(ContractSkip, match="^by design: "):
        check_component("protocols", "sketchy_ext")
