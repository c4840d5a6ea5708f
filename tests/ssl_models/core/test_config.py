"""Config parsing: every key checked for its name, type and range, in one line naming it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ssl_models.core.config import (DOMAIN_SECTIONS, DomainConfig, FinetuneConfig, PretrainConfig, SplitConfig,
                                    load_config, parse_section, require)
from ssl_models.core.privacy import PrivacyConfig
from ssl_models.core.errors import PipelineError
from tests.conftest import tiny_params, write_params


@dataclass
class Inner:
    rate: float = 0.5

    def validate(self, where: str) -> None:
        require(0 < self.rate < 1, where, "rate must be in (0, 1)")


@dataclass
class Outer:
    name: str = "a"
    count: int = 1
    ratio: float = 0.1
    flag: bool = False
    choice: Literal["x", "y"] = "x"
    sizes: list[int] = field(default_factory=lambda: [1])
    maybe: str | None = None
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("values, message", [
    ({"nmae": "b"}, "o: unknown setting(s) ['nmae']; valid settings: ['choice', 'count', 'flag', 'inner', "),
    ({"count": "ten"}, "o.count: 'ten' should be a valid integer"),
    ({"count": 1.5}, "o.count: 1.5 should be a valid integer"),
    ({"count": True}, "o.count: True should be a valid integer"),
    ({"ratio": "0.1"}, "o.ratio: '0.1' should be a valid number"),
    ({"ratio": True}, "o.ratio: True should be a valid number"),
    ({"flag": "yes"}, "o.flag: 'yes' should be true or false"),
    ({"flag": 1}, "o.flag: 1 should be true or false"),
    ({"choice": "z"}, "o.choice: 'z' should be 'x' or 'y'"),
    ({"sizes": 3}, "o.sizes: 3 should be a list"),
    ({"sizes": [1, "b"]}, "o.sizes[1]: 'b' should be a valid integer"),
    ({"maybe": 3}, "o.maybe: 3 should be a valid string or null"),
    ({"inner": {"rat": 1}}, "o.inner: unknown setting(s) ['rat']; valid settings: ['rate']"),
    ({"inner": {"rate": 2.0}}, "o.inner: rate must be in (0, 1)"),
    ({"inner": 3}, "o.inner: 3 should be a mapping of settings"),
    ({"count": "ten", "flag": 2}, "o.count: 'ten' should be a valid integer; o.flag: 2 should be true or false"),
])
def test_each_kind_of_bad_value_is_named(values: dict, message: str) -> None:
    with pytest.raises(PipelineError) as caught:
        parse_section(Outer, values, "o")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_good_values_are_typed_ints_become_floats_and_nested_sections_parse() -> None:
    parsed = parse_section(Outer, {"ratio": 1, "maybe": None, "inner": {"rate": 0.25}, "sizes": [2, 3]}, "o")
    assert parsed.ratio == 1.0 and isinstance(parsed.ratio, float)
    assert parsed.inner == Inner(0.25) and parsed.sizes == [2, 3] and parsed.maybe is None
    assert parse_section(Outer, None, "o") == Outer()
    assert type(parsed) is Outer and type(parsed.inner) is Inner  # the dataclasses themselves, not copies


def test_shared_sections_check_their_ranges() -> None:
    with pytest.raises(PipelineError, match="warmup_steps must be below steps"):
        parse_section(PretrainConfig, {"steps": 10, "warmup_steps": 10}, "p")
    with pytest.raises(PipelineError, match=r"f: label_fractions must list fractions in \(0, 1\]"):
        parse_section(FinetuneConfig, {"label_fractions": [0.5, 1.5]}, "f")
    with pytest.raises(PipelineError, match=r"f.inits\[0\]: 'random' should be 'ssl', 'scratch', 'generic' or 'baseline'"):
        parse_section(FinetuneConfig, {"inits": ["random"]}, "f")


def test_the_whole_block_is_parsed_once_into_typed_sections(tmp_path) -> None:
    write_params(tmp_path, tiny_params(pretrain={"options": {"mlm_probability": 0.2}}))
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    assert cfg.pretrain.options.mlm_probability == 0.2  # the method's own options dataclass
    assert type(cfg.model).__name__ != "dict" and cfg.model.hidden_size == 32
    assert cfg.resolve("data/x") == tmp_path / "data/x" and cfg.resolve("/abs") .as_posix() == "/abs"
    assert domain.name == "legal_text"
    params = tiny_params()
    params["domains"]["legal"]["ingest"] = None  # `ingest:` with nothing under it: the defaults
    write_params(tmp_path, params)
    assert load_config("legal", tmp_path / "params.yaml")[0].ingest == type(cfg.ingest)()


@pytest.mark.parametrize("block, message", [
    ({"modul": "x"}, "domains.legal: unknown setting(s) ['modul']"),
    ({"cpu_threads": 0}, "domains.legal.cpu_threads: must be a positive number of threads or null"),
    ({"cpu_threads": "two"}, "domains.legal.cpu_threads: 'two' should be a valid integer or null"),
    ({"cpu_thread": 2}, "domains.legal: unknown setting(s) ['cpu_thread']; valid settings: ['corpus', 'cpu_threads', "),
    ({"module": "no_such_domain"}, "no domain module ssl_models.no_such_domain"),
    ({"pretrain": {"options": {"mlm_probabilty": 0.2}}}, "domains.legal.pretrain.options: unknown setting(s) ['mlm_probabilty']"),
    ({"pretrain": {"method": "bert"}}, "domains.legal.pretrain.method: unknown text SSL method 'bert'"),
])
def test_block_level_mistakes_are_named(tmp_path, block: dict, message: str) -> None:
    params = tiny_params()
    legal = params["domains"]["legal"]
    for key, value in block.items():
        if isinstance(value, dict) and isinstance(legal.get(key), dict):
            legal[key].update(value)
        else:
            legal[key] = value
    write_params(tmp_path, params)
    with pytest.raises(PipelineError) as caught:
        load_config("legal", tmp_path / "params.yaml")
    assert message in str(caught.value)


def test_a_params_file_that_is_not_yaml_is_one_line(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("domains:\n  legal: [unclosed\n")
    with pytest.raises(PipelineError) as caught:
        load_config("legal", tmp_path / "params.yaml")
    assert "is not valid YAML" in str(caught.value) and "\n" not in str(caught.value)


def test_a_preset_lays_its_settings_over_the_block_and_only_the_chosen_one_is_read(tmp_path) -> None:
    params = tiny_params()
    legal = params["domains"]["legal"]
    legal["presets"] = {"gpu": {"model": {"hidden_size": 64, "num_heads": 4}, "pretrain": {"nproc": 2}},
                        "broken": {"model": {"hidden_sise": 64}}}
    legal["preset"] = "gpu"
    write_params(tmp_path, params)
    cfg, _ = load_config("legal", tmp_path / "params.yaml")  # the broken preset, not chosen, is not read
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (64, 4, 1)  # the rest stays
    assert cfg.pretrain.nproc == 2 and cfg.pretrain.steps == 12
    legal["preset"] = "broken"
    write_params(tmp_path, params)
    with pytest.raises(PipelineError, match=r"domains.legal \(preset broken\).model: unknown setting\(s\) \['hidden_sise'\]"):
        load_config("legal", tmp_path / "params.yaml")
    legal["preset"] = "tpu"
    write_params(tmp_path, params)
    with pytest.raises(PipelineError, match=r"domains.legal.preset: 'tpu' is not one of the block's presets \['broken', 'gpu'\]"):
        load_config("legal", tmp_path / "params.yaml")


def test_load_config_validates_each_part_of_the_block_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the block (its sections together), then the chosen method's options."""
    from ssl_models.core import config

    params = tiny_params()
    params["domains"]["legal"]["presets"] = {"gpu": {"pretrain": {"nproc": 2}}}
    write_params(tmp_path, params)
    places: list[str] = []
    real = config.validated
    monkeypatch.setattr(config, "validated", lambda kind, value, where: places.append(where) or real(kind, value, where))
    load_config("legal", tmp_path / "params.yaml")
    assert places == ["domains.legal.module", "domains.legal", "domains.legal.pretrain.options"]


