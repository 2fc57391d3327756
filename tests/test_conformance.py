"""Mistral conformance: every case of the corpus run on Levante (tests/support/conformance.py).

Two tests per corpus file: ``test_case`` runs it in process, each case on a fresh
LocalEngine; ``test_case_through_service`` runs it through the real service, one
``levante serve`` on a SQLite file and one worker process serving the std actions and
the corpus's mocks, shared by every case of this module (ConformanceService). Each batch
runs concurrently the first time a test asks for a result; each test then passes or
fails on its own case's checks, which are the same for both.

Cases that fail today because of a feature the engine refuses ("not supported yet"),
a documented difference or a known bug are listed in tests/conformance_gaps.txt
(``<case stem>  <reason>``) and marked xfail(strict=True): a listed case that starts
passing turns the suite red until its line is removed.

Mistral-specific wording is compared only where docs/semantics.md says Levante
matches; the other wording checks are listed in ``DOCUMENTED_DIFFERENCES`` and show up
as ConformanceDifference warnings instead of failures.

``test_service_matches_in_process`` compares, for a few representative cases, the whole
observable result (GetStatus with ids replaced) of the two runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from support.conformance import (
    CORPUS,
    CUSTOM_CHECKS,
    DOCUMENTED_DIFFERENCES,
    GAPS_FILE,
    CaseResult,
    ConformanceService,
    case_paths,
    load_case,
    read_gaps,
    run_cases_in_thread,
    snapshot,
)

PATHS = case_paths()
GAPS = read_gaps()
# Without the corpus (it lives beside the checkout, never in it) its tests skip.
needs_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"no Mistral conformance corpus at {CORPUS}"
)

# Representative cases for the service comparison: publish + env, join with an error,
# an expression failure's wording, with-items with env, a dynamic subworkflow, a retry
# (durable timers), the pause command and a resume step. Each must pass in process and
# need only what GetStatus shows.
SERVICE_CASES = (
    "test_dataflow__test_linear_dataflow",
    "test_join__test_full_join_with_errors",
    "test_direct_workflow__test_messed_yaql_in_first_task",
    "test_with_items__test_with_items_env",
    "test_subworkflows__test_dynamic_subworkflow_wf2",
    "test_policies__test_retry_policy_one_line",
    "test_commands__test_pause__SimpleEngineCommandsTest",
)


class ConformanceDifference(UserWarning):
    """A documented difference from Mistral seen while checking a case."""


def _params() -> list[Any]:
    params = []
    for path in PATHS:
        marks = []
        if path.stem in GAPS:
            marks.append(pytest.mark.xfail(reason=GAPS[path.stem], strict=True))
        params.append(pytest.param(path.stem, id=path.stem, marks=marks))
    return params


def _selected(request: pytest.FixtureRequest, test_name: str) -> set[str]:
    """Whether this session runs ``test_name`` of this module, and with which stems."""
    return {
        str(item.callspec.params["stem"]) if hasattr(item, "callspec") else ""
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.path == Path(__file__)
        and item.originalname == test_name
    }


@pytest.fixture(scope="session")
def conformance_results(request: pytest.FixtureRequest) -> dict[str, CaseResult]:
    """The in-process results of every selected case, run concurrently once per session."""
    stems = _selected(request, "test_case")
    if _selected(request, "test_service_matches_in_process"):
        stems |= set(SERVICE_CASES)
    return run_cases_in_thread(load_case(CORPUS / f"{stem}.yaml") for stem in sorted(stems))


@pytest.fixture(scope="module")
def conformance_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConformanceService]:
    """One real server and worker process for every case run through the service."""
    with ConformanceService(tmp_path_factory.mktemp("conformance")) as service:
        yield service


@pytest.fixture(scope="module")
def service_results(
    request: pytest.FixtureRequest, conformance_service: ConformanceService
) -> dict[str, CaseResult]:
    """The results of every selected case through the service, run concurrently once."""
    stems = _selected(request, "test_case_through_service")
    if _selected(request, "test_service_matches_in_process"):
        stems |= set(SERVICE_CASES)
    cases = [load_case(CORPUS / f"{stem}.yaml") for stem in sorted(stems)]
    return conformance_service.run_cases_in_thread(cases)


def _check(result: CaseResult) -> None:
    for difference in result.differences:
        warnings.warn(ConformanceDifference(difference), stacklevel=2)
    if not result.passed:
        pytest.fail("\n".join(result.failures), pytrace=False)


@pytest.mark.parametrize("stem", _params())
def test_case(stem: str, conformance_results: dict[str, CaseResult]) -> None:
    _check(conformance_results[stem])


@pytest.mark.parametrize("stem", _params())
def test_case_through_service(stem: str, service_results: dict[str, CaseResult]) -> None:
    _check(service_results[stem])


# ------------------------------------------------------------------ the lists stay honest


def test_corpus_is_there() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"no Mistral conformance corpus at {CORPUS} (set LEVANTE_CONFORMANCE): "
                    "the conformance cases are skipped")  # fmt: skip
    assert len(PATHS) > 100, f"the conformance corpus at {CORPUS} looks truncated"


@needs_corpus
def test_gaps_file_names_real_cases() -> None:
    stems = {p.stem for p in PATHS}
    unknown = sorted(set(GAPS) - stems)
    assert not unknown, f"{GAPS_FILE} lists cases that are not in the corpus: {unknown}"


def _expectation_exists(expect: Any, parts: list[str]) -> bool:
    """Whether a check path (dots also inside keys, e.g. 'result.params') is in ``expect``."""
    if not parts:
        return True
    if not isinstance(expect, Mapping):
        return False
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in expect and _expectation_exists(expect[key], parts[n:]):
            return True
    return False


@needs_corpus
def test_documented_differences_name_real_checks() -> None:
    stems = {p.stem for p in PATHS}
    wrong = []
    for stem, path in DOCUMENTED_DIFFERENCES:
        if stem not in stems:
            wrong.append((stem, path, "no such case"))
            continue
        expect = load_case(CORPUS / f"{stem}.yaml").expect
        if not _expectation_exists(expect, path.split(".")):
            wrong.append((stem, path, "no such expectation"))
    assert not wrong, wrong


@needs_corpus
def test_custom_checks_cover_the_corpus() -> None:
    custom = {p.stem for p in PATHS if "custom" in load_case(p).expect}
    assert custom == set(CUSTOM_CHECKS), "each prose 'custom' expectation needs its code"


# ------------------------------------------------------------------ the real service


@needs_corpus
def test_service_matches_in_process(
    conformance_results: dict[str, CaseResult], service_results: dict[str, CaseResult]
) -> None:
    for stem in SERVICE_CASES:
        assert stem not in GAPS, f"{stem} is a known gap; pick a passing case"
        local, service = conformance_results[stem], service_results[stem]
        assert local.passed, local.summary()
        assert service.passed, service.summary()
        assert local.facts.info is not None and service.facts.info is not None
        assert snapshot(service.facts.info) == snapshot(local.facts.info), stem
