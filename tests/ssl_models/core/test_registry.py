"""Registries: lazy entries cost no import until used; unknown names list the valid ones."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from ssl_models.core.errors import PipelineError
from ssl_models.core.registry import NoOptions, Registry


@dataclass
class FakeOptions:
    width: int = 2


def test_a_lazy_entry_imports_its_module_only_when_fetched() -> None:
    registry: Registry = Registry("test method")
    registry.register_lazy("kfold", "sklearn.model_selection._split:KFold", options=FakeOptions)
    sys.modules.pop("sklearn.model_selection._split", None)
    assert "kfold" in registry and registry.options("kfold") is FakeOptions
    assert "sklearn.model_selection._split" not in sys.modules
    assert registry.get("kfold").__name__ == "KFold"


def test_unknown_names_fail_with_the_valid_ones_and_the_place() -> None:
    registry: Registry = Registry("test method")
    registry.register("b")(object)
    registry.register_lazy("a", "x:y")
    with pytest.raises(PipelineError, match=r"params.yaml p.method: unknown test method 'c'; valid names: a, b"):
        registry.check("c", "p.method")
    assert registry.options("b") is NoOptions
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("b")(object)


def test_every_domain_registers_methods_and_backbones_with_options_dataclasses() -> None:
    import dataclasses

    from ssl_models.core.domain import get_domain

    for module in ("legal_text", "audio", "histopathology", "medical3d"):
        domain = get_domain(module)
        assert set(domain.sections) == {"ingest", "preprocess", "model", "default_data"}
        assert domain.methods.names() and domain.backbones.names()
        for name in domain.methods.names():
            assert dataclasses.is_dataclass(domain.methods.options(name)), (module, name)