def test_every_repository_preset_parses(tmp_path) -> None:
    """A stage start reads the chosen preset only, so each preset of params.yaml is checked here."""
    import yaml

    from tests.conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    chosen = []
    for name, block in params["domains"].items():
        assert "large" in block["presets"], name
        for preset in block["presets"]:
            block["preset"] = preset
            write_params(tmp_path, params)
            cfg, _ = load_config(name, tmp_path / "params.yaml")
            chosen.append((name, preset))
            if preset == "large":
                assert cfg.pretrain.steps >= 50_000 and cfg.pretrain.nproc == "auto"
    assert ("legal", "dapt") in chosen and len(chosen) >= 5


def _default(cls: type, name: str) -> object:
    setting = {f.name: f for f in dataclasses.fields(cls)}[name]
    return setting.default if setting.default is not dataclasses.MISSING else setting.default_factory()


def test_a_value_every_domain_block_sets_alike_is_the_dataclass_default() -> None:
    """Defaults in one place: where every block of params.yaml sets a setting to the same value,
    the dataclass default is that value (a value that differs by domain lives in params.yaml)."""
    import yaml

    from ssl_models.core.domain import get_domain
    from tests.conftest import REPO

    blocks = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]
    owners = {name: get_domain(block["module"]) for name, block in blocks.items()}
    shared = {"split": SplitConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "privacy": PrivacyConfig}
    mappings = {name: {None: block, **{s: block.get(s) or {} for s in [*shared, *DOMAIN_SECTIONS]}}
                for name, block in blocks.items()}
    disagreements, compared = [], 0
    for section in [None, *shared, *DOMAIN_SECTIONS]:
        for key in set.intersection(*(set(m[section]) for m in mappings.values())) - {"options"}:
            values = [m[section][key] for m in mappings.values()]
            if any(value != values[0] for value in values):
                continue
            for owner in owners.values():  # a mapping (a section) is compared setting by setting
                cls = DomainConfig if section is None else shared.get(section) or owner.sections[section]
                if key in {f.name for f in dataclasses.fields(cls)} and not isinstance(values[0], dict):
                    compared += 1
                    if _default(cls, key) != values[0]:
                        disagreements.append(f"{cls.__name__}.{key} = {_default(cls, key)!r}; params.yaml: {values[0]!r}")
    assert compared > 50  # the shared sections' settings are compared
    assert not disagreements, sorted(set(disagreements))
