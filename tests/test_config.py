from pathlib import Path

import pytest

from clinfuse.config import Config, ConfigError, config_from_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.cohort.key == "StudyInstanceUID"
    assert cfg.cohort.split.train + cfg.cohort.split.val + cfg.cohort.split.test == pytest.approx(1.0)


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"cohort": {"split": {"trian": 0.7}}}, source="my.yaml")
    msg = str(e.value)
    assert "my.yaml" in msg and "cohort.split.trian" in msg
    assert "allowed keys: seed, test, train, val" in msg


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"cohort": {"key": "PatientID"}})
    msg = str(e.value)
    assert "cohort.key" in msg and "StudyInstanceUID" in msg and "AccessionNumber" in msg and "PatientID" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="must be 1.0"):
        config_from_dict({"cohort": {"split": {"train": 0.9}}})
    with pytest.raises(ConfigError, match="needs `classes`"):
        config_from_dict({"cohort": {"labels": {"task": "multiclass"}}})
    with pytest.raises(ConfigError, match="window_center"):
        config_from_dict({"cohort": {"dicom": {"voi": "window"}}})
    with pytest.raises(ConfigError, match="read_sections"):
        config_from_dict({"cohort": {"reports": {"read_sections": ["HISTORY"]}}})


def test_overrides_parse_yaml_values():
    cfg = config_from_dict({}, overrides=["cohort.split.seed=7", "cohort.labels.columns=[a, b]",
                                          "cohort.labels.task=multilabel"])
    assert cfg.cohort.split.seed == 7 and cfg.cohort.labels.columns == ["a", "b"]
    with pytest.raises(ConfigError, match="key.path=value"):
        config_from_dict({}, overrides=["cohort.split.seed"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_dump_round_trip():
    cfg = config_from_dict({"cohort": {"split": {"seed": 5}}})
    import yaml

    assert Config.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_configuration_docs_match_the_code():
    from clinfuse.config import config_reference

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc.strip() == config_reference().strip(), (
        "docs/configuration.md is stale: run `make docs-config`")


def test_default_yaml_lists_every_key():
    import yaml

    data = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert Config.model_validate(data) == Config(), "configs/default.yaml must hold exactly the defaults"

    def keys(model, prefix=""):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    def present(d, dotted):
        for k in dotted.split("."):
            if not isinstance(d, dict) or k not in d:
                return False
            d = d[k]
        return True

    missing = [k for k in keys(Config) if not present(data, k)]
    assert not missing, f"configs/default.yaml lacks {missing}"
