import pytest

from fedtune.config import Config, apply_overrides, config_from_dict, load_config
from fedtune.errors import FedtuneError


def test_defaults_validate():
    cfg = Config()
    assert cfg.peft.method == "lora" and cfg.train.lr > 0


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(FedtuneError) as e:
        load_config(p)
    assert "train.lrr" in str(e.value) and "did you mean 'lr'" in str(e.value)


def test_unknown_section_suggests():
    with pytest.raises(FedtuneError, match="did you mean 'train'"):
        config_from_dict({"trian": {}})


def test_dotted_overrides_are_typed():
    d = apply_overrides({}, ["train.lr=3e-4", "fl.rounds=7", "data.template=chat", "fl.clients_per_round=0.5",
                             "peft.target_modules=[q_proj,v_proj]", "data.max_records_per_client=null"])
    cfg = config_from_dict(d)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.fl.rounds == 7 and cfg.fl.clients_per_round == 0.5
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]


def test_invalid_value_is_one_clear_error():
    with pytest.raises(FedtuneError, match="train.lr"):
        config_from_dict({"train": {"lr": -1}})
    with pytest.raises(FedtuneError, match="peft.method"):
        config_from_dict({"peft": {"method": "lora2"}})
    with pytest.raises(FedtuneError, match="clients_per_round"):
        config_from_dict({"fl": {"clients_per_round": 1.5}})
    with pytest.raises(FedtuneError, match="train.device.*'gpu0' is not a device name"):
        config_from_dict({"train": {"device": "gpu0"}})
    assert config_from_dict({"train": {"device": "cuda:1"}}).train.device == "cuda:1"  # checked at run time


def test_bad_override_syntax():
    with pytest.raises(FedtuneError, match="key.subkey=value"):
        apply_overrides({}, ["train.lr"])


def test_fingerprint_ignores_output_and_rounds_only():
    a = config_from_dict({"fl": {"rounds": 2}, "output": {"dir": "x"}})
    b = config_from_dict({"fl": {"rounds": 9}, "output": {"dir": "y"}})
    c = config_from_dict({"train": {"lr": 1e-3}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_shipped_configs_validate():
    from pathlib import Path

    from fedtune.hpo import load_study

    files = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert files
    for f in files:
        if f.parent.name == "hpo":  # study files: a base run config plus an hpo: section
            load_study(str(f), [])
        else:
            load_config(f)
