"""The config tree: YAML + --set overrides, strict keys and types, dump and flatten."""
import pytest
import yaml

from pipeline import config


def test_defaults_are_the_papers_recipe():
    cfg = config.load()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (1e-2, 0.9, 5e-4)
    assert (cfg.run.global_batch_size, cfg.schedule.epochs, cfg.schedule.max_decays) == (256, 74, 3)
    assert (cfg.model.dropout, cfg.data.crop_size, cfg.data.color_shift_std) == (0.5, 224, 0.1)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: D\noptim:\n  lr: 1.0e-3\ndata:\n  scale_max: 512\n")
    cfg = config.load(path, ["optim.lr=1e-4", "run.workers=4", "data.flip=false", "run.name=d-384"])
    assert cfg.model.name == "D" and cfg.data.scale_max == 512
    assert cfg.optim.lr == 1e-4 and cfg.run.workers == 4 and cfg.data.flip is False
    assert cfg.run.name == "d-384"


def test_int_is_accepted_for_a_float():
    assert config.load(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr'; allowed: lr, momentum"),
    ("trainer.lr=0.1", r"unknown config key 'trainer'; allowed: model, data, optim"),
    ("optim.lr=fast", r"optim.lr: expected float, got str 'fast'"),
    ("run.workers=2.5", r"run.workers: expected int \| str \| list\[int\], got float 2.5"),
    ("run.workers=8-2", r"run.workers: '8-2'; it must be a count >= 1 or a range lo-hi with 1 <= lo <= hi"),
    ("run.workers=[0, 4]", r"run.workers: \[0, 4\]; it must be a count >= 1 or a range"),
    ("data.flip=3", r"data.flip: expected bool, got int 3"),
    ("data.layout=NCWH", r"data.layout: 'NCWH' is not one of NCHW, NHWC"),
    ("run.workers=2-4", r"run.workers \[2, 4\] is a range \(elastic\) but run.max_failures is 0"),
    ("run.workers=300", r"run.workers 300: more workers than images in run.global_batch_size 256"),
    ("data.scale_min=200", r"data.scale_min/scale_max"),
    ("optim.lr", r"expected section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [override])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: D\n  depth: 16\n")
    with pytest.raises(config.ConfigError, match=r"unknown config key 'model.depth'"):
        config.load(path)


def test_dump_round_trips(tmp_path):
    cfg = config.load(None, ["model.name=E", "data.scale_max=512", "optim.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg
    assert yaml.safe_load(config.dump(cfg))["model"]["name"] == "E"


def test_flatten_gives_one_param_per_leaf():
    flat = config.flatten(config.load(None, ["optim.lr=1e-3"]))
    assert flat["optim.lr"] == 1e-3 and flat["model.name"] == "A"
    assert all(not isinstance(v, dict) for v in flat.values())
    assert len(flat) == sum(len(v) for v in config.to_dict(config.load()).values())


@pytest.mark.parametrize("smin,smax,q,expected", [(256, 256, 0, 256), (256, 512, 0, 384), (256, 512, 300, 300)])
def test_test_scale(smin, smax, q, expected):
    d = config.DataConfig(scale_min=smin, scale_max=smax, test_scale=q)
    assert config.test_scale(d) == expected


def test_choice_lists_come_from_the_modules_that_act_on_them():
    import model
    from pipeline import augment, ddp, loader

    c = config.choices()
    assert c["model.init"] == model.INITS and c["data.dtype"] == augment.DTYPES
    assert c["data.layout"] == tuple(augment.LAYOUTS) and c["run.grad_compression"] == tuple(ddp.HOOKS)
    assert c["data.decode"] == loader.DECODES
    context = {"model.box_bias": ["model.head=pcr"]}   # a key that only a box head takes
    for key, allowed in c.items():        # every listed value is accepted, and only those
        for value in allowed:
            assert config.flatten(config.load(None, [*context.get(key, []), f"{key}={value}"]))[key] == value
        with pytest.raises(config.ConfigError, match=f"{key}: 'bogus' is not one of {', '.join(allowed)}"):
            config.load(None, [*context.get(key, []), f"{key}=bogus"])
    with pytest.raises(config.ConfigError, match="model.box_bias: 'mean' starts a box head"):
        config.load(None, ["model.box_bias=mean"])


def test_importing_the_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_key_has_a_meaning_in_jobs_config():
    from jobs import config as lister

    rows = lister.describe()
    assert len(rows) == len(config.flatten(config.Config()))
    assert [key for key, _, _, meaning in rows if not meaning.strip()] == []


def test_each_key_is_declared_once_and_the_tables_are_derived_from_it():
    """Every key's field carries its meaning; RANGES, OWN_CHOICES, choices() and resume's MAY_CHANGE
    say exactly what the fields declare, and every tracking key may change on resume."""
    from jobs.driver import resume

    fields = config.leaves()
    assert list(fields) == list(config.flatten(config.Config()))
    assert [k for k, f in fields.items() if not f.metadata.get("meaning", "").strip()] == []
    meta = {k: f.metadata for k, f in fields.items()}
    assert config.RANGES == {k: (m["check"], m["needs"]) for k, m in meta.items() if m.get("check")}
    assert all(needs for _, needs in config.RANGES.values())
    assert config.OWN_CHOICES == {k: m["choices"] for k, m in meta.items() if isinstance(m.get("choices"), tuple)}
    assert set(config.choices()) == {k for k, m in meta.items() if m.get("choices")}
    assert resume.MAY_CHANGE == {k for k, m in meta.items() if m.get("resume")}
    assert all(resume.may_change(k) == bool(m.get("resume")) for k, m in meta.items())
    assert all(resume.may_change(k) for k in fields if k.startswith("tracking."))
